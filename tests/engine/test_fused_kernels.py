"""Fused elementwise kernels (RMSNorm, residual add + RMSNorm, q/k norm + rotary, SiLU * up)
against the torch layers they replace on the GPU; fp32/fp16 under TRITON_INTERPRET on CPU,
bf16 on a GPU. Run: pytest tests/test_fused_kernels.py"""

from __future__ import annotations

import pytest
import torch

from engine.kernels.allreduce_rmsnorm import EPOCH_MOD, allreduce_rmsnorm, push_allreduce_rmsnorm
from engine.kernels.rmsnorm import rmsnorm
from engine.kernels.rope import qk_norm_rope
from engine.kernels.silu_mul import silu_mul
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])
def test_rmsnorm_with_and_without_residual(dtype, hidden):
    x, res = torch.randn(2, 7, hidden, device=DEVICE, dtype=dtype).unbind(0)
    norm = RMSNorm(hidden, 1e-6).to(DEVICE, dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    want = norm._norm(x)
    assert rel(rmsnorm(x, norm.weight, 1e-6), want) < TOL[dtype]
    got, got_res = rmsnorm(x, norm.weight, 1e-6, residual=res)
    want, want_res = norm._norm(x + res), x + res
    assert rel(got_res, want_res) < TOL[dtype] and rel(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 3)])  # (6, 3): padded head rows are masked
def test_qk_norm_rope_matches_layers(dtype, norm, hq, hkv):
    t, d = 5, 32
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEVICE, dtype=dtype)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hkv, d)  # strided views, as in the model
    rotary = RotaryEmbedding(d, 64, 10000.0).to(DEVICE)
    qn, kn = RMSNorm(d).to(DEVICE, dtype), RMSNorm(d).to(DEVICE, dtype)
    qn.weight.data.uniform_(0.5, 1.5)
    kn.weight.data.uniform_(0.5, 1.5)
    pos = torch.tensor([0, 3, 17, 63, 5], device=DEVICE)
    got_q, got_k = qk_norm_rope(q, k, pos, rotary.cos, rotary.sin, qn.weight if norm else None,
                                kn.weight if norm else None, qn.eps)
    rq, rk = (qn(q), kn(k)) if norm else (q, k)
    cos, sin = rotary.cos[pos].unsqueeze(1), rotary.sin[pos].unsqueeze(1)
    from engine.layers.rotary import _apply

    assert rel(got_q, _apply(rq, cos, sin)) < TOL[dtype]
    assert rel(got_k, _apply(rk, cos, sin)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,hq,hkv", [(True, 4, 2), (False, 6, 3)])
def test_qk_norm_rope_can_store_k_and_v_into_the_cache(dtype, norm, hq, hkv):
    """With a KVStore the kernel returns the same q and writes the rotated k (the bits it would
    have returned) and v into the paged caches at their slots; slot -1 (a padded token) and every
    other slot stay as they were."""
    from engine.kernels.rope import KVStore

    t, d, bs = 5, 32, 4
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEVICE, dtype=dtype)
    q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    rotary = RotaryEmbedding(d, 64, 10000.0).to(DEVICE)
    w = torch.empty(d, device=DEVICE, dtype=dtype).uniform_(0.5, 1.5) if norm else None
    pos = torch.tensor([0, 3, 17, 63, 5], device=DEVICE)
    slots = torch.tensor([9, 2, -1, 14, 4], device=DEVICE)
    k_cache = torch.randn(5, bs, hkv, d, device=DEVICE, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    want_q, want_k = qk_norm_rope(q, k, pos, rotary.cos, rotary.sin, w, w, 1e-6)
    got_q, got_k = qk_norm_rope(q, k, pos, rotary.cos, rotary.sin, w, w, 1e-6, KVStore(v, k_cache, v_cache, slots))
    assert got_k is None and torch.equal(got_q, want_q)
    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    stored = [i for i, s in enumerate(slots.tolist()) if s >= 0]
    assert torch.equal(flat_k[slots[stored]], want_k[stored]) and torch.equal(flat_v[slots[stored]], v[stored])
    untouched = [s for s in range(flat_k.shape[0]) if s not in slots.tolist()]
    assert torch.equal(flat_k[untouched], k_before.view(-1, hkv, d)[untouched])
    assert torch.equal(flat_v[untouched], v_before.view(-1, hkv, d)[untouched])
    with pytest.raises(ValueError, match="slot_mapping"):
        qk_norm_rope(q, k, pos, rotary.cos, rotary.sin, w, w, 1e-6, KVStore(v, k_cache, v_cache, slots[:3]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    x = torch.randn(3, 2 * 80, device=DEVICE, dtype=dtype)
    gate, up = x.chunk(2, dim=-1)
    assert rel(silu_mul(x), torch.nn.functional.silu(gate) * up) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world,rank", [(2, 0), (2, 1), (3, 2)])
def test_allreduce_rmsnorm_is_sum_then_residual_norm(dtype, world, rank):
    """One process plays `rank`: the peers' partials sit in tensors of their own and their
    barrier signals are already in its pad. More rows than programs: each program loops."""
    rows, hidden, offset, programs = 7, 96, 40, 3
    parts = [torch.randn(offset + rows * hidden, device=DEVICE, dtype=dtype) for _ in range(world)]
    pads = [torch.zeros(programs, world, device=DEVICE, dtype=torch.int32) for _ in range(world)]
    epochs = torch.zeros(programs, device=DEVICE, dtype=torch.int32)
    addr = lambda ts: torch.tensor([t.data_ptr() for t in ts], device=DEVICE, dtype=torch.int64)  # noqa: E731
    weight = torch.empty(hidden, device=DEVICE, dtype=dtype).uniform_(0.5, 1.5)
    peers = [p for p in range(world) if p != rank]
    # the peers arrive at epoch 1; then the first of them is already one barrier ahead; then
    # the counters wrap around
    rounds = [(0, 1, [1] * len(peers)), (1, 2, [3] + [2] * (len(peers) - 1)), (EPOCH_MOD, 1, [2] * len(peers))]
    for start, epoch, arrived in rounds:
        epochs.fill_(start)
        pads[rank][:, peers] = torch.tensor(arrived, device=DEVICE, dtype=torch.int32)
        residual = torch.randn(rows, hidden, device=DEVICE, dtype=dtype)
        out, res_out = allreduce_rmsnorm(addr(parts), addr(pads), epochs, offset, rank, residual, weight, 1e-6)
        total = sum(p[offset:].view(rows, hidden).float() for p in parts).to(dtype)  # in rank order
        want, want_res = rmsnorm(total, weight, 1e-6, residual)
        assert torch.equal(res_out, want_res) and torch.equal(out, want)
        # this rank's epoch counted, and left in its own slot of every pad
        assert epochs.tolist() == [epoch] * programs
        assert all(pads[p][:, rank].tolist() == [epoch] * programs for p in range(world))
        for part in parts:  # new partial sums, as the next GEMM would write
            part.normal_()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world,rank", [(2, 0), (2, 1), (3, 2)])
def test_push_allreduce_rmsnorm_sends_sums_and_resets(dtype, world, rank):
    """The one-trip variant, one process playing `rank`: its GEMM's partials are in its own
    slot, the peers' have already arrived in theirs, and the peers' buffers wait for this rank's."""
    rows, hidden, offset, stride = 5, 96, 24, 5 * 96 + 8
    neg0 = torch.tensor(-0.0, dtype=dtype)
    bufs = [torch.full((offset + world * stride,), -0.0, device=DEVICE, dtype=dtype) for _ in range(world)]
    slot = lambda p, r: bufs[p][offset + r * stride:][:rows * hidden].view(rows, hidden)  # noqa: E731
    parts = [torch.randn(rows, hidden, device=DEVICE, dtype=dtype) for _ in range(world)]
    parts[rank][0, :3] = neg0  # sent as +0.0: -0.0 marks "not arrived"
    for r in range(world):
        slot(rank, r).copy_(parts[r])
    residual = torch.randn(rows, hidden, device=DEVICE, dtype=dtype)
    weight = torch.empty(hidden, device=DEVICE, dtype=dtype).uniform_(0.5, 1.5)
    addr = torch.tensor([b.data_ptr() for b in bufs], device=DEVICE, dtype=torch.int64)
    out, res_out = push_allreduce_rmsnorm(addr, offset, stride, rank, residual, weight, 1e-6, max_programs=2)
    want, want_res = rmsnorm(sum(p.float() for p in parts).to(dtype), weight, 1e-6, residual)
    assert torch.equal(res_out, want_res) and torch.equal(out, want)
    sent = parts[rank].clone()
    sent[0, :3] = 0.0
    for p in range(world):
        if p != rank:
            got = slot(p, rank)  # this rank's partials arrived in every peer, -0.0 as +0.0
            assert torch.equal(got, sent) and not torch.signbit(got[0, :3]).any()
            assert torch.signbit(slot(rank, p)).all() and not slot(rank, p).any()  # reset to -0.0


def test_shape_errors():
    with pytest.raises(ValueError, match="rmsnorm"):
        rmsnorm(torch.randn(2, 3, 4), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="silu_mul"):
        silu_mul(torch.randn(3, 5))
    ptrs = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="allreduce_rmsnorm"):  # a signal pad short
        allreduce_rmsnorm(ptrs, ptrs[:2], torch.zeros(8, dtype=torch.int32), 0, 0, torch.randn(2, 4), torch.ones(4), 1e-6)


def test_gumbel_argmax_greedy_rows_and_distribution():
    from engine.kernels.sample import gumbel_argmax

    logits = torch.randn(3, 5000, device=DEVICE)
    got = gumbel_argmax(logits, torch.zeros(3, device=DEVICE), torch.arange(3, device=DEVICE))
    assert torch.equal(got, logits.argmax(-1))
    probs = torch.tensor([0.1, 0.2, 0.7], device=DEVICE)
    n = 600  # 3.2 standard deviations of the p = 0.7 frequency within atol (the interpreter runs a program a row)
    rows = probs.log().repeat(n, 1)
    ids = gumbel_argmax(rows, torch.ones(n, device=DEVICE), torch.arange(n, device=DEVICE))
    freq = torch.bincount(ids, minlength=3).float() / n
    assert torch.allclose(freq, probs, atol=0.06), freq
    again = gumbel_argmax(rows[:5], torch.ones(5, device=DEVICE), torch.arange(5, device=DEVICE))
    assert torch.equal(again, ids[:5])  # same seeds, same draws


def test_gumbel_noise_draws_the_softmax_distribution():
    """The hash noise, rows with consecutive seeds (the sampler's are random, these are the
    worst case for a weak hash): 600 draws from softmax(logits / T) over 12 columns pass a
    chi-square test at p = 0.001 (df 11: 31.26; the test fails, chi-square in the hundreds, with
    the hash left out), and a greedy-like temperature puts the mass on the top column.
    (16-column chunks: the interpreter's cost is per program and per lane.)"""
    from engine.kernels.sample import gumbel_argmax

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2, -2.0, 0.8, 0.1, -0.3], device=DEVICE)
    n, temp = 600, 1.5  # every expected count >= 9
    ids = gumbel_argmax(logits.repeat(n, 1), torch.full((n,), temp, device=DEVICE),
                        torch.arange(n, device=DEVICE) + 1000, chunk=16)
    observed = torch.bincount(ids, minlength=12).double()
    expected = (logits.double() / temp).softmax(0) * n
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 31.26, (chi2, observed.tolist())
    cold = gumbel_argmax(logits.repeat(50, 1), torch.full((50,), 0.05, device=DEVICE),
                         torch.arange(50, device=DEVICE), chunk=16)
    assert (cold == 0).all()  # p(column 0) > 1 - 1e-4 at T 0.05


def test_gumbel_argmax_across_vocab_chunks():
    """Rows longer than one chunk: the winner is found in any chunk, ties go to the leftmost
    column (as torch.argmax), and the drawn noise does not depend on the chunking (the default,
    8,192-column chunks, one chunk spanning the row, and 1,000-column chunks that end inside a
    loop step)."""
    from engine.kernels import sample

    vocab = 2 * sample.CHUNK + 123
    logits = torch.randn(4, vocab, device=DEVICE)
    logits[0, [sample.CHUNK + 5, 2 * sample.CHUNK + 7]] = 50.0  # a tie across two chunks
    logits[1, -1] = 50.0  # the last column of a partial chunk
    logits[2, 3] = 50.0
    for chunk in (None, sample.CHUNK):
        got = sample.gumbel_argmax(logits, torch.zeros(4, device=DEVICE), torch.arange(4, device=DEVICE), chunk)
        assert got.tolist()[:3] == [sample.CHUNK + 5, vocab - 1, 3]
        assert torch.equal(got, logits.argmax(-1))
    # temperature > 0: the same ids however the row is cut (noise is keyed by column)
    temps, seeds = torch.ones(4, device=DEVICE), torch.arange(4, device=DEVICE) + 11
    flat = torch.randn(4, vocab, device=DEVICE)
    ids = [sample.gumbel_argmax(flat, temps, seeds, chunk) for chunk in (None, sample.CHUNK, vocab, 1000)]
    assert all(torch.equal(ids[0], other) for other in ids[1:])
    with pytest.raises(ValueError, match="chunk must be"):
        sample.gumbel_chunks(flat, temps, seeds, chunk=0)


def test_chunk_size_keeps_the_sms_busy_at_small_batches():
    """8,192-column chunks once the batch fills the SMs four programs deep, one loop step (2,048
    columns) below: a 151,936-token row at batch 1 is 75 programs, not 19."""
    from engine.kernels.sample import BLOCK, CHUNK, chunk_size

    vocab = 151_936
    assert [chunk_size(b, vocab, 132) for b in (1, 16, 27, 28, 256)] == [BLOCK, BLOCK, BLOCK, CHUNK, CHUNK]
    assert chunk_size(1, vocab, 4) == CHUNK  # 19 programs fill 4 SMs four deep


def test_gumbel_sampling_over_vocab_slices_equals_whole_rows():
    """Tensor parallelism samples each rank's vocabulary slice and picks among the slices' chunk
    winners: the same ids as sampling whole rows, greedy ties included (leftmost across slices),
    with the last slice padded past the vocabulary as the LM head pads it."""
    from engine.kernels import sample

    vocab, world = 2 * sample.CHUNK + 301, 2
    per_rank = -(-vocab // world)
    logits = torch.randn(6, vocab, device=DEVICE)
    logits[0, [5, per_rank + 9]] = 50.0  # a greedy tie across the two slices
    logits[1, vocab - 1] = 50.0  # the last real column, next to the padding
    temps = torch.tensor([0.0, 0.0, 0.0, 0.7, 1.0, 1.5], device=DEVICE)
    seeds = torch.arange(6, device=DEVICE) + 3
    padded = torch.cat([logits, torch.full((6, world * per_rank - vocab), 99.0, device=DEVICE)], 1)
    slices = [sample.gumbel_chunks(padded[:, r * per_rank:(r + 1) * per_rank].contiguous(), temps, seeds,
                                   col_offset=r * per_rank, num_cols=min(per_rank, vocab - r * per_rank))
              for r in range(world)]
    got = sample.pick_from_chunks(torch.stack(slices))
    whole = sample.gumbel_argmax(logits, temps, seeds)
    assert torch.equal(got, whole)
    assert got.tolist()[:2] == [5, vocab - 1]
    assert torch.equal(got[:3], logits[:3].argmax(-1))
    with pytest.raises(ValueError, match="num_cols"):
        sample.gumbel_chunks(logits, temps, seeds, num_cols=vocab + 1)
    with pytest.raises(ValueError, match="pick_from_chunks"):
        sample.pick_from_chunks(torch.zeros(3, 6, 2, dtype=torch.int32))
