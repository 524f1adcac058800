"""Whole-model CUDA graphs for decode steps (attention, KV store, norms and LM head included)
at a ladder of batch sizes; a batch is padded up to the next captured size. Graphs read the
runner's persistent input buffers, so a replay only needs those buffers filled."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.input_buffers import InputBuffers
from engine.scheduler import SchedulerOutput

# (batch size, attention metadata) -> logits: the model part of a decode step, reading its token
# ids and positions from the persistent input buffers
DecodeForward = Callable[[int, AttentionMetadata], torch.Tensor]


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 (nano-vllm's ladder), ending exactly at max_num_seqs."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


@dataclass
class CapturedGraph:
    batch_size: int
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [batch_size, vocab] written by each replay

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class DecodeGraphs:
    """`forward` runs the model on the first b rows of `buffers`; graphs are captured for every
    size of the ladder up to max_num_seqs."""

    def __init__(self, forward: DecodeForward, buffers: InputBuffers, max_num_seqs: int, max_model_len: int):
        self.forward, self.buffers, self.max_model_len = forward, buffers, max_model_len
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.graphs: dict[int, CapturedGraph] = {}

    def lookup(self, out: SchedulerOutput) -> CapturedGraph | None:
        """The graph for a decode-only step (every sequence one token, and sampling)."""
        if out.num_prefill_tokens or any(len(s.token_ids) != 1 for s in out.seqs):
            return None
        return self.for_batch(len(out.seqs))

    def for_batch(self, b: int) -> CapturedGraph | None:
        """The graph a decode batch of b sequences replays (b padded up the ladder); None above it."""
        if b > self.sizes[-1]:
            return None
        return self.graphs[next(s for s in self.sizes if s >= b)]

    def _metadata(self, b: int) -> AttentionMetadata:
        buf, max_len = self.buffers, self.max_model_len
        # max_seq_len = max_model_len so the host-chosen split count suits any replayed length;
        # real lengths are read from seq_lens on the device.
        return AttentionMetadata(
            slot_mapping=buf.slot_mapping.gpu[:b], query_start_loc=buf.query_start_loc.gpu[: b + 1],
            seq_lens=buf.seq_lens.gpu[:b], block_tables=buf.block_tables.gpu[:b],
            max_query_len=1, max_seq_len=max_len, query_start_loc_cpu=[], seq_lens_cpu=[max_len] * b,
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
        buf.slot_mapping.gpu.fill_(-1)  # capture-time lanes store nothing and read nothing
        buf.seq_lens.gpu.zero_()
        pool = None
        for b in reversed(self.sizes):  # largest first so smaller graphs reuse its pool
            meta = self._metadata(b)
            self.forward(b, meta)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.forward(b, meta)
            pool = graph.pool() if pool is None else pool
            self.graphs[b] = CapturedGraph(b, graph, logits)
        torch.cuda.synchronize()
