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
after the reset of k."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.rmsnorm import NORM_NUM_WARPS, norm_store_row

EPOCH_MOD = 1 << 30
_EPOCH_MOD: tl.constexpr = tl.constexpr(EPOCH_MOD)  # the kernels' view of it
# 4, 8, 16 warps: within 0.6 us up to 128 rows, 16 ahead by 1.5 us at 256-512 (2xH200, PERF.md)
NUM_WARPS = NORM_NUM_WARPS
# Arguments that change from step to step in eager (prefill) steps: specializing on them (% 16,
# == 1) would compile new variants mid-run (harness.kernels.jit_watch)
ROW_COUNTS = ["rows"]


@triton.jit
def _residual_norm_store(acc, res_ptr, res_out_ptr, out_ptr, w, row, hidden, cols, mask, eps):
    """Row `row` of the sum `acc` (fp32): add the residual, store it and its RMSNorm, with the
    same roundings as an all-reduce in the residual's dtype followed by the RMSNorm kernel."""
    x = acc.to(res_ptr.dtype.element_ty) + tl.load(res_ptr + row * hidden + cols, mask=mask, other=0.0)
    tl.store(res_out_ptr + row * hidden + cols, x, mask=mask)
    norm_store_row(x, w, out_ptr + row * hidden, cols, mask, hidden, eps)


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
    rows, hidden, eps,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    _barrier(signal_pads, epochs, pid, RANK, WORLD)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    elem = res_ptr.dtype.element_ty
    for row in range(pid, rows, tl.num_programs(0)):
        acc = tl.zeros((BLOCK,), tl.float32)
        for r in tl.static_range(WORLD):  # rank order: the same sum on every rank
            part = tl.load(buffers + r).to(tl.pointer_type(elem)) + offset + row * hidden
            acc += tl.load(part + cols, mask=mask, other=0.0).to(tl.float32)
        _residual_norm_store(acc, res_ptr, res_out_ptr, out_ptr, w, row, hidden, cols, mask, eps)


def allreduce_rmsnorm(buffers: torch.Tensor, signal_pads: torch.Tensor, epochs: torch.Tensor, offset: int,
                      rank: int, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
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
    _allreduce_rmsnorm_kernel[(max(1, min(rows, epochs.numel())),)](
        buffers, signal_pads, epochs, offset, residual, weight, out, res_out, rows, hidden, eps,
        RANK=rank, WORLD=world, BLOCK=triton.next_power_of_2(hidden), num_warps=NUM_WARPS,
    )
    return out, res_out


@triton.jit(do_not_specialize=ROW_COUNTS)
def _push_allreduce_rmsnorm_kernel(
    buffers, offset, slot_stride,  # int64 [WORLD] base addresses; receive slot of rank r at offset + r * slot_stride
    res_ptr, w_ptr, out_ptr, res_out_ptr,  # contiguous rows of [N, H]
    rows, hidden, eps,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr,
):
    pid = tl.program_id(0)
    bits_ty = tl.int16 if BITS == 16 else tl.int32
    mark = -(1 << (BITS - 1))  # the bits of -0.0
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    elem = res_ptr.dtype.element_ty
    own = tl.load(buffers + RANK).to(tl.pointer_type(bits_ty)) + offset
    for row in range(pid, rows, tl.num_programs(0)):  # every row sent before any is waited for
        mine = tl.load(own + RANK * slot_stride + row * hidden + cols, mask=mask, other=0)
        mine = tl.where(mine == mark, 0, mine)  # -0.0 would read as "not arrived"
        for r in tl.static_range(WORLD):
            if r != RANK:
                peer = tl.load(buffers + r).to(tl.pointer_type(bits_ty)) + offset
                tl.store(peer + RANK * slot_stride + row * hidden + cols, mine, mask=mask)
    for row in range(pid, rows, tl.num_programs(0)):
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
                           max_programs: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """As `allreduce_rmsnorm`, through receive slots: rank r's partials [N, H] are at element
    offset + r * slot_stride of every rank's buffer (its own written by its GEMM, the others by
    this kernel); a peer's slot must hold -0.0 everywhere until its data arrives. A program
    waits for the peers' programs of the same index: `max_programs` keeps them all resident."""
    rows, hidden = residual.shape
    if not residual.is_contiguous() or weight.shape != (hidden,) or residual.element_size() not in (2, 4):
        raise ValueError(f"push_allreduce_rmsnorm needs a contiguous 16- or 32-bit residual [N, H] and weight "
                         f"[H]; got {tuple(residual.shape)} {residual.dtype} and {tuple(weight.shape)}")
    out, res_out = torch.empty_like(residual), torch.empty_like(residual)
    _push_allreduce_rmsnorm_kernel[(max(1, min(rows, max_programs)),)](
        buffers, offset, slot_stride, residual, weight, out, res_out, rows, hidden, eps,
        RANK=rank, WORLD=buffers.numel(), BLOCK=triton.next_power_of_2(hidden),
        BITS=8 * residual.element_size(), num_warps=NUM_WARPS,
    )
    return out, res_out
