"""Tiles of the small-batch skinny GEMM (engine/kernels/skinny_gemm.py): what a call looks like
(`GemvProblem`), a tile (`GemvConfig`, also parsed from the command line of
harness/kernels/bench_gemv.py, which times them) and the default choice (`choose_config`).
Kept apart from the kernel so that the tuning lives in one small place."""

from __future__ import annotations

from dataclasses import dataclass, replace

import triton

# Shared memory a tensor-core config's software pipeline may take (sm_90 gives a block 227 KB;
# Triton adds its own scratch on top, and two blocks per SM keep more bytes in flight)
SMEM_BUDGET = 112 << 10


@dataclass(frozen=True)
class GemvProblem:
    """What the tile choice depends on: m rows, n_out output features (gate and up count once),
    reduction length k, the weight's element size, and the bytes loaded per x element of a K
    step (fp32 partials: 4 each, plus the residual's)."""

    m: int
    n_out: int
    k: int
    itemsize: int = 2
    x_bytes: int = 2
    gated: bool = False
    can_split: bool = False  # the caller takes fp32 partial sums


@dataclass(frozen=True)
class GemvConfig:
    """A tile: BLOCK_M rows of x (>= 16: tensor cores), BLOCK_N features, BLOCK_K of K per
    iteration; SPLIT_K programs share each feature tile's K."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two, got {v}")
        if self.use_dot and min(self.block_n, self.block_k) < 16:
            raise ValueError(f"a tensor-core tile (block_m >= 16) needs block_n and block_k >= 16, got {self}")
        if self.num_stages < 1 or self.split_k < 1:
            raise ValueError(f"num_stages and split_k must be >= 1, got {self}")

    @property
    def use_dot(self) -> bool:
        return self.block_m >= 16

    def pipelined_bytes(self, p: GemvProblem) -> int:
        """Shared memory of the tensor-core path's pipeline: num_stages - 1 buffers of every tile
        the K loop loads (the x side too: it is an L2 hit, but Triton pipelines every load of the
        loop). The CUDA-core path keeps its tiles in registers."""
        if not self.use_dot:
            return 0
        per_k = self.block_n * p.itemsize * (2 if p.gated else 1) + self.block_m * p.x_bytes
        return (self.num_stages - 1) * self.block_k * per_k

    @classmethod
    def parse(cls, text: str) -> GemvConfig:
        """'block_m,block_n,block_k,warps,stages[,split_k]', e.g. '1,8,512,4,3' or '16,16,128,4,4,2'."""
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            values = []
        if len(values) not in (5, 6):
            raise ValueError(f"a GEMV config is block_m,block_n,block_k,warps,stages[,split_k]; got {text!r}")
        return cls(*values)


def choose_config(p: GemvProblem, num_sms: int) -> GemvConfig:
    """The default tile: one row on CUDA cores, more on tensor cores (rows padded to 16) with as
    many pipeline stages as fit SMEM_BUDGET; split-K only where the caller takes partial sums and
    the feature tiles alone would leave half the SMs idle."""
    if p.m == 1:
        cfg = GemvConfig(1, 8, min(512, triton.next_power_of_2(p.k)), 4, 1)
    else:
        cfg = GemvConfig(max(16, triton.next_power_of_2(p.m)), 16, 256 // p.itemsize, 4, 4)
        while cfg.num_stages > 2 and cfg.pipelined_bytes(p) > SMEM_BUDGET:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
    tiles, split = triton.cdiv(p.n_out, cfg.block_n), 1
    while p.can_split and tiles * split < num_sms // 2 and p.k // (2 * split) >= 2 * cfg.block_k:
        split *= 2
    return replace(cfg, split_k=split)
