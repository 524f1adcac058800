"""Whole-model CUDA graphs (attention, KV store, norms and LM head included) for decode steps at
a ladder of batch sizes and for small prefill / mixed steps at a ladder of token counts
(engine/graph_shapes.py says which step gets which graph and how it is padded). All graphs share
one memory pool and read the runner's persistent input buffers, so a replay only needs those
buffers filled."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.graph_shapes import GraphLadder, GraphShape, step_context
from engine.input_buffers import InputBuffers
from engine.scheduler import SchedulerOutput

# (padded shape, attention metadata) -> logits: the model part of a step, reading its token ids,
# positions and (prefill graphs) logits_indices from the persistent input buffers. Decode graphs
# return one row per sequence, prefill graphs one per logits_indices entry (S rows).
GraphForward = Callable[[GraphShape, AttentionMetadata], torch.Tensor]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Collect garbage now, then no automatic collection until the block ends. A dropped engine's
    reference cycles (collectable once any engine's shutdown unfreezes the heap) can hold CUDA
    graphs; freed by a collection that starts mid-capture, their reset is an operation a
    capturing stream forbids, and the capture fails."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass
class CapturedGraph:
    shape: GraphShape
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [shape.num_seqs, vocab] written by each replay

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class StepGraphs:
    """`forward` runs the model on the first T rows of `buffers`; one graph per shape of the
    ladder is captured."""

    def __init__(self, forward: GraphForward, buffers: InputBuffers, ladder: GraphLadder, max_model_len: int):
        self.forward, self.buffers, self.ladder, self.max_model_len = forward, buffers, ladder, max_model_len
        self.graphs: dict[GraphShape, CapturedGraph] = {}
        self.misses = 0  # steps `lookup` found no graph for (they ran eagerly): studies check their windows

    def lookup(self, out: SchedulerOutput) -> CapturedGraph | None:
        """The graph for this step, or None (it runs eagerly). A decode step has no prefill
        tokens, one token per sequence (each has at least one) and every sequence sampling."""
        seqs = out.seqs
        decode = (not out.num_prefill_tokens and out.num_tokens == len(seqs)
                  and all(s.sample for s in seqs))
        shape = self.ladder.shape_for(out.num_tokens, len(seqs), decode,
                                      step_context(out, self.ladder.persistent_max_seqs))
        graph = self.graphs.get(shape) if shape is not None else None
        self.misses += graph is None
        return graph

    def for_batch(self, b: int, context: int) -> CapturedGraph | None:
        """The graph a decode batch of b sequences replays (b padded up the ladder; context: the
        longest sequence's tokens after the step); None above it."""
        shape = self.ladder.shape_for(b, b, True, context)
        return self.graphs.get(shape) if shape is not None else None

    def _metadata(self, shape: GraphShape) -> AttentionMetadata:
        buf, max_len, t, s = self.buffers, self.max_model_len, shape.num_tokens, shape.num_seqs
        # Host-side choices are made for the worst case the graph can replay: max_seq_len =
        # max_model_len (decode split count); a prefill graph's max_query_len = T (> 1: unified
        # attention; > SMALL_Q_MAX: both its tile launches, each program picking by q_len on the
        # device). Real lengths are read from the buffers on the device.
        return AttentionMetadata(
            slot_mapping=buf.slot_mapping.gpu[:t], query_start_loc=buf.query_start_loc.gpu[: s + 1],
            seq_lens=buf.seq_lens.gpu[:s], block_tables=buf.block_tables.gpu[:s],
            max_query_len=1 if shape.decode else max(t, 2), max_seq_len=max_len,
            query_start_loc_cpu=[], seq_lens_cpu=[max_len] * s,
            decode_order=buf.decode_order.gpu[:s] if shape.decode else None, persistent=shape.persistent,
        )

    def release(self) -> None:
        """Destroy the captured graphs now (not whenever they are collected): under TP they hold
        NCCL work, and the communicator's destroy waits for it."""
        if self.graphs:
            torch.cuda.synchronize()
        self.graphs.clear()

    @torch.inference_mode()
    def capture(self) -> None:
        buf = self.buffers
        # capture-time lanes store nothing and read nothing: no queries, length 0, slot -1
        buf.slot_mapping.gpu.fill_(-1)
        buf.seq_lens.gpu.zero_()
        buf.query_start_loc.gpu.zero_()
        buf.logits_indices.gpu.zero_()
        # every prefix a permutation of its rows: a graph's decode kernel writes the rows it names
        buf.decode_order.gpu.copy_(torch.arange(buf.decode_order.gpu.numel(), dtype=torch.int32))
        pool = None
        with collector_paused():
            for shape in self.ladder.shapes():  # largest first so smaller graphs reuse its pool
                meta = self._metadata(shape)
                self.forward(shape, meta)  # warm-up: compiles kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.forward(shape, meta)
                pool = graph.pool() if pool is None else pool
                self.graphs[shape] = CapturedGraph(shape, graph, logits)
        torch.cuda.synchronize()
