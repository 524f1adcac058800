"""Rotary position embedding (the rotate-half form HF uses), with Llama-3 frequency scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.kernels.rope import KVStore, RotaryIn


def _inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    # float32 from an int64 arange, as HF computes it, so fp32 runs match token for token
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None):
        super().__init__()
        inv_freq = _inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        # [max_positions, head_dim] cos and sin, each half repeated (rotate-half layout)
        self.register_buffer("cos", torch.cat([freqs.cos(), freqs.cos()], -1), persistent=False)
        self.register_buffer("sin", torch.cat([freqs.sin(), freqs.sin()], -1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                q_norm: nn.Module | None = None, k_norm: nn.Module | None = None, store: KVStore | None = None):
        """q: [T, Hq, D], k: [T, Hkv, D]; optional per-head RMSNorms (Qwen3) applied first.
        `store` (GPU only): K goes into the paged cache with V instead of being returned (None in
        its place)."""
        if q.is_cuda:
            from engine.kernels.rope import qk_norm_rope  # one fused kernel on the GPU

            return qk_norm_rope(q, k, positions, self.cos, self.sin, q_norm.weight if q_norm else None,
                                k_norm.weight if k_norm else None, q_norm.eps if q_norm else 0.0, store)
        if store is not None:
            raise ValueError("RotaryEmbedding: storing K/V into the cache is a GPU kernel path")
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _apply(q, cos, sin), _apply(k, cos, sin)

    def prologue(self, positions: torch.Tensor, q_norm: nn.Module | None = None,
                 k_norm: nn.Module | None = None) -> RotaryIn:
        """This rotary (after the per-head norms, if any) for a kernel that reads raw q and k:
        the decode attention kernel of the fused small-batch path."""
        return RotaryIn(positions, self.cos, self.sin, q_norm.weight if q_norm else None,
                        k_norm.weight if k_norm else None, q_norm.eps if q_norm else 0.0)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
