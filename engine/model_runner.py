"""One model shard on one device: holds the weights and the paged KV cache, turns a
`SchedulerOutput` into tensors, runs the model and samples."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata, get_backend
from engine.config import PRESETS, EngineConfig
from engine.distributed import SINGLE, TensorParallel
from engine.loader import init_dummy_weights, load_checkpoint
from engine.models import get_model_class
from engine.sampler import Sampler, SamplingMetadata
from engine.scheduler import SchedulerOutput

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(config: EngineConfig, rank: int = 0) -> torch.device:
    if config.device == "auto":
        return torch.device(f"cuda:{rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{rank}")
    return device


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[config.dtype]


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


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TensorParallel = SINGLE):
        self.config = config
        self.mc = config.model_config
        self.tp = tp
        self.device = resolve_device(config, tp.rank)
        self.dtype = resolve_dtype(config, self.device)
        self.block_size = config.block_size
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model = self._build_model()
        self.backend = get_backend(config.attention_backend, self.device.type)
        self.sampler = Sampler(config.seed, self.device)
        self.num_kv_heads = self.mc.num_key_value_heads // tp.size
        self.kv_cache: torch.Tensor | None = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _build_model(self) -> torch.nn.Module:
        with torch.device(self.device), _default_dtype(self.dtype):
            model = get_model_class(self.mc.architecture)(self.mc, self.tp)
        if self.config.model in PRESETS:
            init_dummy_weights(model, self.config.seed)
        else:
            load_checkpoint(model, self.config.model)
        return model.eval()

    # ---- KV cache -----------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        elems = 2 * self.mc.num_hidden_layers * self.block_size * self.num_kv_heads * self.mc.head_dim
        return elems * self.dtype.itemsize

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
        n = min(num_tokens, self.config.max_model_len)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        meta = self._metadata(np.full(n, -1), [0, n], [n], np.zeros((1, 1), np.int32), n, n)
        caches = [(self._scratch_cache(), self._scratch_cache())] * self.mc.num_hidden_layers
        with torch.inference_mode():
            hidden = self.model(ids, torch.arange(n, device=self.device), caches, meta, self.backend)
            self.model.compute_logits(hidden[-min(n, self.config.max_num_seqs):])

    def _scratch_cache(self) -> torch.Tensor:
        return torch.zeros(1, self.block_size, self.num_kv_heads, self.mc.head_dim, dtype=self.dtype, device=self.device)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (2, self.mc.num_hidden_layers, num_blocks, self.block_size, self.num_kv_heads, self.mc.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.kv_caches = [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(self.mc.num_hidden_layers)]

    # ---- one step -----------------------------------------------------------------------
    def _metadata(self, slots, qsl: list[int], lens: list[int], tables, max_q: int, max_len: int) -> AttentionMetadata:
        dev = self.device
        return AttentionMetadata(
            slot_mapping=torch.as_tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(dev, non_blocking=True),
            seq_lens=torch.tensor(lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=torch.as_tensor(tables).to(dev, non_blocking=True),
            max_query_len=max_q,
            max_seq_len=max_len,
            query_start_loc_cpu=qsl,
            seq_lens_cpu=lens,
        )

    def prepare_inputs(self, out: SchedulerOutput) -> ModelInputs:
        bs = self.block_size
        chunks = [np.asarray(s.token_ids, dtype=np.int64) for s in out.seqs]
        positions = np.concatenate([np.arange(s.start_pos, s.start_pos + len(s.token_ids)) for s in out.seqs])
        max_blocks = max(len(s.block_table) for s in out.seqs)
        tables = np.zeros((len(out.seqs), max_blocks), dtype=np.int32)
        slots, qsl, lens = [], [0], []
        for i, s in enumerate(out.seqs):
            tables[i, : len(s.block_table)] = s.block_table
            pos = positions[qsl[-1] : qsl[-1] + len(s.token_ids)]
            slots.append(tables[i, pos // bs].astype(np.int64) * bs + pos % bs)
            qsl.append(qsl[-1] + len(s.token_ids))
            lens.append(s.start_pos + len(s.token_ids))
        sample_rows = [i for i, s in enumerate(out.seqs) if s.sample]
        meta = self._metadata(np.concatenate(slots), qsl, lens, tables,
                              max(len(s.token_ids) for s in out.seqs), max(lens))
        return ModelInputs(
            input_ids=torch.from_numpy(np.concatenate(chunks)).to(self.device, non_blocking=True),
            positions=torch.from_numpy(positions).to(self.device, non_blocking=True),
            meta=meta,
            logits_indices=torch.tensor([qsl[i + 1] - 1 for i in sample_rows], device=self.device),
            sample_rows=sample_rows,
        )

    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> list[int | None]:
        """Run one step; returns the sampled token per scheduled sequence (None: no sample)."""
        inputs = self.prepare_inputs(out)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, self.backend)
        if not inputs.sample_rows:
            return [None] * len(out.seqs)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        rows = [out.seqs[i] for i in inputs.sample_rows]
        sampling = SamplingMetadata.build(
            [s.sampling_params for s in rows], [s.num_output_tokens for s in rows],
            [s.banned_token_ids for s in rows], self.mc.vocab_size, self.device,
        )
        token_ids = self.sampler(logits, sampling).tolist()  # the step's one host sync
        result: list[int | None] = [None] * len(out.seqs)
        for row, tok in zip(inputs.sample_rows, token_ids):
            result[row] = tok
        return result
