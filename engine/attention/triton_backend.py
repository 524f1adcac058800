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

`decode_fused` is the fused small-batch path's decode step (engine.models.llama): the decode
kernel also applies the rotary and stores this step's K/V, and merges its own splits.

An fp8 KV cache (EngineConfig.kv_cache_dtype) is the caches' dtype; the kernels see it and pass
k_scale and v_scale (constants, so graphs capture them) to every store and read.
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
from engine.kernels.device_info import num_sms
from engine.kernels.rope import RotaryIn
from engine.kernels.store_kv import store_kvcache
from engine.kernels.unified_attention import unified_attention

MIN_SCRATCH_SEQS = 64  # split-K only runs at small batches; one allocation covers them


class TritonAttention:
    accepts_stored_kv = True  # k = v = None: the rotary kernel already wrote them (engine.kernels.rope)
    fused_decode = True  # decode_fused: rotary, KV store and the split merge inside the decode kernel

    def __init__(self, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        self.k_scale, self.v_scale = k_scale, v_scale  # an fp8 cache's per-tensor scales
        self._checked: set[str] = set()  # kernels whose arguments were validated once
        self._scratch: DecodeScratch | None = None

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
            store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping, check="store" not in self._checked,
                          k_scale=self.k_scale, v_scale=self.v_scale)
        out = torch.empty_like(q)
        path = "decode" if meta.is_decode_only else "unified"
        check = path not in self._checked
        if meta.is_decode_only:
            self._decode(q, k_cache, v_cache, out, meta, scale, check)
        else:
            unified_attention(q, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens,
                              meta.block_tables, meta.max_query_len, meta.max_seq_len, scale,
                              check=check, k_scale=self.k_scale, v_scale=self.v_scale)
        if check:
            self._checked.update(("store", path))
        return out

    def decode_fused(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                     rotary: RotaryIn | None, merge: bool) -> torch.Tensor:  # [B, Hq, D]
        """A decode-only step in one kernel where the usual path launches up to three (the fused
        small-batch path, engine.models.llama): with `rotary`, q [B, Hq, D] and k, v [B, Hkv, D]
        are the qkv projection's raw views, and the decode kernel applies the q/k norm and rotary
        and stores K and V itself; without it, q is rotated, and K and V are stored here unless
        already (k = v = None). `merge`: the decode kernel merges its splits (no reduce kernel)."""
        if rotary is None and k is not None:
            store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping, check="store" not in self._checked,
                          k_scale=self.k_scale, v_scale=self.v_scale)
            self._checked.add("store")
        path = "decode_rotary" if rotary is not None else "decode"
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # q may be a strided view
        new_kv = (k, v, meta.slot_mapping) if rotary is not None else None
        self._decode(q, k_cache, v_cache, out, meta, scale, path not in self._checked, rotary, new_kv, merge)
        self._checked.add(path)
        return out

    def _decode(self, q, k_cache, v_cache, out, meta: AttentionMetadata, scale: float, check: bool,
                rotary: RotaryIn | None = None, new_kv: tuple | None = None, merge: bool = False) -> None:
        num_seqs = meta.num_seqs
        splits = choose_num_splits(num_seqs, k_cache.shape[2], meta.max_seq_len, num_sms(q.device))
        scratch = self._get_scratch(num_seqs, q.shape[1], q.shape[2], q.device) if splits > 1 else None
        decode_attention(q, k_cache, v_cache, out, meta.seq_lens, meta.block_tables, scale, splits, scratch,
                         check=check, rotary=rotary, new_kv=new_kv, merge=merge, k_scale=self.k_scale,
                         v_scale=self.v_scale, order=meta.decode_order if splits == 1 else None)
