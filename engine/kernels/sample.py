"""Greedy and temperature sampling in one pass over the logits (Gumbel-max): the winner is
argmax(logits / T + G) with G = -log(-log(U)) from Philox(seed, token index); rows with T = 0
take plain argmax. This replaces a float32 copy, softmax, noise tensor and division over
[batch, vocab] (~1 GB of traffic at batch 256 with a 152k vocabulary) with one read.

Two launches: (row, vocabulary chunk) programs write each chunk's best perturbed logit and its
column (`gumbel_chunks`), then one small program per row picks the best chunk
(`pick_from_chunks`). Under tensor parallelism each rank runs the first over its own slice of
the vocabulary (noise keyed by the global column, so any split draws the same noise), the ranks
all-gather the chunk winners (a few KB instead of the logits), and every rank picks the same
token: the result equals one GPU sampling the whole row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.device_info import num_sms

CHUNK = 8192  # vocabulary columns per program: a 152k vocabulary is 19 programs per row
BLOCK = 2048  # columns a program takes per loop step, and the smallest chunk


def chunk_size(rows: int, width: int, sms: int) -> int:
    """Columns per program: CHUNK once rows x chunks fill the SMs, else one loop step (BLOCK). A
    batch-1 row in 8,192-column chunks is 19 programs, each a 4-step loop bound by its own
    latency (41.8 us for a 152k vocabulary at T > 0 on an H200, reports/PERF.md row 33). Two
    sizes only: each is a compiled variant. Depends on the slice width, not its real columns, so
    every TP rank picks the same."""
    return CHUNK if rows * triton.cdiv(width, CHUNK) >= sms else BLOCK


@triton.jit
def _gumbel_chunk_kernel(logits_ptr, temp_ptr, seed_ptr, out_ptr, stride_row, num_cols, col_offset,
                         CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, chunk): the best perturbed logit of one CHUNK of the row and its global
    column, stored as int32 planes [2, rows, chunks] (the value's bits, then the column)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    num_rows = tl.num_programs(0)
    num_chunks = tl.num_programs(1)
    temp = tl.load(temp_ptr + row)
    seed = tl.load(seed_ptr + row)
    best_val = float("-inf")
    best_idx = 0
    end = tl.minimum(num_cols, (chunk + 1) * CHUNK)
    for start in range(chunk * CHUNK, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < end
        x = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if temp > 0.0:
            # keyed by the global column: any chunking or vocabulary split draws the same noise
            u = tl.maximum(tl.rand(seed, col_offset + cols), 1e-20)
            x = x / temp - tl.log(-tl.log(u))
        x = tl.where(mask, x, float("-inf"))
        val, idx = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        take = val > best_val  # strict: ties keep the earlier (lower) index, as torch.argmax
        best_idx = tl.where(take, col_offset + start + idx, best_idx)
        best_val = tl.where(take, val, best_val)
    cell = row * num_chunks + chunk
    tl.store(out_ptr + cell, best_val.to(tl.int32, bitcast=True))
    tl.store(out_ptr + num_rows * num_chunks + cell, best_idx)


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
                                          BLOCK=min(BLOCK, triton.next_power_of_2(chunk)))
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
