"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.distributed import SINGLE, TensorParallel

if TYPE_CHECKING:
    from engine.kernels.skinny_gemm import NormIn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, tp: TensorParallel = SINGLE):
        """norm(x), or with `residual` (norm(x + residual), x + residual). With `tp`, x holds
        this rank's partial sums of a row-parallel layer: they are summed over the ranks first,
        in the same kernel where the GPUs share symmetric memory. x may also be a small-batch
        projection's split-K partial sums [S, N, H] (fp32, GPU, with a residual)."""
        if residual is not None and x.dim() == residual.dim() + 1:
            from engine.kernels.skinny_gemm import partials_rmsnorm

            return partials_rmsnorm(x, self.weight, self.eps, residual)
        if tp.size > 1:
            if residual is not None and (fused := tp.all_reduce_rmsnorm(x, residual, self.weight, self.eps)):
                return fused
            x = tp.all_reduce(x)
        if x.is_cuda and x.dim() == 2:
            from engine.kernels.rmsnorm import rmsnorm  # triton only where CUDA is

            return rmsnorm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def prologue(self, residual: torch.Tensor | None = None) -> NormIn:
        """This norm (of x + residual) as the prologue of a projection's skinny-GEMM kernel."""
        from engine.kernels.skinny_gemm import NormIn

        return NormIn(self.weight, self.eps, residual)
