"""Whole-model CUDA graphs for decode steps (attention, KV store, norms and LM head included)
at a ladder of batch sizes; a batch is padded up to the next captured size. Graphs read the
runner's persistent input buffers, so a replay only needs those buffers filled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.attention import AttentionMetadata
from engine.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner


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
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.sizes = graph_batch_sizes(runner.config.max_num_seqs)
        self.graphs: dict[int, CapturedGraph] = {}

    def lookup(self, out: SchedulerOutput) -> CapturedGraph | None:
        """The graph for a decode-only step (every sequence one token, and sampling)."""
        b = len(out.seqs)
        if out.num_prefill_tokens or b > self.sizes[-1] or any(len(s.token_ids) != 1 for s in out.seqs):
            return None
        return self.graphs[next(s for s in self.sizes if s >= b)]

    def _metadata(self, b: int) -> AttentionMetadata:
        buf, max_len = self.runner.buffers, self.runner.config.max_model_len
        # max_seq_len = max_model_len so the host-chosen split count suits any replayed length;
        # real lengths are read from seq_lens on the device.
        return AttentionMetadata(
            slot_mapping=buf.slot_mapping.gpu[:b], query_start_loc=buf.query_start_loc.gpu[: b + 1],
            seq_lens=buf.seq_lens.gpu[:b], block_tables=buf.block_tables.gpu[:b],
            max_query_len=1, max_seq_len=max_len, query_start_loc_cpu=[], seq_lens_cpu=[max_len] * b,
        )

    def _forward(self, b: int, meta: AttentionMetadata) -> torch.Tensor:
        r = self.runner
        hidden = r.model(r.buffers.input_ids.gpu[:b], r.buffers.positions.gpu[:b], r.kv_caches, meta, r.backend)
        return r.model.compute_logits(hidden, gather=r.vocab_shard is None)

    def release(self) -> None:
        """Destroy the captured graphs now (not whenever the runner/graphs reference cycle is
        collected): under TP they hold NCCL work, and the communicator's destroy waits for it."""
        if self.graphs:
            torch.cuda.synchronize()
        self.graphs.clear()

    @torch.inference_mode()
    def capture(self) -> None:
        r = self.runner
        buf = r.buffers
        buf.slot_mapping.gpu.fill_(-1)  # capture-time lanes store nothing and read nothing
        buf.seq_lens.gpu.zero_()
        if hasattr(r.backend, "reserve"):
            r.backend.reserve(self.sizes[-1], r.mc.num_attention_heads // r.tp.size, r.mc.head_dim, r.device)
        pool = None
        for b in reversed(self.sizes):  # largest first so smaller graphs reuse its pool
            meta = self._metadata(b)
            self._forward(b, meta)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(b, meta)
            pool = graph.pool() if pool is None else pool
            self.graphs[b] = CapturedGraph(b, graph, logits)
        torch.cuda.synchronize()
