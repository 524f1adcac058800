"""Which captured CUDA graph a step replays, and the padded shape it runs at (pure logic, no
CUDA: unit-tested on the CPU).

Two ladders of whole-model graphs share one memory pool (engine/cuda_graphs.py):
- decode graphs, one per batch size b (1, 2, 4, 8, then every 16 up to max_num_seqs): every
  sequence has one query token and samples, so T = S = b;
- prefill graphs, one per padded token count T (16, 32, 48, 64, 96, 128, ... up to
  max_graph_prefill_tokens) for any other step that fits: prefill chunks, prefix-cache hits,
  mixed prefill + decode. Their sequence rows are S = min(T, max_num_seqs), enough for any step
  of at most T tokens (every scheduled sequence has at least one token).

With EngineConfig.persistent_decode a second batch-1 decode graph runs every layer in one
persistent kernel; a step of one sequence replays it while the sequence holds at most
persistent_max_context tokens (takes_persistent), the usual batch-1 graph after that. With
persistent_decode_max_seqs above 1, decode steps of up to that many sequences do the same
through persistent graphs of the decode ladder's sizes (padded up to the next).

Padding: tokens past the step's real ones store nothing (slot -1) and belong to no sequence;
sequence rows past the real ones have no queries and length 0; the LM head runs on S rows of
logits_indices whose padding points at token 0. Every kernel grid is fixed by (T, S).
"""

from __future__ import annotations

from dataclasses import dataclass

PREFILL_MIN_TOKENS = 16  # the smallest prefill graph: steps of fewer tokens pad up to it


@dataclass(frozen=True)
class GraphShape:
    num_tokens: int  # T: token rows the graph runs (real tokens, then padding)
    num_seqs: int  # S: sequence rows of the attention metadata and of the LM head
    decode: bool  # one query token per sequence, every row samples (logits for all S rows)
    persistent: bool = False  # a decode graph of the persistent kernel (takes_persistent)


def takes_persistent(max_context: int, num_seqs: int, decode: bool, context: int, max_seqs: int = 1) -> bool:
    """Whether a step runs the persistent decode kernel: a decode step of at most max_seqs
    sequences whose longest holds at most max_context tokens after it (0: the kernel is off)."""
    return max_context > 0 and decode and num_seqs <= max_seqs and context <= max_context


def step_context(out, max_seqs: int = 1) -> int:
    """A step (a SchedulerOutput) of at most max_seqs sequences: the tokens its longest holds
    after the step; else 0 (not counted: no persistent graph takes it)."""
    if not out.seqs or len(out.seqs) > max_seqs:
        return 0
    return max(s.start_pos + len(s.token_ids) for s in out.seqs)


def decode_graph_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 (nano-vllm's ladder), ending exactly at max_num_seqs."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


def prefill_graph_sizes(limit: int, max_tokens: int) -> list[int]:
    """Powers of two from 16 with the midpoint between each pair from 32 on (16, 32, 48, 64, 96,
    128, 192, 256, 384, 512, ...): a step pads by at most a third of its tokens (two thirds
    below 16). The ladder ends exactly at min(limit, max_tokens); limit 0: no prefill graphs."""
    top = min(limit, max_tokens)
    sizes, p = [], PREFILL_MIN_TOKENS
    while p < top:
        sizes += [p] if p < 32 else [p, p + p // 2]
        p *= 2
    return [s for s in sizes if s < top] + ([top] if top > 0 else [])


@dataclass(frozen=True)
class GraphLadder:
    decode_sizes: list[int]
    prefill_sizes: list[int]
    max_num_seqs: int
    persistent_max_context: int = 0  # > 0: also persistent decode graphs
    persistent_max_seqs: int = 1  # their sequences at most (then padded up the decode ladder)

    @classmethod
    def build(cls, max_num_seqs: int, max_graph_prefill_tokens: int, max_tokens: int,
              persistent_max_context: int = 0, persistent_max_seqs: int = 1) -> GraphLadder:
        """max_tokens: the most tokens a step can have (max_num_batched_tokens, the token budget)."""
        return cls(decode_graph_sizes(max_num_seqs), prefill_graph_sizes(max_graph_prefill_tokens, max_tokens),
                   max_num_seqs, persistent_max_context, min(persistent_max_seqs, max_num_seqs))

    def persistent_sizes(self) -> list[int]:
        """The persistent decode graphs' batch sizes: the decode ladder's up to the first that
        holds persistent_max_seqs sequences (none with the kernel off)."""
        if not self.persistent_max_context:
            return []
        top = next(b for b in self.decode_sizes if b >= self.persistent_max_seqs)
        return [b for b in self.decode_sizes if b <= top]

    def shapes(self) -> list[GraphShape]:
        """Every graph to capture, largest token count first (smaller ones then reuse the
        memory pool the largest set up); at equal counts the prefill graph first."""
        shapes = [GraphShape(b, b, True) for b in self.decode_sizes]
        shapes += [GraphShape(b, b, True, True) for b in self.persistent_sizes()]
        shapes += [GraphShape(t, min(t, self.max_num_seqs), False) for t in self.prefill_sizes]
        return sorted(shapes, key=lambda s: (-s.num_tokens, s.decode))

    def shape_for(self, num_tokens: int, num_seqs: int, decode: bool, context: int | None = None) -> GraphShape | None:
        """The graph for a step of num_tokens tokens over num_seqs sequences; decode: every
        sequence has one token and samples; context: the longest sequence's tokens after the
        step (None: unknown, never a persistent graph). None: no graph fits (the step runs eagerly)."""
        if context is not None and takes_persistent(self.persistent_max_context, num_seqs, decode, context,
                                                    self.persistent_max_seqs):
            b = next(s for s in self.decode_sizes if s >= num_seqs)
            return GraphShape(b, b, True, True)
        if decode and num_seqs <= self.decode_sizes[-1]:
            b = next(s for s in self.decode_sizes if s >= num_seqs)
            return GraphShape(b, b, True)
        if not self.prefill_sizes or num_tokens > self.prefill_sizes[-1]:
            return None
        t = next(s for s in self.prefill_sizes if s >= num_tokens)
        s = min(t, self.max_num_seqs)
        return GraphShape(t, s, False) if num_seqs <= s else None
