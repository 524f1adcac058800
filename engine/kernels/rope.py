"""Per-head q/k RMSNorm (Qwen3) and rotary embedding in one kernel: q and k are read once from
the fused qkv projection output (strided views); q is written contiguous for attention, and k
either contiguous too or, with `store`, straight into the paged KV cache beside this step's V
(the separate store kernel and its re-read of k are saved: one kernel fewer per layer). An fp8
cache gets the rotated k rounded to the activation dtype first, then k / k_scale in 8 bits: the
bits the store kernel would write (engine/kernels/kv_quant.py).

`norm_rope` is the same math for a kernel that holds whole heads in one tile (the decode
attention kernel's prologue, engine/kernels/decode_attention.py, given a `RotaryIn`)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.kernels.kv_quant import to_cache
from engine.kernels.store_kv import check_store_args


@triton.jit
def _norm_rope_heads(src, stride_h, dst, dst_stride_h, slot, w_ptr, c, s, eps, dst_scale, NORM: tl.constexpr,
                     HALF: tl.constexpr, NUM_HEADS: tl.constexpr, H_PAD: tl.constexpr):
    """Every head of one token: src rows at stride_h, dst rows at dst_stride_h, written unless
    slot < 0 (a padded token's cache slot); an fp8 dst (the K cache) stores x / dst_scale."""
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, HALF)
    ok = (h < NUM_HEADS)[:, None]
    keep = ok & ((h * 0 + slot) >= 0)[:, None]  # a vector: the interpreter rejects scalar masks here
    ptr = src + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(ptr, mask=ok, other=0.0)
    x2 = tl.load(ptr + HALF, mask=ok, other=0.0)
    dtype = x1.dtype
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / (2 * HALF) + eps)
        # rounded to the activation dtype before the weight, as HF's Qwen3RMSNorm does
        a = (a * rstd[:, None]).to(dtype).to(tl.float32) * tl.load(w_ptr + d).to(tl.float32)[None, :]
        b = (b * rstd[:, None]).to(dtype).to(tl.float32) * tl.load(w_ptr + HALF + d).to(tl.float32)[None, :]
    out = dst + h[:, None] * dst_stride_h + d[None, :]
    tl.store(out, to_cache((a * c - b * s).to(dtype), dst_scale, dst), mask=keep)
    tl.store(out + HALF, to_cache((b * c + a * s).to(dtype), dst_scale, dst), mask=keep)


class RotaryIn(NamedTuple):
    """Rotary embedding, with Qwen3's per-head q/k RMSNorm first, for a kernel to apply to the raw
    q and k it reads (RotaryEmbedding.prologue builds it)."""

    positions: torch.Tensor  # [T] int64
    cos: torch.Tensor  # [max_positions, D] fp32, rotate-half layout (each half repeated)
    sin: torch.Tensor
    q_weight: torch.Tensor | None  # [D]; None: no q/k norm
    k_weight: torch.Tensor | None
    eps: float



class KVStore(NamedTuple):
    """Where a rotary kernel puts this step's K (and copies V): the paged caches, at the slots."""

    v: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = skip
    k_scale: float = 1.0  # fp8 caches only: they store k / k_scale and v / v_scale
    v_scale: float = 1.0



@triton.jit
def norm_rope(src, mask, w_ptr, cos_row, sin_row, eps, NORM: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Whole heads at src + d (src: a pointer or a column of pointers [R, 1], one per head; mask
    broadcasts with src + d): RMSNorm over each head when NORM, then rotate-half rotary with the
    tables' rows at cos_row / sin_row. Returns [.., HEAD_DIM] in src's dtype (zeros where masked),
    with _norm_rope_heads' operations and roundings: element d pairs with d +- HEAD_DIM / 2 and
    the formulas of both halves are written out as there."""
    half: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM)
    partner = (d + half) % HEAD_DIM
    a = tl.load(src + d, mask=mask, other=0.0)
    dtype = a.dtype
    a = a.to(tl.float32)
    b = tl.load(src + partner, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(a * a, axis=-1, keep_dims=True) / HEAD_DIM + eps)
        a = (a * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + d).to(tl.float32)
        b = (b * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + partner).to(tl.float32)
    c = tl.load(cos_row + d)
    s = tl.load(sin_row + d)
    # first half: a * c - (its partner) * s; second half: a * c + (its partner) * s
    return tl.where(d < half, a * c - b * s, a * c + b * s).to(dtype)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr,
    v_ptr, v_cache_ptr, slot_ptr,  # STORE only: k_out_ptr is then the K cache
    k_scale, v_scale,  # STORE into fp8 caches only: stored = x / scale
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_cos, eps,
    stride_v_t, stride_v_h, stride_c_b, stride_c_s, stride_c_h,  # STORE only (both caches)
    NORM: tl.constexpr, HALF: tl.constexpr, NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr, STORE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    # One program per token, all its heads: a program per (token, head) moved 256 bytes each,
    # and at prefill sizes (8192 tokens x 24 heads) ran 4x under the copy bandwidth.
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok)
    d = tl.arange(0, HALF)
    c = tl.load(cos_ptr + pos * stride_cos + d)[None, :]
    s = tl.load(sin_ptr + pos * stride_cos + d)[None, :]
    _norm_rope_heads(q_ptr + tok * stride_q_t, stride_q_h, q_out_ptr + tok * (NUM_Q_HEADS * 2 * HALF), 2 * HALF,
                     0, qw_ptr, c, s, eps, 1.0, NORM, HALF, NUM_Q_HEADS, HQ_PAD)
    if STORE:
        slot = tl.load(slot_ptr + tok)  # -1: a padded token, nothing stored
        at = tl.maximum(slot, 0)
        row = (at // BLOCK_SIZE) * stride_c_b + (at % BLOCK_SIZE) * stride_c_s
        _norm_rope_heads(k_ptr + tok * stride_k_t, stride_k_h, k_out_ptr + row, stride_c_h, slot,
                         kw_ptr, c, s, eps, k_scale, NORM, HALF, NUM_KV_HEADS, HKV_PAD)
        h = tl.arange(0, HKV_PAD)
        dd = tl.arange(0, 2 * HALF)[None, :]
        ok = (h < NUM_KV_HEADS)[:, None]
        v = tl.load(v_ptr + tok * stride_v_t + h[:, None] * stride_v_h + dd, mask=ok)
        tl.store(v_cache_ptr + row + h[:, None] * stride_c_h + dd, to_cache(v, v_scale, v_cache_ptr),
                 mask=ok & ((h * 0 + slot) >= 0)[:, None])
    else:
        _norm_rope_heads(k_ptr + tok * stride_k_t, stride_k_h, k_out_ptr + tok * (NUM_KV_HEADS * 2 * HALF),
                         2 * HALF, 0, kw_ptr, c, s, eps, 1.0, NORM, HALF, NUM_KV_HEADS, HKV_PAD)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                 eps: float, store: KVStore | tuple | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [T, Hq, D], k [T, Hkv, D] (last dim contiguous, any token/head strides); cos/sin
    [max_pos, D] fp32 in rotate-half layout. Returns contiguous (q, k), or with `store` (q, None):
    the rotated K and this step's V are then written into the caches at their slots. `store` is
    the attention layer's KVStore (v, k_cache, v_cache, slot_mapping, k_scale, v_scale); the
    scales apply to fp8 caches."""
    t, hq, dim = q.shape
    hkv = k.shape[1]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or dim % 2 or (dim & (dim - 1)):
        raise ValueError(f"qk_norm_rope needs a contiguous power-of-two head dim, got q {tuple(q.shape)}")
    if store is not None:
        store = KVStore(*store)  # the scales default to 1.0
        check_store_args(k, *store[:4])
        if store[1].stride() != store[2].stride():
            raise ValueError("qk_norm_rope: k_cache and v_cache need the same strides")
    q_out = torch.empty((t, hq, dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hkv, dim), dtype=k.dtype, device=k.device) if store is None else None
    norm = q_weight is not None
    if t == 0:
        return q_out, k_out
    v, k_dst, v_dst, slots, k_scale, v_scale = store if store is not None else (k, k_out, k_out, positions, 1.0, 1.0)
    _qk_norm_rope_kernel[(t,)](
        q, k, q_out, k_dst, q_weight if norm else q, k_weight if norm else k, cos, sin, positions,
        v, v_dst, slots, k_scale, v_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), eps,
        v.stride(0), v.stride(1), *(v_dst.stride()[:3] if store is not None else (0, 0, 0)),
        NORM=norm, HALF=dim // 2, NUM_Q_HEADS=hq, NUM_KV_HEADS=hkv,
        HQ_PAD=triton.next_power_of_2(hq), HKV_PAD=triton.next_power_of_2(hkv),
        STORE=store is not None, BLOCK_SIZE=store[1].shape[1] if store is not None else 1,
        num_warps=4 if hq * dim >= 2048 else 1,
    )
    return q_out, k_out
