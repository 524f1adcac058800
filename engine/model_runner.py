"""One model shard on one device: holds the weights and the paged KV cache, turns a
`SchedulerOutput` into tensors, runs the model and samples."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata, get_backend
from engine.config import EngineConfig
from engine.cuda_graphs import StepGraphs
from engine.distributed import SINGLE, TensorParallel
from engine.graph_shapes import GraphLadder, GraphShape, takes_persistent
from engine.input_buffers import InputBuffers
from engine.kernels.persistent_decode import supports_head_dim
from engine.loader import load_weights
from engine.models.llama import SmallBatchFusion
from engine.models.registry import get_model_class
from engine.sampler import Sampler, SamplingMetadata, VocabShard
from engine.scheduler import ScheduledSequence, SchedulerOutput


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled]: last token of each sampling sequence
    sample_rows: list[int]  # which scheduled sequences sample


class PendingSample:
    """Sampled ids of a launched step, copied to pinned host memory behind an event, so the
    host can plan the next step while this one runs."""

    def __init__(self, sampled: torch.Tensor | None, sample_rows: list[int], num_seqs: int):
        self.sample_rows, self.num_seqs = sample_rows, num_seqs
        self.host = None
        if sampled is not None:
            pinned = sampled.is_cuda
            self.host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=pinned)
            self.host.copy_(sampled, non_blocking=pinned)
            self.event = torch.cuda.Event() if pinned else None
            if pinned:
                self.event.record()

    def result(self) -> list[int | None]:
        out: list[int | None] = [None] * self.num_seqs
        if self.host is None:
            return out
        if self.event is not None:
            self.event.synchronize()  # the step's one host sync
        for row, tok in zip(self.sample_rows, self.host.tolist()):
            out[row] = tok
        return out


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TensorParallel = SINGLE):
        self.config = config
        self.mc = config.model_config
        self.tp = tp
        self.device = config.device_for_rank(tp.rank)
        self.dtype = config.torch_dtype
        self.kv_dtype = config.kv_cache_torch_dtype  # the model's dtype, or fp8 (kv_cache_dtype)
        self.block_size = config.block_size
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if tp.size > 1 and not config.disable_custom_all_reduce:
                max_tokens = max(config.max_num_batched_tokens, config.max_num_seqs)
                self.tp = tp = tp.with_symmetric_memory(self.device, self.dtype, max_tokens, self.mc.hidden_size,
                                                        fusion=config.all_reduce_norm_fusion)
        self.model = self._build_model()
        self.backend = get_backend(config.attention_backend, self.device.type)
        # > 0: decode steps of up to persistent_decode_max_seqs sequences whose longest holds at most
        # this many tokens run the persistent kernel (graph_shapes.takes_persistent), where the model
        # can take it: TP=1, a model-dtype cache, a backend with the fused decode (Triton's kernels), a
        # head_dim the kernel supports
        self.persistent_max_context = (config.resolved_persistent_context if config.persistent_decode
                                       and tp.size == 1 and self.kv_dtype == self.dtype and self.backend.fused_decode
                                       and supports_head_dim(self.mc.head_dim) else 0)
        self.sampler = Sampler(config.seed, self.device)
        # on GPUs each rank samples its own slice of the vocabulary (no logits all-gather)
        head = self.model.lm_head
        self.vocab_shard = (VocabShard(tp, head.start, min(head.per_rank, self.mc.vocab_size - head.start),
                                       self.mc.vocab_size)
                            if tp.size > 1 and self.device.type == "cuda" else None)
        self.num_kv_heads = self.mc.num_key_value_heads // tp.size
        self.kv_cache: torch.Tensor | None = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.graphs: StepGraphs | None = None
        # the last step's sampled ids on the device, and each sampling sequence's row in them:
        # placeholder tokens of the next step are gathered from here without a host round trip
        self._prev_sampled: torch.Tensor | None = None
        self._prev_rows: dict[int, int] = {}

    def _build_model(self) -> torch.nn.Module:
        with torch.device(self.device), _default_dtype(self.dtype):
            cfg = self.config
            fusion = SmallBatchFusion(cfg.resolved_fused_tokens, cfg.fused_small_batch_pdl, cfg.fused_small_batch_rotary,
                                      cfg.fused_small_batch_merge, cfg.resolved_row_parallel_tokens,
                                      cfg.fused_decode_attention, cfg.fused_row_parallel_columns)
            model = get_model_class(self.mc.architecture)(self.mc, self.tp, fusion)
        load_weights(model, self.config)
        return model.eval()

    # ---- KV cache -----------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        """KV bytes of one block on this rank (its 1/tp.size of the KV heads)."""
        return self.block_size * self.mc.kv_bytes_per_token(self.kv_dtype.itemsize) // self.tp.size

    def available_kv_blocks(self) -> int:
        """Blocks that fit this device's KV budget (before the engine takes the min over ranks)."""
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type == "cpu":
            return max(2, self.config.cpu_kv_cache_bytes // self.bytes_per_block)
        return self._profile_gpu_blocks()

    def _profile_gpu_blocks(self) -> int:
        """Run the largest prefill once, then give what memory is left under the utilization
        target to the KV cache."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._dummy_prefill(self.config.max_num_batched_tokens)
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        used_by_others = total - free - torch.cuda.memory_reserved()
        budget = total * self.config.gpu_memory_utilization - used_by_others - torch.cuda.max_memory_allocated()
        return max(2, int(budget // self.bytes_per_block))

    def _dummy_prefill(self, num_tokens: int) -> None:
        n, dev = min(num_tokens, self.config.max_model_len), self.device
        ids = torch.zeros(n, dtype=torch.long, device=dev)
        meta = AttentionMetadata(  # slot -1: nothing stored; every key read from the scratch block
            slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
            block_tables=torch.zeros((1, -(-n // self.block_size)), dtype=torch.int32, device=dev),
            max_query_len=n, max_seq_len=n, query_start_loc_cpu=[0, n], seq_lens_cpu=[n],
        )
        caches = [(self._scratch_cache(), self._scratch_cache())] * self.mc.num_hidden_layers
        with torch.inference_mode():
            hidden = self.model(ids, torch.arange(n, device=self.device), caches, meta, self.backend)
            self.model.compute_logits(hidden[-min(n, self.config.max_num_seqs):])

    def _scratch_cache(self) -> torch.Tensor:
        return torch.zeros(1, self.block_size, self.num_kv_heads, self.mc.head_dim, dtype=self.kv_dtype,
                           device=self.device)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (2, self.mc.num_hidden_layers, num_blocks, self.block_size, self.num_kv_heads, self.mc.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.kv_caches = [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(self.mc.num_hidden_layers)]
        self._init_buffers()
        if self.device.type == "cuda":  # compile now what would compile in the first steps (FA4, sampling)
            self.backend.warmup(self.mc.num_attention_heads // self.tp.size, *self.kv_caches[0],
                                self.config.max_num_seqs)
            hidden = torch.zeros(1, self.mc.hidden_size, dtype=self.dtype, device=self.device)
            logits = self.model.compute_logits(hidden, gather=self.vocab_shard is None)
            self.sampler.warm_up(logits, self.config.max_num_seqs, self.vocab_shard)
        if self.device.type == "cuda" and not self.config.enforce_eager:
            cfg = self.config
            self.backend.reserve(cfg.max_num_seqs, self.mc.num_attention_heads // self.tp.size, self.mc.head_dim,
                                 self.device)
            ladder = GraphLadder.build(cfg.max_num_seqs, cfg.max_graph_prefill_tokens, cfg.max_num_batched_tokens,
                                       self.persistent_max_context, cfg.persistent_decode_max_seqs)
            self.graphs = StepGraphs(self._graph_forward, self.buffers, ladder, cfg.max_model_len)
            self.graphs.capture()

    def _graph_forward(self, shape: GraphShape, meta: AttentionMetadata) -> torch.Tensor:
        """The model part of a step of shape.num_tokens rows, read from the input buffers (graph
        capture). A prefill graph runs the LM head only on the S rows of logits_indices."""
        buf, t = self.buffers, shape.num_tokens
        hidden = self.model(buf.input_ids.gpu[:t], buf.positions.gpu[:t], self.kv_caches, meta, self.backend)
        if not shape.decode:
            hidden = hidden.index_select(0, buf.logits_indices.gpu[: shape.num_seqs])  # [S, hidden]
        return self.model.compute_logits(hidden, gather=self.vocab_shard is None)

    def close(self) -> None:
        """Free the CUDA graphs and the KV cache (before a tensor-parallel group is destroyed)."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None
        self.kv_cache, self.kv_caches = None, []
        self._prev_sampled = None
        if self.tp.symmetric is not None:  # its peer mappings go before the group does
            self.tp.symmetric.close()

    # ---- one step -----------------------------------------------------------------------
    def _init_buffers(self) -> None:
        cfg = self.config
        self.max_blocks_per_seq = -(-cfg.max_model_len // self.block_size)
        max_tokens = max(cfg.max_num_batched_tokens, cfg.max_num_seqs)
        self.buffers = InputBuffers(max_tokens, cfg.max_num_seqs, self.max_blocks_per_seq, self.device)
        self._table_rows: list[tuple[tuple[int, int] | None, int]] = [(None, 0)] * cfg.max_num_seqs

    def prepare_inputs(self, out: SchedulerOutput, pad: GraphShape | None = None) -> ModelInputs:
        """Write the step's inputs into the staging buffers (vectorised numpy) and copy them to
        the device. `pad` pads the step to a captured graph's shape (engine/graph_shapes.py)."""
        buf, bs, seqs = self.buffers, self.block_size, out.seqs
        b = len(seqs)
        q_lens = np.fromiter((len(s.token_ids) for s in seqs), np.int64, b)
        starts = np.fromiter((s.start_pos for s in seqs), np.int64, b)
        num_tokens = int(q_lens.sum())
        width = max(len(s.block_table) for s in seqs)
        tables = self._fill_block_tables(seqs)
        qsl = buf.query_start_loc.np
        qsl[0] = 0
        np.cumsum(q_lens, out=qsl[1 : b + 1])
        seq_of_token = np.repeat(np.arange(b), q_lens)
        positions = np.arange(num_tokens) - np.repeat(qsl[:b], q_lens) + np.repeat(starts, q_lens)
        buf.positions.np[:num_tokens] = positions
        buf.slot_mapping.np[:num_tokens] = tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        buf.input_ids.np[:num_tokens] = np.fromiter(
            (t for s in seqs for t in s.token_ids), np.int64, num_tokens)
        seq_lens = starts + q_lens
        buf.seq_lens.np[:b] = seq_lens
        sample_rows = [i for i, s in enumerate(seqs) if s.sample]
        num_sampled = len(sample_rows)
        buf.logits_indices.np[:num_sampled] = qsl[1:][sample_rows] - 1
        n, rows, num_logits = num_tokens, b, num_sampled
        if pad is not None:
            self._pad(num_tokens, b, num_sampled, pad)
            n, rows = pad.num_tokens, pad.num_seqs
            num_logits = num_sampled if pad.decode else rows  # what the graph's LM head reads
        max_query_len = int(q_lens.max())
        decode_only = max_query_len == 1
        if decode_only:  # padded rows (length 0) sort last
            buf.decode_order.np[:rows] = np.argsort(-buf.seq_lens.np[:rows], kind="stable")
        meta = AttentionMetadata(
            slot_mapping=buf.slot_mapping.copy(n),
            query_start_loc=buf.query_start_loc.copy(rows + 1),
            seq_lens=buf.seq_lens.copy(rows),
            block_tables=self._copy_block_tables(b, width, rows if pad is not None else None),
            max_query_len=max_query_len,
            max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=qsl[: rows + 1].tolist(),
            seq_lens_cpu=buf.seq_lens.np[:rows].tolist(),
            decode_order=buf.decode_order.copy(rows) if decode_only else None,
            persistent=pad.persistent if pad is not None else takes_persistent(
                self.persistent_max_context, b, decode_only, int(seq_lens.max()), self.config.persistent_decode_max_seqs),
        )
        return ModelInputs(
            input_ids=buf.input_ids.copy(n),
            positions=buf.positions.copy(n),
            meta=meta,
            logits_indices=buf.logits_indices.copy(num_logits)[:num_sampled],
            sample_rows=sample_rows,
        )

    def _pad(self, num_tokens: int, num_seqs: int, num_sampled: int, shape: GraphShape) -> None:
        """Padding up to a graph's shape: tokens past the real ones store nothing (slot -1, at
        position 0) and belong to no sequence; sequence rows past the real ones have no queries
        and length 0, so the kernels skip them; padded LM-head rows read token 0."""
        buf, t, s = self.buffers, shape.num_tokens, shape.num_seqs
        if num_tokens > t or num_seqs > s:
            raise RuntimeError(f"a step of {num_tokens} tokens / {num_seqs} sequences does not fit graph {shape}")
        buf.input_ids.np[num_tokens:t] = 0
        buf.positions.np[num_tokens:t] = 0
        buf.slot_mapping.np[num_tokens:t] = -1
        buf.seq_lens.np[num_seqs:s] = 0
        buf.query_start_loc.np[num_seqs + 1 : s + 1] = num_tokens
        if not shape.decode:
            buf.logits_indices.np[num_sampled:s] = 0

    def _fill_block_tables(self, seqs: list[ScheduledSequence]) -> np.ndarray:
        """Write block-table rows into staging, only the entries new since the same sequence last
        sat in that row (a table only grows until its sequence is preempted). Keyed by seq_no,
        which is never reused, unlike request ids."""
        tables, rows = self.buffers.block_tables.np, self._table_rows
        for i, s in enumerate(seqs):
            key, table = (s.seq_no, s.num_preemptions), s.block_table
            prev_key, written = rows[i]
            start = written if prev_key == key else 0
            if start < len(table):
                tables[i, start : len(table)] = table[start:]
                rows[i] = (key, len(table))
        return tables

    def _copy_block_tables(self, b: int, width: int, padded_rows: int | None) -> torch.Tensor:
        table = self.buffers.block_tables.copy(b, width)
        # a graph reads its captured rows at full width: rows past b and columns past width are
        # stale, but no kernel reads them (length-0 sequences; keys past seq_len)
        return table if padded_rows is None else self.buffers.block_tables.gpu[:padded_rows]

    def execute_model(self, out: SchedulerOutput) -> list[int | None]:
        """Run one step; returns the sampled token per scheduled sequence (None: no sample)."""
        return self.execute_model_async(out).result()

    @torch.inference_mode()
    def execute_model_async(self, out: SchedulerOutput) -> PendingSample:
        """Launch one step without waiting for it (on CUDA); `.result()` gives the ids."""
        graph = self.graphs.lookup(out) if self.graphs is not None else None
        inputs = self.prepare_inputs(out, pad=graph.shape if graph else None)
        self._fill_placeholders(out, inputs.input_ids)
        num_sampled = len(inputs.sample_rows)
        if graph is not None:  # its logits rows follow logits_indices (decode: every row samples)
            logits = graph.replay()[:num_sampled]
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, self.backend)
            logits = (self.model.compute_logits(hidden[inputs.logits_indices], gather=self.vocab_shard is None)
                      if num_sampled else None)
        sampled = self._sample(out, inputs.sample_rows, logits) if num_sampled else None
        self._prev_sampled = sampled
        self._prev_rows = {out.seqs[r].seq_no: i for i, r in enumerate(inputs.sample_rows)}
        return PendingSample(sampled if self.tp.rank == 0 else None, inputs.sample_rows, len(out.seqs))

    def _fill_placeholders(self, out: SchedulerOutput, input_ids: torch.Tensor) -> None:
        """Scatter the previous step's sampled ids into this step's inputs, on the device."""
        dst, src = [], []
        offset = 0
        for s in out.seqs:
            offset += len(s.token_ids)
            if s.placeholder:
                dst.append(offset - 1)
                src.append(self._prev_rows[s.seq_no])
        if dst:
            idx = torch.tensor([dst, src], dtype=torch.int64).to(self.device, non_blocking=True)
            input_ids[idx[0]] = self._prev_sampled[idx[1]]

    def _sample(self, out: SchedulerOutput, sample_rows: list[int], logits: torch.Tensor) -> torch.Tensor:
        rows = [out.seqs[i] for i in sample_rows]
        sampling = SamplingMetadata.build(
            [s.sampling_params for s in rows], [s.num_output_tokens for s in rows],
            [s.banned_token_ids for s in rows], self.mc.vocab_size, self.device, self.sampler.rng,
        )
        return self.sampler(logits, sampling, self.vocab_shard)  # [num sampled] int64, on the device
