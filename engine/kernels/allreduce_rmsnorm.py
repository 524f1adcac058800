"""Tensor-parallel all-reduce fused with the residual add and RMSNorm that follow it.

Each rank's row-parallel GEMM writes its partial sums into its own symmetric-memory buffer, which
every peer can load over NVLink. One kernel then meets the peers at a barrier, sums the partials
of each row (in rank order, so every rank gets the same bits), adds the residual and normalizes:
on a decode step that replaces an all-reduce kernel and a norm kernel, twice per layer.

Barrier protocol: program b of every rank counts its barriers (epoch e, kept in a local counter
per program). It stores e into slot [b, r] of every rank's pad (a release store over NVLink that
it need not wait for) and waits until each slot [b, p] of its own pad holds e. A fast peer may
already have moved on to e + 1 there (it cannot go further: that barrier needs this rank's
e + 1), so either value passes. Epochs cycle through 1..EPOCH_MOD so they never overflow.
Whoever calls this alternates between two partial buffers, so a rank that has passed the
barrier of all-reduce k+1 knows its peers are done reading its buffer of all-reduce k.

`push_allreduce_rmsnorm` is the one-trip variant, for decode batches (1 us ahead of the barrier
up to 128 rows on 2xH200; behind from 256, where each program carries several rows). Each rank
stores its partials into its own slot of every peer's receive buffer and polls the peers' slots
of its own until none holds the "not arrived" mark, -0.0 (senders send -0.0 as +0.0), then
resets them to the mark. The data is the flag, so there is no barrier
round trip and no remote load. Two receive buffers alternate as above: a peer writes into this
rank's buffer of all-reduce k + 2 only after it has this rank's data of k + 1, which is sent
after the reset of k.

Both kernels can also warm L2 for the GEMM that follows (`prefetch`, experimental: not yet run
on GPUs): programs beyond the row programs load the first bytes of its weights while the row
programs wait for their peers, with the HBM otherwise idle."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.rmsnorm import NORM_NUM_WARPS, norm_store_row

EPOCH_MOD = 1 << 30
_EPOCH_MOD: tl.constexpr = tl.constexpr(EPOCH_MOD)  # the kernels' view of it
# 4, 8, 16 warps: within 0.6 us up to 128 rows, 16 ahead by 1.5 us at 256-512 (2xH200, PERF.md)
NUM_WARPS = NORM_NUM_WARPS
PREFETCH_PROGRAMS = 128  # extra programs that warm L2 (about one per SM)
PREFETCH_BLOCK = 8192  # int32 words a prefetch program loads at a time (32 KB in flight)
_SINK_MAGIC: tl.constexpr = tl.constexpr(0x5EED1E55)  # see _prefetch_to_l2
# Arguments that change from step to step in eager (prefill) steps: specializing on them (% 16,
# == 1) would compile new variants mid-run (engine.kernels.jit_watch)
ROW_COUNTS = ["rows", "row_programs", "pf_count"]


@triton.jit
def _prefetch_to_l2(words, num_words, sink, part, parts, BLOCK: tl.constexpr):
    """Program `part` of `parts` loads its share of num_words int32 words through L2 (.cg), so
    the next kernel reading them finds them there. The xor of what it read goes to `sink` only
    when it equals _SINK_MAGIC (harmless if it ever does): a use the compiler cannot drop.
    The casts let a launch without the prefetch pass any tensor for both: Triton 3.6 type-checks
    this body even where _is_prefetcher is a compile-time False."""
    words = words.to(tl.pointer_type(tl.int32))
    sink = sink.to(tl.pointer_type(tl.int32))
    share = tl.cdiv(num_words, parts)
    acc = tl.zeros((BLOCK,), tl.int32)
    for start in range(part * share, tl.minimum(num_words, (part + 1) * share), BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc ^= tl.load(words + idx, mask=idx < num_words, other=0, cache_modifier=".cg")
    folded = tl.xor_sum(acc, axis=0)
    tl.store(sink, folded, mask=folded == _SINK_MAGIC)


@triton.jit
def _residual_norm_store(acc, res_ptr, res_out_ptr, out_ptr, w, row, hidden, cols, mask, eps):
    """Row `row` of the sum `acc` (fp32): add the residual, store it and its RMSNorm, with the
    same roundings as an all-reduce in the residual's dtype followed by the RMSNorm kernel."""
    x = acc.to(res_ptr.dtype.element_ty) + tl.load(res_ptr + row * hidden + cols, mask=mask, other=0.0)
    tl.store(res_out_ptr + row * hidden + cols, x, mask=mask)
    norm_store_row(x, w, out_ptr + row * hidden, cols, mask, hidden, eps)


@triton.jit
def _is_prefetcher(pid, row_programs, PREFETCH: tl.constexpr):
    # a constant False without PREFETCH, which the compiler folds: that specialization is the row code alone
    if PREFETCH:
        return pid >= row_programs
    else:
        return False


@triton.jit
def _barrier(signal_pads, epochs, slot, RANK: tl.constexpr, WORLD: tl.constexpr):
    # Scalar atomics: Triton runs them on one thread of the program and broadcasts the result.
    epoch = tl.load(epochs + slot) % _EPOCH_MOD + 1
    tl.store(epochs + slot, epoch)
    ahead = epoch % _EPOCH_MOD + 1
    for r in tl.static_range(WORLD):
        peer = tl.load(signal_pads + r).to(tl.pointer_type(tl.int32))
        # release: this rank's earlier writes (the GEMM's partials) are visible to whoever sees e
        tl.atomic_xchg(peer + slot * WORLD + RANK, epoch, sem="release", scope="sys")
    own = tl.load(signal_pads + RANK).to(tl.pointer_type(tl.int32))
    for r in tl.static_range(WORLD):
        seen = tl.atomic_add(own + slot * WORLD + r, 0, sem="acquire", scope="sys")
        while (seen != epoch) & (seen != ahead):
            seen = tl.atomic_add(own + slot * WORLD + r, 0, sem="acquire", scope="sys")


@triton.jit(do_not_specialize=ROW_COUNTS)
def _allreduce_rmsnorm_kernel(
    buffers, signal_pads, epochs, offset,  # int64 [WORLD] base addresses; partials start `offset` elements in
    res_ptr, w_ptr, out_ptr, res_out_ptr,  # contiguous rows of [N, H]
    rows, hidden, eps, row_programs,
    pf_words, pf_count, sink,  # L2 prefetch by the programs past row_programs (PREFETCH only)
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, PREFETCH: tl.constexpr, PF_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if _is_prefetcher(pid, row_programs, PREFETCH):
        _prefetch_to_l2(pf_words, pf_count, sink, pid - row_programs, tl.num_programs(0) - row_programs, PF_BLOCK)
    else:
        _barrier_rows(buffers, signal_pads, epochs, offset, res_ptr, w_ptr, out_ptr, res_out_ptr, rows, hidden,
                      eps, pid, row_programs, RANK, WORLD, BLOCK)


@triton.jit
def _barrier_rows(buffers, signal_pads, epochs, offset, res_ptr, w_ptr, out_ptr, res_out_ptr, rows, hidden, eps,
                  pid, row_programs, RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr):
    _barrier(signal_pads, epochs, pid, RANK, WORLD)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    elem = res_ptr.dtype.element_ty
    for row in range(pid, rows, row_programs):
        acc = tl.zeros((BLOCK,), tl.float32)
        for r in tl.static_range(WORLD):  # rank order: the same sum on every rank
            part = tl.load(buffers + r).to(tl.pointer_type(elem)) + offset + row * hidden
            acc += tl.load(part + cols, mask=mask, other=0.0).to(tl.float32)
        _residual_norm_store(acc, res_ptr, res_out_ptr, out_ptr, w, row, hidden, cols, mask, eps)


def allreduce_rmsnorm(buffers: torch.Tensor, signal_pads: torch.Tensor, epochs: torch.Tensor, offset: int,
                      rank: int, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      prefetch: Prefetch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the partials [N, H] that every rank wrote `offset` elements into its buffer, then
    return (rmsnorm(sum + residual), sum + residual). `buffers` and `signal_pads` hold the
    ranks' base addresses (int64, on this rank's device); `epochs` (int32, zeros at first, then
    left to this kernel) has one counter per program, and the pads a slot per program and rank."""
    rows, hidden = residual.shape
    world = buffers.numel()
    if not residual.is_contiguous() or weight.shape != (hidden,) or signal_pads.numel() != world:
        raise ValueError(f"allreduce_rmsnorm needs a contiguous residual [N, H], weight [H] and one "
                         f"signal pad per rank; got {tuple(residual.shape)}, {tuple(weight.shape)}, "
                         f"{signal_pads.numel()} pads for {world} buffers")
    out, res_out = torch.empty_like(residual), torch.empty_like(residual)
    row_programs = max(1, min(rows, epochs.numel()))
    pf = _prefetch_args(prefetch, residual)
    _allreduce_rmsnorm_kernel[(row_programs + pf[3],)](
        buffers, signal_pads, epochs, offset, residual, weight, out, res_out, rows, hidden, eps, row_programs,
        *pf[:3], RANK=rank, WORLD=world, BLOCK=triton.next_power_of_2(hidden), PREFETCH=pf[3] > 0,
        PF_BLOCK=PREFETCH_BLOCK, num_warps=NUM_WARPS,
    )
    return out, res_out


@dataclass(frozen=True)
class Prefetch:
    """What the fused kernels warm L2 with: `words` (int32, 1-D) and a one-word scratch `sink`."""

    words: torch.Tensor
    sink: torch.Tensor

    @classmethod
    def of(cls, weight: torch.Tensor, max_bytes: int, sink: torch.Tensor) -> Prefetch | None:
        """The first max_bytes of a contiguous weight (None when there is nothing to load)."""
        flat = weight.reshape(-1)
        n = min(flat.numel() * flat.element_size(), max_bytes) // 4
        if n == 0 or not weight.is_contiguous() or flat.element_size() not in (1, 2, 4):
            return None
        per_word = 4 // flat.element_size()
        return cls(flat[: n * per_word].view(torch.int32), sink)


def _prefetch_args(prefetch: Prefetch | None, anything: torch.Tensor) -> tuple:
    """(words, count, sink, programs) for a kernel launch; `anything` stands in for absent pointers."""
    if prefetch is None:
        return anything, 0, anything, 0
    return prefetch.words, prefetch.words.numel(), prefetch.sink, PREFETCH_PROGRAMS


@triton.jit(do_not_specialize=ROW_COUNTS)
def _push_allreduce_rmsnorm_kernel(
    buffers, offset, slot_stride,  # int64 [WORLD] base addresses; receive slot of rank r at offset + r * slot_stride
    res_ptr, w_ptr, out_ptr, res_out_ptr,  # contiguous rows of [N, H]
    rows, hidden, eps, row_programs,
    pf_words, pf_count, sink,  # L2 prefetch by the programs past row_programs (PREFETCH only)
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr, PREFETCH: tl.constexpr,
    PF_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if _is_prefetcher(pid, row_programs, PREFETCH):
        _prefetch_to_l2(pf_words, pf_count, sink, pid - row_programs, tl.num_programs(0) - row_programs, PF_BLOCK)
    else:
        _push_rows(buffers, offset, slot_stride, res_ptr, w_ptr, out_ptr, res_out_ptr, rows, hidden, eps,
                   pid, row_programs, RANK, WORLD, BLOCK, BITS)


@triton.jit
def _push_rows(buffers, offset, slot_stride, res_ptr, w_ptr, out_ptr, res_out_ptr, rows, hidden, eps,
               pid, row_programs, RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr,
               BITS: tl.constexpr):
    bits_ty = tl.int16 if BITS == 16 else tl.int32
    mark = -(1 << (BITS - 1))  # the bits of -0.0
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    elem = res_ptr.dtype.element_ty
    own = tl.load(buffers + RANK).to(tl.pointer_type(bits_ty)) + offset
    for row in range(pid, rows, row_programs):  # every row sent before any is waited for
        mine = tl.load(own + RANK * slot_stride + row * hidden + cols, mask=mask, other=0)
        mine = tl.where(mine == mark, 0, mine)  # -0.0 would read as "not arrived"
        for r in tl.static_range(WORLD):
            if r != RANK:
                peer = tl.load(buffers + r).to(tl.pointer_type(bits_ty)) + offset
                tl.store(peer + RANK * slot_stride + row * hidden + cols, mine, mask=mask)
    for row in range(pid, rows, row_programs):
        acc = tl.zeros((BLOCK,), tl.float32)
        for r in tl.static_range(WORLD):  # rank order: the same sum on every rank
            src = own + r * slot_stride + row * hidden + cols
            if r == RANK:
                got = tl.load(src, mask=mask, other=0)
                got = tl.where(got == mark, 0, got)  # as sent
            else:
                got = tl.load(src, mask=mask, other=0, volatile=True)
                while tl.max((got == mark).to(tl.int32), axis=0) > 0:
                    got = tl.load(src, mask=mask, other=0, volatile=True)
                tl.store(src, tl.full((BLOCK,), mark, bits_ty), mask=mask)  # ready for its next use
            acc += got.to(elem, bitcast=True).to(tl.float32)
        _residual_norm_store(acc, res_ptr, res_out_ptr, out_ptr, w, row, hidden, cols, mask, eps)


def push_allreduce_rmsnorm(buffers: torch.Tensor, offset: int, slot_stride: int, rank: int,
                           residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           max_programs: int = 128, prefetch: Prefetch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As `allreduce_rmsnorm`, through receive slots: rank r's partials [N, H] are at element
    offset + r * slot_stride of every rank's buffer (its own written by its GEMM, the others by
    this kernel); a peer's slot must hold -0.0 everywhere until its data arrives. A program
    waits for the peers' programs of the same index: `max_programs` keeps them all resident."""
    rows, hidden = residual.shape
    if not residual.is_contiguous() or weight.shape != (hidden,) or residual.element_size() not in (2, 4):
        raise ValueError(f"push_allreduce_rmsnorm needs a contiguous 16- or 32-bit residual [N, H] and weight "
                         f"[H]; got {tuple(residual.shape)} {residual.dtype} and {tuple(weight.shape)}")
    out, res_out = torch.empty_like(residual), torch.empty_like(residual)
    row_programs = max(1, min(rows, max_programs))
    pf = _prefetch_args(prefetch, residual)
    _push_allreduce_rmsnorm_kernel[(row_programs + pf[3],)](
        buffers, offset, slot_stride, residual, weight, out, res_out, rows, hidden, eps, row_programs, *pf[:3],
        RANK=rank, WORLD=buffers.numel(), BLOCK=triton.next_power_of_2(hidden),
        BITS=8 * residual.element_size(), PREFETCH=pf[3] > 0, PF_BLOCK=PREFETCH_BLOCK, num_warps=NUM_WARPS,
    )
    return out, res_out
