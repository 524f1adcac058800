"""SiLU(gate) * up for the gated MLP: a fused Triton kernel on CUDA, torch elsewhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [N, 2 * I] -> [N, I]
    if x.is_cuda:
        from engine.kernels.silu_mul import silu_mul

        return silu_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
