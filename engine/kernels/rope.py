"""Per-head q/k RMSNorm (Qwen3) and rotary embedding in one kernel: q and k are read once from
the fused qkv projection output (strided views) and written contiguous for attention."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_heads(src, stride_h, dst, w_ptr, c, s, eps, NORM: tl.constexpr, HALF: tl.constexpr,
                     NUM_HEADS: tl.constexpr, H_PAD: tl.constexpr):
    """Every head of one token: src rows at stride_h, dst contiguous [NUM_HEADS, 2 * HALF]."""
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, HALF)
    ok = (h < NUM_HEADS)[:, None]
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
    out = dst + h[:, None] * (2 * HALF) + d[None, :]
    tl.store(out, (a * c - b * s).to(dtype), mask=ok)
    tl.store(out + HALF, (b * c + a * s).to(dtype), mask=ok)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_cos, eps,
    NORM: tl.constexpr, HALF: tl.constexpr, NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
):
    # One program per token, all its heads: a program per (token, head) moved 256 bytes each,
    # and at prefill sizes (8192 tokens x 24 heads) ran 4x under the copy bandwidth.
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok)
    d = tl.arange(0, HALF)
    c = tl.load(cos_ptr + pos * stride_cos + d)[None, :]
    s = tl.load(sin_ptr + pos * stride_cos + d)[None, :]
    _norm_rope_heads(q_ptr + tok * stride_q_t, stride_q_h, q_out_ptr + tok * (NUM_Q_HEADS * 2 * HALF),
                     qw_ptr, c, s, eps, NORM, HALF, NUM_Q_HEADS, HQ_PAD)
    _norm_rope_heads(k_ptr + tok * stride_k_t, stride_k_h, k_out_ptr + tok * (NUM_KV_HEADS * 2 * HALF),
                     kw_ptr, c, s, eps, NORM, HALF, NUM_KV_HEADS, HKV_PAD)


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
    if t == 0:
        return q_out, k_out
    _qk_norm_rope_kernel[(t,)](
        q, k, q_out, k_out, q_weight if norm else q, k_weight if norm else k, cos, sin, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), eps,
        NORM=norm, HALF=dim // 2, NUM_Q_HEADS=hq, NUM_KV_HEADS=hkv,
        HQ_PAD=triton.next_power_of_2(hq), HKV_PAD=triton.next_power_of_2(hkv),
        num_warps=4 if hq * dim >= 2048 else 1,
    )
    return q_out, k_out
