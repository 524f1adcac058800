"""Store this step's new K and V rows into the paged KV cache (one program per token).

The cache is NHD per layer: [num_blocks, block_size, num_kv_heads, head_dim], so one token's
K is one contiguous Hkv*D row when the cache is contiguous. Slot s lives at block s // bs,
offset s % bs; slot -1 marks a padded token (CUDA-graph lanes, skipped prefix tokens). An fp8
cache stores x / scale in 8 bits (engine/kernels/kv_quant.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.dtypes import DTYPES, is_fp8
from engine.kernels.kv_quant import to_cache


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr,  # [T, Hkv, D]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    slot_ptr,  # [T] int64
    k_scale, v_scale,  # fp8 caches only: stored = x / scale
    stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_kc_b, stride_kc_s, stride_kc_h,
    stride_vc_b, stride_vc_s, stride_vc_h,
    BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    H_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:  # padded token: nothing to write
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    # [H_PAD, D_PAD] tile = the whole token; d has stride 1, so loads/stores vectorize.
    src_k = tok * stride_k_t + h * stride_k_h + d
    src_v = tok * stride_v_t + h * stride_v_h + d
    dst_k = blk * stride_kc_b + off * stride_kc_s + h * stride_kc_h + d
    dst_v = blk * stride_vc_b + off * stride_vc_s + h * stride_vc_h + d
    tl.store(k_cache_ptr + dst_k, to_cache(tl.load(k_ptr + src_k, mask=mask), k_scale, k_cache_ptr), mask=mask)
    tl.store(v_cache_ptr + dst_v, to_cache(tl.load(v_ptr + src_v, mask=mask), v_scale, v_cache_ptr), mask=mask)


def check_store_args(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [num_tokens, num_kv_heads, head_dim]; got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, "
                         f"head_dim]; got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"cache (num_kv_heads, head_dim) {tuple(k_cache.shape[2:])} does not "
                         f"match k/v {tuple(k.shape[1:])}")
    check_cache_dtypes(k.dtype, v.dtype, k_cache.dtype, v_cache.dtype, "k, v")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be int64 [{k.shape[0]}]; got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if any(t.stride(-1) != 1 for t in (k, v, k_cache, v_cache)):
        raise ValueError("k, v, k_cache and v_cache need a contiguous last (head_dim) dimension")
    devices = {t.device for t in (k, v, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(map(str, devices))}")


def check_cache_dtypes(x_dtype: torch.dtype, y_dtype: torch.dtype, k_cache_dtype: torch.dtype,
                       v_cache_dtype: torch.dtype, names: str) -> None:
    """The two activations (`names`) share a DTYPES dtype, and the two caches share either it
    or an fp8 dtype (kv_cache_dtype)."""
    if x_dtype != y_dtype or x_dtype not in DTYPES.values():
        raise ValueError(f"{names} must share one dtype of {', '.join(DTYPES)}; got {x_dtype}, {y_dtype}")
    if k_cache_dtype != v_cache_dtype or (k_cache_dtype != x_dtype and not is_fp8(k_cache_dtype)):
        raise ValueError(f"k_cache and v_cache must share one dtype, {names}'s ({x_dtype}) or an fp8 one; "
                         f"got {k_cache_dtype}, {v_cache_dtype}")


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, check: bool = True, k_scale: float = 1.0,
                  v_scale: float = 1.0) -> None:
    """k, v: [T, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; slot_mapping: [T]
    int64, -1 = skip. Writes in place; no host sync, so it is safe inside a CUDA graph. An fp8
    cache stores k / k_scale and v / v_scale (the scales are ignored otherwise)."""
    if check:
        check_store_args(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        H_PAD=triton.next_power_of_2(num_kv_heads), D_PAD=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
