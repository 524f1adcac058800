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
    iteration; SPLIT_K programs share each feature tile's K. num_stages: tensor-core tiles, the
    depth of Triton's software pipeline; CUDA-core tiles, weight tiles in flight in registers
    (`prefetch`: 1, or 2 from num_stages >= 2). norm_first: a norm prologue computes rstd in a pass
    of its own before the K loop (the old kernel; split K always does) instead of along it."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    norm_first: bool = False

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

    @property
    def prefetch(self) -> int:
        """CUDA-core tiles: weight tiles loaded ahead of the one being multiplied."""
        return 1 if self.num_stages <= 1 else 2

    def pipelined_bytes(self, p: GemvProblem) -> int:
        """Shared memory of the tensor-core path's pipeline: num_stages - 1 buffers of every tile
        the K loop loads (the x side too: it is an L2 hit, but Triton pipelines every load of the
        loop). The CUDA-core path keeps its tiles in registers."""
        if not self.use_dot:
            return 0
        per_k = self.block_n * p.itemsize * (2 if p.gated else 1) + self.block_m * p.x_bytes
        return (self.num_stages - 1) * self.block_k * per_k

    def text(self) -> str:
        """The form `parse` reads."""
        head = f"{self.block_m},{self.block_n},{self.block_k},{self.num_warps},{self.num_stages},{self.split_k}"
        return head + (",first" if self.norm_first else "")

    @classmethod
    def parse(cls, text: str) -> GemvConfig:
        """'block_m,block_n,block_k,warps,stages[,split_k[,first]]', e.g. '1,8,512,4,3' or
        '16,16,128,4,4,1,first' (`first`: norm_first)."""
        parts = text.split(",")
        first = parts[-1].strip() == "first" and len(parts) == 7
        try:
            values = [int(v) for v in (parts[:-1] if first else parts)]
        except ValueError:
            values = []
        if len(values) not in (5, 6):
            raise ValueError(f"a GEMV config is block_m,block_n,block_k,warps,stages[,split_k[,first]]; got {text!r}")
        return cls(*values[:5], split_k=values[5] if len(values) == 6 else 1, norm_first=first)


# Weights at least this big stream long enough for bandwidth to matter more than latency: the
# one-row tile keeps two weight tiles in flight (prefetch 2) instead of one
BIG_WEIGHT_BYTES = 16 << 20
# Tensor-core tiles: feature widths tried, the deepest pipeline, the most K splits, and the rows
# up to which K may split (the partials go to the norm after the projection, which reads S of them
# per x element). o_proj and down_proj of qwen3-0.6b at 2-32 rows: split 4 makes 128 programs of
# 32 features where unsplit tiles fill a quarter of the SMs: decode steps 2-7% faster on an H200
# than with split 2 up to 4 rows and no split above (reports/PERF.md row 49); at 48 and 64 rows
# 4-5% faster than cuBLAS (row 51)
DOT_BLOCK_N = (64, 32, 16)
MAX_STAGES = 6
MAX_SPLIT = 4
SPLIT_MAX_ROWS = 64
# dot_cost's constants (a model to rank tiles, checked by `llmbench kernels bench-gemv`): weight
# bytes one SM must keep in flight to draw its share of HBM bandwidth (H200: 4.8 TB/s / 132 SMs x
# ~1.3 us of loaded latency), the shared memory of an SM, and L2 bandwidth over HBM's for x's reads
FLIGHT_PER_SM = 48 << 10
SMEM_PER_SM = 228 << 10
L2_OVER_HBM = 2.5


def _dot_tile(p: GemvProblem, block_n: int, split: int) -> GemvConfig:
    """A tensor-core tile of block_n features, 256-byte K steps and the deepest pipeline (up to
    MAX_STAGES) that fits SMEM_BUDGET."""
    cfg = GemvConfig(max(16, triton.next_power_of_2(p.m)), block_n, 256 // p.itemsize, 4, MAX_STAGES, split)
    while cfg.num_stages > 2 and cfg.pipelined_bytes(p) > SMEM_BUDGET:
        cfg = replace(cfg, num_stages=cfg.num_stages - 1)
    return cfg


def dot_cost(p: GemvProblem, cfg: GemvConfig, num_sms: int) -> float:
    """Relative time of a tensor-core tile (Little's law): the weight bytes over the bandwidth its
    programs can draw, i.e. the SMs they occupy times the weight bytes each keeps in flight
    (resident programs x (stages - 1) tiles) against FLIGHT_PER_SM; plus x's L2 reads (each
    program reads m rows over K / split) at L2_OVER_HBM times the bandwidth."""
    programs = triton.cdiv(p.n_out, cfg.block_n) * cfg.split_k
    w_tile = cfg.block_n * cfg.block_k * p.itemsize * (2 if p.gated else 1)
    resident = max(1, min(triton.cdiv(programs, num_sms), SMEM_PER_SM // max(1, cfg.pipelined_bytes(p))))
    draw = min(1.0, programs / num_sms) * min(1.0, resident * (cfg.num_stages - 1) * w_tile / FLIGHT_PER_SM)
    weights = p.n_out * p.k * p.itemsize * (2 if p.gated else 1)
    x_reads = programs * p.m * (p.k // cfg.split_k) * p.x_bytes
    return weights / draw + x_reads / L2_OVER_HBM


def choose_config(p: GemvProblem, num_sms: int) -> GemvConfig:
    """The default tile. One row: CUDA cores, 8 features x 512 of K, two tiles in flight for big
    weights. More rows: tensor cores (rows padded to 16) with 256-byte K steps and as many
    pipeline stages as fit SMEM_BUDGET; the feature width and split K (only where the caller takes
    partial sums, and at most SPLIT_MAX_ROWS rows) that minimize `dot_cost`."""
    if p.m == 1:
        big = p.n_out * p.k * p.itemsize * (2 if p.gated else 1) >= BIG_WEIGHT_BYTES
        cfg = GemvConfig(1, 8, min(512, triton.next_power_of_2(p.k)), 4, 2 if big else 1)
        tiles, split = triton.cdiv(p.n_out, cfg.block_n), 1
        while p.can_split and tiles * split < num_sms // 2 and p.k // (2 * split) >= 2 * cfg.block_k:
            split *= 2
        return replace(cfg, split_k=split)
    splits = [1]
    while (p.can_split and p.m <= SPLIT_MAX_ROWS and splits[-1] < MAX_SPLIT
           and p.k // (2 * splits[-1]) >= 2 * (256 // p.itemsize)):
        splits.append(2 * splits[-1])
    tiles = [_dot_tile(p, bn, s) for bn in DOT_BLOCK_N for s in splits]
    return min(tiles, key=lambda c: dot_cost(p, c, num_sms))  # ties: the first, the widest tile
