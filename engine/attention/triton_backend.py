"""Triton attention backend: store this step's K/V, then split-K decode or unified attention.

Called once per layer (28 times a step for Qwen3-0.6B), so the Python here stays minimal: no
.item()/.tolist(), argument checks only on the first call (they catch dtype/layout mistakes,
which do not change between steps), and the decode scratch cached on the instance.

CUDA graphs: num_splits is a plain int from meta.num_seqs and meta.max_seq_len. The graph
capturer must pass max_seq_len = max_model_len (and num_seqs = the padded bucket size) when it
captures, so the captured split count suits any length the graph will replay with; the real
lengths are read from meta.seq_lens on device. Call reserve() with the largest bucket before
capturing so the scratch is not allocated inside a capture. Prefill graphs (engine/graph_shapes.py)
pass max_query_len = the padded token count T: the unified path, with both tile launches when
T > SMALL_Q_MAX (each program then keeps or skips its sequence by q_len on the device).
"""

from __future__ import annotations

import torch

from engine.attention.metadata import AttentionMetadata
from engine.kernels.decode_attention import (
    DecodeScratch,
    alloc_decode_scratch,
    choose_num_splits,
    decode_attention,
)
from engine.kernels.store_kv import store_kvcache
from engine.kernels.unified_attention import unified_attention

MIN_SCRATCH_SEQS = 64  # split-K only runs at small batches; one allocation covers them


class TritonAttention:
    accepts_stored_kv = True  # k = v = None: the rotary kernel already wrote them (engine.kernels.rope)

    def __init__(self) -> None:
        self._checked: set[str] = set()  # kernels whose arguments were validated once
        self._scratch: DecodeScratch | None = None
        self._num_sms: int | None = None

    def reserve(self, max_seqs: int, num_heads: int, head_dim: int, device: torch.device) -> None:
        """Allocate the decode scratch up front (before CUDA graph capture)."""
        self._get_scratch(max_seqs, num_heads, head_dim, device)

    def warmup(self, num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, max_seqs: int) -> None:
        pass  # Triton compiles in under a second per kernel; LLMEngine.warm_up covers the step kinds

    def _get_scratch(self, num_seqs: int, num_heads: int, head_dim: int,
                     device: torch.device) -> DecodeScratch:
        s = self._scratch
        if (s is None or s.max_seqs < num_seqs or s.acc.device != device
                or s.acc.shape[1] != num_heads or s.acc.shape[3] != head_dim):
            s = alloc_decode_scratch(max(num_seqs, MIN_SCRATCH_SEQS), num_heads, head_dim, device)
            self._scratch = s
        return s

    def _sms(self, device: torch.device) -> int:
        if self._num_sms is None:
            on_gpu = device.type == "cuda"
            self._num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                             if on_gpu else 132)
        return self._num_sms

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor | None,  # [T, Hkv, D]; None with v: this step's K/V are in the caches
        v: torch.Tensor | None,  # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        if k is not None:
            store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping, check="store" not in self._checked)
        out = torch.empty_like(q)
        path = "decode" if meta.is_decode_only else "unified"
        check = path not in self._checked
        if meta.is_decode_only:
            num_seqs = meta.num_seqs
            splits = choose_num_splits(num_seqs, k_cache.shape[2], meta.max_seq_len,
                                       self._sms(q.device))
            scratch = (self._get_scratch(num_seqs, q.shape[1], q.shape[2], q.device)
                       if splits > 1 else None)
            decode_attention(q, k_cache, v_cache, out, meta.seq_lens, meta.block_tables, scale,
                             splits, scratch, check=check)
        else:
            unified_attention(q, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens,
                              meta.block_tables, meta.max_query_len, meta.max_seq_len, scale,
                              check=check)
        if check:
            self._checked.update(("store", path))
        return out
