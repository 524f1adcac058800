"""Greedy and temperature sampling in one pass over the logits (Gumbel-max, written as an
exponential race): the winner is argmax(logits / T - ln E) with E ~ Exp(1) drawn per (row seed,
column); rows with T = 0 take plain argmax. This replaces a float32 copy, softmax, noise tensor
and division over [batch, vocab] (~1 GB of traffic at batch 256 with a 152k vocabulary) with one
read.

The noise is a counter-based hash, not Philox: 32 bits from Wellons' triple32 integer hash of the
column (times an odd constant) xor a per-row key, i.e. ~15 integer operations a column where
Triton's `tl.rand` runs 10 Philox rounds, and two fast log2s (lg2.approx on the GPU) where
`tl.log` is a precise polynomial. The 10-round Philox and the two precise logs made the kernel
instruction-bound at ~105 instructions a column: 104 us at batch 128 against ~10 us of reads on an
H200 (reports/PERF.md row 36). E = -ln(1 - w) for w uniform in (0, 1) on a 2^-23 grid, as
w + w^2 / 2 below 2^-7 so that lg2.approx never sees an argument next to 1 (the winners are the
small E's); score = logits * log2(e) / T - log2(E), argmax-equivalent to logits / T - ln E.

Two launches: (row, vocabulary chunk) programs write each chunk's best score and its column
(`gumbel_chunks`), then one small program per row picks the best chunk (`pick_from_chunks`).
Within a chunk each lane keeps its own best over the loop and the lanes are reduced once after
it (ties to the leftmost column, as torch.argmax). Under tensor parallelism each rank runs the
first over its own slice of the vocabulary (noise keyed by the global column, so any split draws
the same noise), the ranks all-gather the chunk winners (a few KB instead of the logits), and
every rank picks the same token: the result equals one GPU sampling the whole row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from engine.kernels.device_info import num_sms

CHUNK = 8192  # vocabulary columns per program: a 152k vocabulary is 19 programs per row
BLOCK = 2048  # columns a program takes per loop step, and the smallest chunk


def chunk_size(rows: int, width: int, sms: int) -> int:
    """Columns per program: CHUNK once rows x chunks fill the SMs four programs deep, else one
    loop step (BLOCK). A batch-1 row in 8,192-column chunks is 19 programs, each a 4-step loop
    bound by its own latency. On an H200, 152k vocabulary, T > 0 (reports/PERF.md row 36):
    2,048-column chunks 3.8 / 5.3 / 7.8 us at batch 1 / 7 / 16 vs 5.8 / 6.7 / 9.0, and
    8,192-column chunks ahead from batch 64 (19.5 vs 20.0 us). Two sizes only: each is a compiled
    variant. Depends on the slice width, not its real columns, so every TP rank picks the same."""
    return CHUNK if rows * triton.cdiv(width, CHUNK) >= 4 * sms else BLOCK


@triton.jit
def _triple32(h):
    """Wellons' triple32: a uint32 -> uint32 bijection with near-ideal avalanche."""
    h ^= h >> 17
    h *= 0xED5AD4BB
    h ^= h >> 11
    h *= 0xAC4C1B51
    h ^= h >> 15
    h *= 0x31848BAB
    h ^= h >> 14
    return h


@triton.jit
def _row_key(seed):
    """A row's uint32 noise key from its int64 seed (both halves)."""
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return _triple32(lo ^ _triple32(hi ^ 0x9E3779B9))


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2: lg2.approx on the GPU (FAST), the precise one elsewhere (the interpreter has no
    libdevice)."""
    if FAST:
        y = libdevice.fast_log2f(x)
    else:
        y = tl.log2(x)
    return y


@triton.jit
def _exp1_log2(key, cols, FAST: tl.constexpr):
    """log2(E), E ~ Exp(1), for each global column: -ln(1 - w), w uniform on a 2^-23 grid."""
    h = _triple32((cols.to(tl.uint32) * 0x9E3779B1) ^ key)
    w = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # (k + 1/2) / 2^23: 1 - w is exact
    e = tl.where(w < 0.0078125, w * (1.0 + 0.5 * w), -0.6931471805599453 * _log2(1.0 - w, FAST))
    return _log2(e, FAST)


@triton.jit
def _gumbel_chunk_kernel(logits_ptr, temp_ptr, seed_ptr, out_ptr, stride_row, num_cols, col_offset,
                         CHUNK: tl.constexpr, BLOCK: tl.constexpr, FAST_LOG: tl.constexpr):
    """Program (row, chunk): the best score of one CHUNK of the row and its global column,
    stored as int32 planes [2, rows, chunks] (the value's bits, then the column)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    num_rows = tl.num_programs(0)
    num_chunks = tl.num_programs(1)
    temp = tl.load(temp_ptr + row)
    key = _row_key(tl.load(seed_ptr + row))
    scale = 1.4426950408889634 / tl.where(temp > 0.0, temp, 1.0)  # log2(e) / T
    lanes = tl.arange(0, BLOCK)
    best_val = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_idx = chunk * CHUNK + lanes  # an all -inf chunk reports its first column
    end = tl.minimum(num_cols, (chunk + 1) * CHUNK)
    for start in range(chunk * CHUNK, end, BLOCK):
        cols = start + lanes
        mask = cols < end
        x = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if temp > 0.0:
            # keyed by the global column: any chunking or vocabulary split draws the same noise
            x = x * scale - _exp1_log2(key, col_offset + cols, FAST_LOG)
        x = tl.where(mask, x, float("-inf"))
        take = x > best_val  # strict: a lane keeps its earlier (lower) column on ties
        best_idx = tl.where(take, cols, best_idx)
        best_val = tl.where(take, x, best_val)
    val = tl.max(best_val, axis=0)
    idx = tl.min(tl.where(best_val == val, best_idx, 2**31 - 1), axis=0)  # leftmost of the lanes' ties
    cell = row * num_chunks + chunk
    tl.store(out_ptr + cell, val.to(tl.int32, bitcast=True))
    tl.store(out_ptr + num_rows * num_chunks + cell, col_offset + idx)


@triton.jit
def _winner_cell(c, row, num_rows, num_chunks):
    """Offset of the value plane's cell for chunk c of the stacked [GROUPS, 2, rows, chunks]
    winners (c counts across groups; the column plane is num_rows * num_chunks further on)."""
    return (c // num_chunks) * 2 * num_rows * num_chunks + row * num_chunks + c % num_chunks


@triton.jit(do_not_specialize=["num_rows", "num_chunks"])  # the batch size varies every step
def _pick_chunk_kernel(chunks_ptr, out_ptr, num_rows, num_chunks, GROUPS: tl.constexpr,
                       CHUNKS_PAD: tl.constexpr):
    """Program row: the leftmost best of GROUPS x num_chunks chunk winners ([GROUPS, 2, rows,
    chunks], groups in column order), so the row's leftmost argmax."""
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS_PAD)
    ok = c < GROUPS * num_chunks
    vals = tl.load(chunks_ptr + _winner_cell(c, row, num_rows, num_chunks), mask=ok, other=0)
    vals = vals.to(tl.float32, bitcast=True)
    vals = tl.where(ok, vals, float("-inf"))
    _, best = tl.max(vals, axis=0, return_indices=True, return_indices_tie_break_left=True)
    best_col = chunks_ptr + num_rows * num_chunks + _winner_cell(best, row, num_rows, num_chunks)
    tl.store(out_ptr + row, tl.load(best_col).to(tl.int64))


def gumbel_chunks(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                  col_offset: int = 0, num_cols: int | None = None, chunk: int | None = None) -> torch.Tensor:
    """logits [B, V] (any float dtype, last dim contiguous; columns col_offset .. of the whole
    vocabulary, the first num_cols of them real), temperature [B] fp32 (0 = greedy), seeds [B]
    int64 -> the chunk winners, int32 [2, B, chunks] for `pick_from_chunks`. `chunk`: columns
    per program (default: chunk_size's choice); the draws do not depend on it."""
    b, width = logits.shape
    num_cols = width if num_cols is None else num_cols
    if (logits.stride(-1) != 1 or temperature.shape != (b,) or seeds.shape != (b,)
            or not 0 < num_cols <= width or col_offset + num_cols >= 2**31):
        raise ValueError(f"gumbel_chunks: logits [B, V] contiguous rows, [B] temperature/seeds and "
                         f"0 < num_cols <= V; got {tuple(logits.shape)}, {tuple(temperature.shape)}, "
                         f"{tuple(seeds.shape)}, num_cols {num_cols}, col_offset {col_offset}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"gumbel_chunks: chunk must be >= 1 column, got {chunk}")
    chunk = chunk or chunk_size(b, width, num_sms(logits.device))
    chunks = triton.cdiv(num_cols, chunk)
    out = torch.empty(2, b, chunks, dtype=torch.int32, device=logits.device)
    if b:
        _gumbel_chunk_kernel[(b, chunks)](logits, temperature, seeds, out, logits.stride(0), num_cols,
                                          col_offset, CHUNK=chunk,
                                          BLOCK=min(BLOCK, triton.next_power_of_2(chunk)), FAST_LOG=logits.is_cuda)
    return out


def pick_from_chunks(chunks: torch.Tensor) -> torch.Tensor:
    """[2, B, C] from `gumbel_chunks`, or [G, 2, B, C] stacked in column order (one per vocabulary
    slice, e.g. all-gathered over tensor-parallel ranks) -> sampled ids [B] int64."""
    stacked = chunks.unsqueeze(0) if chunks.dim() == 3 else chunks
    if stacked.dim() != 4 or stacked.shape[1] != 2 or stacked.dtype != torch.int32 or not stacked.is_contiguous():
        raise ValueError(f"pick_from_chunks needs contiguous int32 [2, B, C] or [G, 2, B, C]; got "
                         f"{tuple(chunks.shape)} {chunks.dtype}")
    groups, _, b, c = stacked.shape
    out = torch.empty(b, dtype=torch.int64, device=chunks.device)
    if b:
        _pick_chunk_kernel[(b,)](stacked, out, b, c, GROUPS=groups,
                                 CHUNKS_PAD=triton.next_power_of_2(groups * c))
    return out


def gumbel_argmax(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                  chunk: int | None = None) -> torch.Tensor:
    """logits [B, V], temperature [B] fp32 (0 = greedy), seeds [B] int64 -> sampled ids [B] int64.
    One program per row would leave most SMs idle at decode batch sizes (257 us at B = 128 on an
    H100), hence the chunks."""
    return pick_from_chunks(gumbel_chunks(logits, temperature, seeds, chunk=chunk))
