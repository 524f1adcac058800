"""y = x W^T for a few rows of x (decode steps of small batches), fused with what surrounds a
projection in the decoder layer: one kernel where cuBLAS needs a norm kernel before it, a GEMM
(sometimes two, with split-K) and a SiLU * up kernel after it.

A batch-1 decode step of Qwen3-0.6B is ~1.3 ms in its CUDA graph against a 0.28 ms weight-read
floor: the gap is ~12 kernels per layer of a few us each, not bandwidth. Here a program owns
BLOCK_N output features (rows of W) and, with SPLIT_K, a share of K, so a layer's weights stream
through hundreds of programs at once; x is tiny and every program reads all of it (L2 hits).

Options, each a constexpr:
- NORM, the prologue: x <- RMSNorm(x [+ residual]). RMSNorm scales each row by one number, so
  norm(x) W^T = rstd * ((x * g) W^T): the K loop multiplies x * g (g: the norm weight) and sums
  each row's squares on the way, and the accumulators are scaled by rstd after the loop (one pass
  over x). NORM_FIRST (split K, which sees part of a row; or a config's norm_first, to time the old
  way): a first pass over all of K computes rstd, then each K tile is normalized as it goes; that
  pass is a chain of dependent L2 round trips before the first weight tile is used (~K / BLOCK_K
  of them: ~32 at K 4,096 and 128-wide tiles). The new residual (x + residual) is written once: K
  tile c by program c % num_programs, into its own buffer, so no program reads what another
  overwrites.
- PARTS, the input as split-K partial sums: x = sum of PARTS fp32 tiles [PARTS, M, K] in order
  (deterministic), rounded to the model dtype. A split-K projection leaves its partials to the
  norm of the next kernel instead of launching a reduce kernel.
- GATED, the epilogue for gate_up: the program owns gate rows n..n+BLOCK_N and up rows
  N+n..N+n+BLOCK_N and stores SiLU(gate) * up, so the [M, 2N] projection is never written.
- SPLIT_K > 1: the output is fp32 partials [SPLIT_K, M, N] (for a NORM/PARTS consumer).

Roundings follow the unfused path (cuBLAS output in the model dtype, then the norm and SiLU
kernels), except that the one-pass norm rounds x * g (tensor cores: to the dtype) where HF rounds
x * rstd and then its product with g: the sum and that one rounding differ. Tiles of BLOCK_M >= 16
rows use tensor cores (tl.dot, rows padded with zeros; Triton pipelines the weight and x loads
through shared memory, num_stages deep); smaller ones multiply and sum on CUDA cores, where
Triton pipelines nothing, so the kernel keeps PREFETCH weight tiles in flight in registers.

CUDA graphs: the grid depends only on the shapes and the config; no host sync, outputs are
allocated per call as every other kernel wrapper does. PDL (optional, sm_90+): the kernel is
launched as a programmatic dependent of the one before it and loads its first weight tile
before waiting for it (griddepcontrol.wait), so launch latency and the first DRAM round trip
overlap the previous kernel's tail; stream capture keeps that as a programmatic graph edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine.kernels.device_info import num_sms
from engine.kernels.gemv_config import GemvConfig, GemvProblem, choose_config
from engine.kernels.rmsnorm import NORM_NUM_WARPS, norm_store_row

# M changes between eager steps (prefill chunks of a few tokens): specializing on it would
# compile new variants mid-run (harness.kernels.jit_watch)
ROW_COUNTS = ["M"]

@triton.jit
def _load_x(x_ptr, stride_xs, offs, mask, dtype, PARTS: tl.constexpr):
    """x at `offs`: the sum of PARTS partial-sum tiles (in order), rounded to `dtype`."""
    acc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(1, PARTS):
        acc += tl.load(x_ptr + s * stride_xs + offs, mask=mask, other=0.0).to(tl.float32)
    return acc.to(dtype)


@triton.jit
def _row_rstd(x_ptr, res_ptr, res_out_ptr, stride_xs, stride_xm, stride_rm, rows, row_ok, K, eps, me, programs,
              dtype, PARTS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / RMS of each row of x (+ residual) over all of K; stores x + residual tile c into
    res_out when c % programs == me."""
    squares = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols < K)[None, :]
        x = _load_x(x_ptr, stride_xs, rows[:, None] * stride_xm + cols[None, :], mask, dtype, PARTS)
        if HAS_RES:
            x = x + tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
            mine = (rows * 0 + k0 // BLOCK_K) % programs == me  # a vector: the interpreter rejects scalar masks
            tl.store(res_out_ptr + rows[:, None] * K + cols[None, :], x, mask=mask & mine[:, None])
        xf = x.to(tl.float32)
        squares += xf * xf
    return 1.0 / tl.sqrt(tl.sum(squares, axis=1) / K + eps)


@triton.jit
def _fma_zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The CUDA-core path's accumulator: products summed elementwise over the K tiles and reduced
    over BLOCK_K once, after the loop (no cross-warp reduction per tile). One row: [BN, BK], in
    the layout W is loaded in; more: [BM, BN, BK]. (Static if/else with one return: compiled
    Triton checks every return's type, even of a branch a constexpr rules out.)"""
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
    return acc


@triton.jit
def _fma(acc, x, w, BLOCK_M: tl.constexpr):
    """acc += x [BM, BK] (x) w [BN, BK] in fp32 (see _fma_zeros)."""
    if BLOCK_M == 1:
        acc += x.to(tl.float32) * w.to(tl.float32)
    else:
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    return acc


@triton.jit
def _fma_sum(acc, BLOCK_M: tl.constexpr):
    """The accumulator of _fma_zeros reduced over K: [BM, BN]."""
    if BLOCK_M == 1:
        out = tl.sum(acc, axis=1)[None, :]
    else:
        out = tl.sum(acc, axis=2)
    return out


@triton.jit
def _g_tile(nw_ptr, k0, K, NORM: tl.constexpr, BLOCK_K: tl.constexpr):
    """The norm weight at k0 (zeros without a norm: nw_ptr is then a stand-in)."""
    cols = k0 + tl.arange(0, BLOCK_K)
    if NORM:
        g = tl.load(nw_ptr + cols, mask=cols < K, other=0.0)
    else:
        g = tl.zeros((BLOCK_K,), nw_ptr.dtype.element_ty)
    return g


@triton.jit
def _x_tile(x_ptr, res_ptr, res_out_ptr, g, stride_xs, stride_xm, stride_rm, rows, row_ok, k0, rstd, me,
            programs, K, dtype, PARTS: tl.constexpr, NORM: tl.constexpr, NORM_FIRST: tl.constexpr,
            HAS_RES: tl.constexpr, BLOCK_K: tl.constexpr):
    """The GEMM's input tile [BM, BK] and its squares [BM, BK]: x (summed partials).
    NORM_FIRST: normalized with `rstd` (HF's roundings). Else with NORM: x (+ residual, stored to
    res_out by the tile's owner, program (k0 / BLOCK_K) % programs) times the norm weight g (its
    tile at k0, from _g_tile) in fp32, its squares for the caller's rstd. The caller sums the
    squares elementwise over the K loop and reduces them once after it: a reduction per tile puts
    a cross-warp barrier in the loop (with it gone, llama-3-8b's norm + qkv went from 20.3 to 18.2
    us a launch on an H200, PERF row 25)."""
    cols = k0 + tl.arange(0, BLOCK_K)
    k_ok = cols < K
    mask = row_ok[:, None] & k_ok[None, :]
    x = _load_x(x_ptr, stride_xs, rows[:, None] * stride_xm + cols[None, :], mask, dtype, PARTS)
    squares = tl.zeros(x.shape, tl.float32)
    if NORM:
        if HAS_RES:
            x = x + tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
            if not NORM_FIRST and (k0 // BLOCK_K) % programs == me:  # tile owner (the first pass stored it)
                tl.store(res_out_ptr + rows[:, None] * K + cols[None, :], x, mask=mask)
        xf = x.to(tl.float32)
        if NORM_FIRST:
            x = (xf * rstd[:, None]).to(dtype) * g[None, :]  # HF order: fp32, cast, scale
        else:
            squares = xf * xf
            x = xf * g.to(tl.float32)[None, :]  # fp32: the CUDA-core path uses it as is
    return x, squares


@triton.jit
def _w_tile(w_tile, k0, n_ok, k_hi, BLOCK_K: tl.constexpr):
    """The weight tile at k0 (rows of w_tile's pointers; nothing past k_hi)."""
    mask = n_ok[:, None] & (k0 + tl.arange(0, BLOCK_K) < k_hi)[None, :]
    return tl.load(w_tile + k0, mask=mask, other=0.0)


@triton.jit(do_not_specialize=ROW_COUNTS)
def _skinny_gemm_kernel(
    x_ptr, w_ptr, out_ptr, bias_ptr, res_ptr, nw_ptr, res_out_ptr,
    M, N, K,  # N: output features (gate and up count once)
    stride_xs, stride_xm, stride_wn, stride_os, stride_om, stride_rm, eps,
    PARTS: tl.constexpr, NORM: tl.constexpr, NORM_FIRST: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_BIAS: tl.constexpr, GATED: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr, PDL: tl.constexpr,
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    dtype = w_ptr.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    w_tile = w_ptr + n[:, None] * stride_wn + tl.arange(0, BLOCK_K)[None, :]  # + k0: the tile at k0
    up_tile = w_tile + N * stride_wn
    if not USE_DOT:
        # Triton software-pipelines only loads that feed a dot, so this path prefetches by hand:
        # the next PREFETCH weight tiles are in flight while this one is multiplied
        w_next = _w_tile(w_tile, k_lo, n_ok, k_hi, BLOCK_K)
        up_next = w_next
        if GATED:
            up_next = _w_tile(up_tile, k_lo, n_ok, k_hi, BLOCK_K)
        if PREFETCH == 2:
            w_after = _w_tile(w_tile, k_lo + BLOCK_K, n_ok, k_hi, BLOCK_K)
            up_after = w_after
            if GATED:
                up_after = _w_tile(up_tile, k_lo + BLOCK_K, n_ok, k_hi, BLOCK_K)
        acc_k = _fma_zeros(BLOCK_M, BLOCK_N, BLOCK_K)
        acc_up_k = _fma_zeros(BLOCK_M, BLOCK_N, BLOCK_K)
    if PDL:
        # Programmatic dependent launch: this kernel may start while the one before it still runs.
        # The weight loads above need nothing from it; everything below reads or writes
        # activations, so it waits for that kernel here and lets the next one start.
        gdc_wait()
        gdc_launch_dependents()
    rstd = tl.zeros((BLOCK_M,), tl.float32)
    squares = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    me, programs = pid_n * SPLIT_K + pid_k, tl.num_programs(0) * SPLIT_K  # who stores which residual tile
    if NORM_FIRST:
        rstd = _row_rstd(x_ptr, res_ptr, res_out_ptr, stride_xs, stride_xm, stride_rm, rows, row_ok, K, eps,
                         me, programs, dtype, PARTS, HAS_RES, BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if not USE_DOT:
        # x's tiles are L2 round trips: the next one is in flight while this one is used
        x_next, sq_next = _x_tile(x_ptr, res_ptr, res_out_ptr, _g_tile(nw_ptr, k_lo, K, NORM, BLOCK_K), stride_xs,
                                  stride_xm, stride_rm, rows, row_ok, k_lo, rstd, me, programs, K, dtype, PARTS,
                                  NORM, NORM_FIRST, HAS_RES, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if USE_DOT:
            # the norm weight's load stays synchronous in Triton's pipeline here; loading it a step
            # ahead timed the same on an H200 (PERF rows 30, 30b), so it is loaded where it is used
            x, x_sq = _x_tile(x_ptr, res_ptr, res_out_ptr, _g_tile(nw_ptr, k0, K, NORM, BLOCK_K), stride_xs,
                              stride_xm, stride_rm, rows, row_ok, k0, rstd, me, programs, K, dtype, PARTS, NORM,
                              NORM_FIRST, HAS_RES, BLOCK_K)
            squares += x_sq
            w_mask = n_ok[:, None] & (k0 + tl.arange(0, BLOCK_K) < K)[None, :]
            x = x.to(dtype)
            acc = tl.dot(x, tl.trans(tl.load(w_tile + k0, mask=w_mask, other=0.0)), acc,
                         input_precision=DOT_PRECISION)
            if GATED:
                acc_up = tl.dot(x, tl.trans(tl.load(up_tile + k0, mask=w_mask, other=0.0)), acc_up,
                                input_precision=DOT_PRECISION)
        else:
            x, w, up = x_next, w_next, up_next
            squares += sq_next
            x_next, sq_next = _x_tile(x_ptr, res_ptr, res_out_ptr, _g_tile(nw_ptr, k0 + BLOCK_K, K, NORM, BLOCK_K),
                                      stride_xs, stride_xm, stride_rm, rows, row_ok, k0 + BLOCK_K, rstd, me,
                                      programs, K, dtype, PARTS, NORM, NORM_FIRST, HAS_RES, BLOCK_K)
            ahead = k0 + PREFETCH * BLOCK_K  # the weight tile to start loading now
            if PREFETCH == 2:
                w_next, up_next = w_after, up_after
                w_after = _w_tile(w_tile, ahead, n_ok, k_hi, BLOCK_K)
                if GATED:
                    up_after = _w_tile(up_tile, ahead, n_ok, k_hi, BLOCK_K)
            else:
                w_next = _w_tile(w_tile, ahead, n_ok, k_hi, BLOCK_K)
                if GATED:
                    up_next = _w_tile(up_tile, ahead, n_ok, k_hi, BLOCK_K)
            acc_k = _fma(acc_k, x, w, BLOCK_M)
            if GATED:
                acc_up_k = _fma(acc_up_k, x, up, BLOCK_M)
    if not USE_DOT:
        acc = _fma_sum(acc_k, BLOCK_M)
        if GATED:
            acc_up = _fma_sum(acc_up_k, BLOCK_M)
    if NORM and not NORM_FIRST:  # the one-pass norm: (x * g) W^T scaled by each row's rstd
        rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=1) / K + eps)
        acc = acc * rstd[:, None]
        acc_up = acc_up * rstd[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = row_ok[:, None] & n_ok[None, :]
    out_offs = pid_k * stride_os + rows[:, None] * stride_om + n[None, :]
    if SPLIT_K > 1:
        tl.store(out_ptr + out_offs, acc, mask=out_mask)
    elif GATED:
        gate = acc.to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype)  # as the SiLU * up kernel: silu in the dtype, then * up
        tl.store(out_ptr + out_offs, act * acc_up.to(dtype), mask=out_mask)
    else:
        tl.store(out_ptr + out_offs, acc.to(dtype), mask=out_mask)


@dataclass(frozen=True)
class NormIn:
    """An RMSNorm applied to the GEMM's input rows: norm(x + residual) with `weight` [K]; the
    sum x + residual is returned as the new residual (residual None: norm(x), x is kept)."""

    weight: torch.Tensor
    eps: float
    residual: torch.Tensor | None = None


def _check_rows(x: torch.Tensor, k: int, dtype: torch.dtype) -> None:
    """x [M, K] in the weight's dtype or fp32 partials [S, M, K]; contiguous last dim."""
    ok = (x.dim() == 2 and x.dtype == dtype) or (x.dim() == 3 and x.dtype == torch.float32)
    if not ok or x.shape[-1] != k or x.stride(-1) != 1 or (x.dim() == 3 and not x.is_contiguous()):
        raise ValueError(f"skinny_gemm input must be [M, {k}] {dtype} or contiguous fp32 partials [S, M, {k}] "
                         f"with a contiguous last dim; got {tuple(x.shape)} {x.dtype} stride {x.stride()}")


def _check_args(x, weight, bias, norm, gated, cfg) -> None:
    if weight.dim() != 2 or weight.stride(1) != 1 or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"skinny_gemm weight must be a float [N, K] with a contiguous last dim, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    _check_rows(x, weight.shape[1], weight.dtype)
    if gated and weight.shape[0] % 2:
        raise ValueError(f"gated skinny_gemm needs [gate | up] weights with an even row count, got {weight.shape[0]}")
    if cfg.split_k > 1 and (gated or bias is not None):
        raise ValueError(f"split_k={cfg.split_k} leaves partial sums: no gated epilogue or bias")
    if bias is not None and (gated or bias.shape != (weight.shape[0],)):
        raise ValueError(f"bias must be [{weight.shape[0]}] and not gated, got {tuple(bias.shape)}")
    if norm is not None:
        rows = x.shape[-2:]
        if norm.weight.shape != (weight.shape[1],):
            raise ValueError(f"norm weight must be [{weight.shape[1]}], got {tuple(norm.weight.shape)}")
        if norm.residual is not None and (norm.residual.shape != rows or norm.residual.stride(-1) != 1
                                          or norm.residual.dtype != weight.dtype):
            raise ValueError(f"residual must be [{rows[0]}, {rows[1]}] {weight.dtype} with a contiguous last dim, "
                             f"got {tuple(norm.residual.shape)} {norm.residual.dtype}")
    elif x.dim() == 3:
        raise ValueError("partial sums as input need a NormIn (they are summed in the norm prologue)")


def problem(x: torch.Tensor, weight: torch.Tensor, norm: NormIn | None = None, gated: bool = False,
            split_ok: bool = False) -> GemvProblem:
    """The GemvProblem of a skinny_gemm call with these arguments."""
    m, k = x.shape[-2:]
    item = weight.element_size()
    x_bytes = 4 * x.shape[0] if x.dim() == 3 else item
    if norm is not None and norm.residual is not None:
        x_bytes += item
    return GemvProblem(m, weight.shape[0] // 2 if gated else weight.shape[0], k, item, x_bytes, gated,
                       split_ok and not gated)


def _has_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch needs sm_90 or later (and a device, not the interpreter)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                norm: NormIn | None = None, gated: bool = False, split_ok: bool = False,
                config: GemvConfig | None = None, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [M, K] (or fp32 partials [S, M, K] with `norm`) times weight [N, K]^T, optionally after
    `norm` and, with `gated`, with SiLU(y[:, :N/2]) * y[:, N/2:] after it. Returns (y, residual):
    y [M, N or N/2] in the weight's dtype, or fp32 partials [S, M, N] when the config splits K
    (only with `split_ok`); residual: norm(x + residual)'s new residual, x for a norm without
    one, else None. `pdl` (Hopper and later): launched as a programmatic dependent, the kernel
    starts loading weights before the previous kernel in the stream has finished."""
    m, k = x.shape[-2:]
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    parts = x.shape[0] if x.dim() == 3 else 1
    if config is None:
        config = choose_config(problem(x, weight, norm, gated, split_ok and bias is None), num_sms(x.device))
    _check_args(x, weight, bias, norm, gated, config)
    split = config.split_k
    out = (torch.empty((split, m, n_out), dtype=torch.float32, device=x.device) if split > 1
           else torch.empty((m, n_out), dtype=weight.dtype, device=x.device))
    res = norm.residual if norm is not None else None
    res_out = torch.empty((m, k), dtype=weight.dtype, device=x.device) if res is not None else None
    if m == 0:
        return out, res_out
    grid = (triton.cdiv(n_out, config.block_n), split, triton.cdiv(m, config.block_m))
    launch = {"launch_pdl": True} if pdl and _has_pdl(x.device) else {}
    # the one-pass norm needs whole rows (no split K); on tensor cores it rounds x * g to the
    # dtype, which fp16 can overflow (HF normalizes first)
    norm_first = norm is not None and (config.norm_first or split > 1 or
                                       (config.use_dot and weight.dtype == torch.float16))
    _skinny_gemm_kernel[grid](
        x, weight, out, bias if bias is not None else weight, res if res is not None else weight,
        norm.weight if norm is not None else weight, res_out if res_out is not None else weight,
        m, n_out, k, x.stride(0) if parts > 1 else 0, x.stride(-2), weight.stride(0),
        out.stride(0) if split > 1 else 0, out.stride(-2), res.stride(0) if res is not None else 0,
        norm.eps if norm is not None else 0.0,
        PARTS=parts, NORM=norm is not None, NORM_FIRST=norm_first, HAS_RES=res is not None,
        HAS_BIAS=bias is not None, GATED=gated, SPLIT_K=split, USE_DOT=config.use_dot,
        DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32", BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, PREFETCH=config.prefetch,
        PDL=bool(launch), num_warps=config.num_warps, num_stages=config.num_stages, **launch,
    )
    if norm is not None and res is None:
        return out, x
    return out, res_out


@triton.jit
def _partials_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_xs, hidden, eps,
                             PARTS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = res_ptr.dtype.element_ty
    x = _load_x(x_ptr, stride_xs, row * hidden + cols, mask, dtype, PARTS) + tl.load(
        res_ptr + row * hidden + cols, mask=mask, other=0.0)
    tl.store(res_out_ptr + row * hidden + cols, x, mask=mask)
    norm_store_row(x, tl.load(w_ptr + cols, mask=mask, other=0.0), out_ptr + row * hidden, cols, mask, hidden, eps)


def partials_rmsnorm(parts: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(sum(parts) + residual), sum(parts) + residual) for split-K partials [S, M, H]
    fp32 (summed in order, rounded to the residual's dtype): the model's last norm."""
    m, hidden = residual.shape
    if (parts.dim() != 3 or parts.shape[1:] != (m, hidden) or parts.dtype != torch.float32
            or not parts.is_contiguous() or not residual.is_contiguous() or weight.shape != (hidden,)):
        raise ValueError(f"partials_rmsnorm needs contiguous fp32 parts [S, M, H], residual [M, H] and weight [H]; "
                         f"got {tuple(parts.shape)} {parts.dtype}, {tuple(residual.shape)}, {tuple(weight.shape)}")
    out, res_out = torch.empty_like(residual), torch.empty_like(residual)
    if m:
        _partials_rmsnorm_kernel[(m,)](parts, residual, weight, out, res_out, parts.stride(0), hidden, eps,
                                       PARTS=parts.shape[0], BLOCK=triton.next_power_of_2(hidden),
                                       num_warps=NORM_NUM_WARPS)
    return out, res_out
