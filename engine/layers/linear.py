"""Linear layers sharded the Megatron way. Each parameter carries a `weight_loader` that takes
the full (unsharded) checkpoint tensor and copies this rank's slice into place.

`forward_fused` is the small-batch GPU path (TP=1): one skinny-GEMM kernel that can take the
RMSNorm before the projection (a `NormIn`, from RMSNorm.prologue) and SiLU * up after it, and
leave split-K partial sums to the next norm (engine/kernels/skinny_gemm.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import SINGLE, TensorParallel

if TYPE_CHECKING:
    from engine.kernels.skinny_gemm import NormIn


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _copy(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter {tuple(param.shape)}")
    param.data.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split across ranks; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.out_per_rank = tp.shard(out_features, "output features")
        self.weight = _param(self.out_per_rank, in_features)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(self.out_per_rank) if bias else None
        if bias:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        n = param.shape[0]
        _copy(param, loaded.narrow(0, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward_fused(self, x: torch.Tensor, norm: NormIn | None = None, gated: bool = False,
                      pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(y, residual): y = norm(x) W^T + b, and with `gated` SiLU(gate) * up of it ([T, out / 2]);
        x: [T, in] or fp32 partial sums [S, T, in] (with `norm`); residual: the norm's new one.
        `pdl`: launched as a programmatic dependent (skinny_gemm)."""
        from engine.kernels.skinny_gemm import skinny_gemm  # triton only where CUDA is

        return skinny_gemm(x, self.weight, self.bias, norm, gated, pdl=pdl)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused into one matmul (gate_up_proj)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False, tp: TensorParallel = SINGLE):
        for size in out_sizes:  # each part is split on its own, so each must divide
            tp.shard(size, "output features of a merged projection")
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        i = int(shard_id)
        size = self.out_sizes[i] // self.tp.size
        offset = sum(self.out_sizes[:i]) // self.tp.size
        _copy(param.data.narrow(0, offset, size), loaded.narrow(0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; heads are split across ranks."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: TensorParallel = SINGLE):
        self.head_dim = head_dim
        self.num_heads = tp.shard(num_heads, "num_attention_heads")
        self.num_kv_heads = tp.shard(num_kv_heads, "num_key_value_heads")
        super().__init__(hidden, (num_heads + 2 * num_kv_heads) * head_dim, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        _copy(param.data.narrow(0, offset, size), loaded.narrow(0, self.tp.rank * size, size))


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split across ranks; partial sums are all-reduced, or
    with `reduce=False` returned as they are for the RMSNorm that follows to sum (fused with
    it on GPUs). `slot` picks that fused path's partial-sum buffer: successive row-parallel
    layers of a model must alternate 0 and 1."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TensorParallel = SINGLE,
                 reduce: bool = True, slot: int = 0):
        super().__init__()
        if bias and not reduce:
            raise ValueError("a row-parallel bias must be added after the sum: use reduce=True")
        self.tp, self.reduce, self.slot = tp, reduce, slot
        self.in_per_rank = tp.shard(in_features, "input features")
        self.weight = _param(out_features, self.in_per_rank)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(out_features) if bias else None
        if bias:
            self.bias.weight_loader = lambda p, w, s=None: _copy(p, w)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        n = param.shape[1]
        _copy(param, loaded.narrow(1, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduce:
            out = self.tp.partial_out(x.shape[0], self.weight.shape[0], x.dtype, self.slot) if x.dim() == 2 else None
            return F.linear(x, self.weight) if out is None else torch.mm(x, self.weight.t(), out=out)
        y = F.linear(x, self.weight)
        self.tp.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y

    def forward_fused(self, x: torch.Tensor, pdl: bool = False) -> torch.Tensor:
        """x W^T for one rank (TP=1, no bias): [T, out], or fp32 split-K partial sums [S, T, out]
        that the norm after this layer sums (RMSNorm.prologue, RMSNorm.forward)."""
        if self.tp.size > 1 or self.bias is not None or self.reduce:
            raise ValueError("RowParallelLinear.forward_fused is for TP=1 layers that leave their sum to a norm")
        from engine.kernels.skinny_gemm import skinny_gemm

        return skinny_gemm(x, self.weight, split_ok=True, pdl=pdl)[0]
