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
barrier of all-reduce k+1 knows its peers are done reading its buffer of all-reduce k."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.rmsnorm import norm_store_row

EPOCH_MOD = 1 << 30
_EPOCH_MOD: tl.constexpr = tl.constexpr(EPOCH_MOD)  # the kernels' view of it
NUM_WARPS = 8  # 4, 8 and 16 measured within 0.7 us of each other (2xH200, reports/PERF.md)


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


@triton.jit
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
        # the same roundings as an all-reduce in `elem` followed by the residual RMSNorm kernel
        x = acc.to(elem) + tl.load(res_ptr + row * hidden + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * hidden + cols, x, mask=mask)
        norm_store_row(x, w, out_ptr + row * hidden, cols, mask, hidden, eps)


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
    grid = (max(1, min(rows, epochs.numel())),)
    _allreduce_rmsnorm_kernel[grid](
        buffers, signal_pads, epochs, offset, residual, weight, out, res_out, rows, hidden, eps,
        RANK=rank, WORLD=world, BLOCK=triton.next_power_of_2(hidden), num_warps=NUM_WARPS,
    )
    return out, res_out
