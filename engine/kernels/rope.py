"""Per-head q/k RMSNorm (Qwen3) and rotary embedding in one kernel: q and k are read once from
the fused qkv projection output (strided views) and written contiguous for attention."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_cos,
    num_q_heads, eps,
    NORM: tl.constexpr, HALF: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
):
    tok = tl.program_id(0)
    head = tl.program_id(1)  # q heads first, then k heads
    is_q = head < num_q_heads
    d = tl.arange(0, HALF)
    if is_q:
        src = q_ptr + tok * stride_q_t + head * stride_q_h
        dst = q_out_ptr + (tok * num_q_heads + head) * 2 * HALF
        w_ptr = qw_ptr
    else:
        kh = head - num_q_heads
        src = k_ptr + tok * stride_k_t + kh * stride_k_h
        dst = k_out_ptr + (tok * NUM_KV_HEADS + kh) * 2 * HALF
        w_ptr = kw_ptr
    x1 = tl.load(src + d)
    x2 = tl.load(src + HALF + d)
    dtype = x1.dtype
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / (2 * HALF) + eps)
        a = (a * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + d).to(tl.float32)
        b = (b * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + HALF + d).to(tl.float32)
    pos = tl.load(pos_ptr + tok)
    c = tl.load(cos_ptr + pos * stride_cos + d)
    s = tl.load(sin_ptr + pos * stride_cos + d)
    tl.store(dst + d, (a * c - b * s).to(dtype))
    tl.store(dst + HALF + d, (b * c + a * s).to(dtype))


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D] (last dim contiguous, any token/head strides); cos/sin
    [max_pos, D] fp32 in rotate-half layout. Returns contiguous (q, k)."""
    t, hq, dim = q.shape
    hkv = k.shape[1]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or dim % 2 or (dim & (dim - 1)):
        raise ValueError(f"qk_norm_rope needs a contiguous power-of-two head dim, got q {tuple(q.shape)}")
    q_out = torch.empty((t, hq, dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hkv, dim), dtype=k.dtype, device=k.device)
    norm = q_weight is not None
    _qk_norm_rope_kernel[(t, hq + hkv)](
        q, k, q_out, k_out, q_weight if norm else q, k_weight if norm else k, cos, sin, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), hq, eps,
        NORM=norm, HALF=dim // 2, NUM_KV_HEADS=hkv,
    )
    return q_out, k_out
