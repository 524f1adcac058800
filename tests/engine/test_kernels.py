"""Triton kernels (KV store, unified attention, split-K decode, backend) vs the torch oracle.

CPU (interpreter, fp32/fp16):  TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py -q
GPU (bf16 cases):              PYTHONPATH=. python3 -m pytest tests/test_kernels.py -m gpu -q

Every case draws fresh random inputs, fills every cache slot that no valid key occupies with NaN
(so an unmasked read shows up) and poisons outputs with NaN before the kernel runs. Errors are
||out - ref|| / ||ref|| against a float64 reference.
"""

from __future__ import annotations

import importlib
import os
import zlib
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from engine.attention.metadata import AttentionMetadata  # noqa: E402
from engine.attention.torch_backend import (  # noqa: E402
    TorchAttention,
    paged_attention_ref,
    store_kv_ref,
)
from engine.attention.triton_backend import TritonAttention  # noqa: E402
from engine.kernels import (  # noqa: E402
    alloc_decode_scratch,
    choose_num_splits,
    decode_attention,
    store_kvcache,
    unified_attention,
)

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    # The interpreter computes bf16 wrongly: bf16 runs only on a GPU.
    pytest.param(torch.bfloat16, id="bf16", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="bf16 needs a CUDA device")]),
]


@pytest.fixture
def gen(request) -> torch.Generator:
    """Per-test seeded generator: fresh inputs for every case, reproducible by test id."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@dataclass
class Case:
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hkv, D]
    v: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, bs, Hkv, D]; unused slots NaN
    v_cache: torch.Tensor
    meta: AttentionMetadata
    valid: torch.Tensor  # [T] bool: token belongs to a real (seq_len > 0) sequence
    scale: float


def build_case(specs: list[tuple[int, int]], hq: int, hkv: int, d: int, bs: int,
               dtype: torch.dtype, gen: torch.Generator, max_seq_len: int | None = None) -> Case:
    """specs: (seq_len, q_len) per sequence; (0, 1) is a padded decode lane (slot -1)."""
    need = [-(-s // bs) for s, _ in specs]
    num_blocks = 1 + sum(need) + 2  # null block 0, then two spare blocks
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(specs), max(need + [1]) + 2, dtype=torch.int32)
    slots, qsl, valid = [], [0], []
    for i, ((seq_len, q_len), n) in enumerate(zip(specs, need)):
        table[i, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
        for pos in range(seq_len - q_len, seq_len):
            slots.append(int(table[i, pos // bs]) * bs + pos % bs if seq_len > 0 else -1)
            valid.append(seq_len > 0)
        qsl.append(qsl[-1] + q_len)
    t = qsl[-1]
    shape = (num_blocks, bs, hkv, d)
    k_cache, v_cache = (torch.randn(shape, generator=gen) for _ in range(2))
    written = torch.zeros(num_blocks * bs, dtype=torch.bool)  # slots holding a valid old key
    for i, (seq_len, q_len) in enumerate(specs):
        for pos in range(seq_len - q_len):
            written[int(table[i, pos // bs]) * bs + pos % bs] = True
    k_cache.view(-1, hkv, d)[~written] = float("nan")
    v_cache.view(-1, hkv, d)[~written] = float("nan")
    lens = [s for s, _ in specs]
    max_q = max(q for _, q in specs)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
        block_tables=table.to(DEVICE), max_query_len=max_q,
        max_seq_len=max_seq_len or max(lens), query_start_loc_cpu=qsl, seq_lens_cpu=lens)
    q, k, v = (torch.randn(t, h, d, generator=gen).to(DEVICE, dtype) for h in (hq, hkv, hkv))
    return Case(q, k, v, k_cache.to(DEVICE, dtype), v_cache.to(DEVICE, dtype), meta,
                torch.tensor(valid, dtype=torch.bool), d ** -0.5)


def reference(case: Case) -> torch.Tensor:
    """float64 store + attention on CPU copies; returns [T, Hq, D] float64."""
    m = case.meta
    kc, vc = case.k_cache.cpu().double(), case.v_cache.cpu().double()
    store_kv_ref(case.k.cpu().double(), case.v.cpu().double(), kc, vc, m.slot_mapping.cpu())
    cpu_meta = AttentionMetadata(m.slot_mapping.cpu(), m.query_start_loc.cpu(), m.seq_lens.cpu(),
                                 m.block_tables.cpu(), m.max_query_len, m.max_seq_len,
                                 m.query_start_loc_cpu, m.seq_lens_cpu)
    return paged_attention_ref(case.q.cpu().double(), kc, vc, cpu_meta, case.scale)


def assert_close(out: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor,
                 dtype: torch.dtype) -> None:
    out = out.cpu().double()
    assert torch.isfinite(out[valid]).all(), "NaN/inf or unwritten rows in the output"
    err = ((out[valid] - ref[valid]).norm() / ref[valid].norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e}"
    if (~valid).any():  # padded decode lanes must come out as zeros, not NaN
        assert (out[~valid] == 0).all()


# ---------------------------------------------------------------- KV store


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [16, 32])
def test_store_kvcache(dtype, bs, gen):
    case = build_case([(37, 5), (0, 1), (bs, bs), (bs + 1, 1), (0, 1)], 4, 2, 32, bs, dtype, gen)
    # k/v as strided views of a fused qkv projection, as the model produces them.
    qkv = torch.randn(case.k.shape[0], 8, 32, generator=gen).to(DEVICE, dtype)
    k, v = qkv[:, 4:6], qkv[:, 6:8]
    kc, vc = case.k_cache.clone(), case.v_cache.clone()
    store_kvcache(k, v, kc, vc, case.meta.slot_mapping)
    kr, vr = case.k_cache.clone(), case.v_cache.clone()
    store_kv_ref(k, v, kr, vr, case.meta.slot_mapping)
    torch.testing.assert_close(kc, kr, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, vr, rtol=0, atol=0, equal_nan=True)


def _store_args(**over):
    args = dict(k=torch.randn(3, 2, 16), v=torch.randn(3, 2, 16), k_cache=torch.randn(4, 16, 2, 16),
                v_cache=torch.randn(4, 16, 2, 16), slot_mapping=torch.tensor([0, -1, 5]))
    args.update(over)
    return args


@pytest.mark.parametrize("over, match", [
    (dict(v=torch.randn(3, 2, 8)), "k and v"),
    (dict(k_cache=torch.randn(4, 16, 4, 16)), "num_kv_heads"),
    (dict(v_cache=torch.randn(4, 16, 2, 16).half()), "dtype"),
    (dict(slot_mapping=torch.tensor([0, 1, 2], dtype=torch.int32)), "slot_mapping"),
    (dict(slot_mapping=torch.tensor([0, 1])), "slot_mapping"),
    (dict(k=torch.randn(3, 16, 2).transpose(1, 2)), "contiguous"),
])
def test_store_kvcache_errors(over, match):
    with pytest.raises(ValueError, match=match):
        store_kvcache(**_store_args(**over))


# ---------------------------------------------------------------- unified attention

UNIFIED_CASES = {  # id: (specs [(seq_len, q_len)], Hq, Hkv, D, block_size)
    "prefill_varlen": ([(17, 17), (5, 5), (33, 33)], 4, 2, 32, 16),
    "block_edges_bs16": ([(32, 7), (31, 7), (33, 7), (48, 1)], 4, 2, 16, 16),
    "block_edges_bs32": ([(64, 20), (63, 3), (65, 33)], 4, 2, 16, 32),
    "gqa1": ([(29, 29), (40, 3)], 2, 2, 16, 16),
    "gqa4": ([(29, 29), (40, 3)], 8, 2, 16, 16),
    "gqa8": ([(29, 29), (40, 3)], 8, 1, 16, 16),
    "gqa3_d24": ([(21, 9), (9, 9)], 6, 2, 24, 16),
    "prefix_hit": ([(90, 10), (81, 17)], 4, 2, 32, 16),
    "mixed": ([(40, 1), (17, 1), (64, 30), (20, 0), (50, 20), (1, 1)], 4, 2, 32, 16),
    "chunk_at_small_limit": ([(70, 16), (48, 16), (3, 2)], 4, 2, 16, 16),
    # several 64-query blocks a sequence (run last first), whole unmasked key tiles below the diagonal
    "multi_q_block": ([(200, 200), (300, 140), (70, 70)], 4, 2, 32, 16),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(UNIFIED_CASES))
def test_unified_attention(name, dtype, gen):
    specs, hq, hkv, d, bs = UNIFIED_CASES[name]
    c = build_case(specs, hq, hkv, d, bs, dtype, gen)
    m = c.meta
    store_kvcache(c.k, c.v, c.k_cache, c.v_cache, m.slot_mapping)
    out = torch.full_like(c.q, float("nan"))
    unified_attention(c.q, c.k_cache, c.v_cache, out, m.query_start_loc, m.seq_lens,
                      m.block_tables, m.max_query_len, m.max_seq_len, c.scale)
    assert_close(out, reference(c), c.valid, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("specs, num_tokens, num_seqs", [
    ([(40, 1), (64, 30), (90, 10), (3, 3)], 64, 8),  # mixed + prefix hit: both tile launches
    ([(40, 1), (17, 1), (9, 5)], 48, 6),  # all short, yet captured for up to 48 queries
    ([(7, 7), (30, 1)], 16, 16),  # T <= SMALL_Q_MAX: the small tile alone
])
def test_unified_attention_padded_as_a_graph(specs, num_tokens, num_seqs, dtype, gen):
    """A prefill CUDA graph's view of a step (engine/graph_shapes.py): T padded tokens that own
    no sequence, S sequence rows of which the padded ones have no queries and length 0, block
    tables read at full width with stale rows and columns, max_query_len = T. The real rows
    match the reference; padded rows of out are not written."""
    c = build_case(specs, 4, 2, 32, 16, dtype, gen)
    m, t_real, b = c.meta, c.q.shape[0], len(specs)
    store_kvcache(c.k, c.v, c.k_cache, c.v_cache, m.slot_mapping)
    q = torch.cat([c.q, torch.randn(num_tokens - t_real, *c.q.shape[1:], generator=gen).to(DEVICE, c.q.dtype)])
    qsl = torch.cat([m.query_start_loc, torch.full((num_seqs - b,), t_real, dtype=torch.int32, device=DEVICE)])
    seq_lens = torch.cat([m.seq_lens, torch.zeros(num_seqs - b, dtype=torch.int32, device=DEVICE)])
    stale = 1 << 20  # a block id far past the cache: reading it would fault or give garbage
    tables = torch.full((num_seqs, m.block_tables.shape[1] + 4), stale, dtype=torch.int32, device=DEVICE)
    tables[:b, : m.block_tables.shape[1]] = m.block_tables
    for i, (seq_len, _) in enumerate(specs):  # stale entries also past each real table's end
        tables[i, -(-seq_len // 16):] = stale
    out = torch.full_like(q, float("nan"))
    unified_attention(q, c.k_cache, c.v_cache, out, qsl, seq_lens, tables, num_tokens, 8192, c.scale)
    assert_close(out[:t_real], reference(c), c.valid, dtype)
    assert torch.isnan(out[t_real:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_unified_attention_tile_overrides(dtype, gen):
    """Tiles smaller than a block (16 < 32) and 32-row large tiles: same answer."""
    c = build_case([(40, 1), (70, 35), (33, 18)], 4, 2, 16, 32, dtype, gen)
    m = c.meta
    store_kvcache(c.k, c.v, c.k_cache, c.v_cache, m.slot_mapping)
    out = torch.full_like(c.q, float("nan"))
    unified_attention(c.q, c.k_cache, c.v_cache, out, m.query_start_loc, m.seq_lens,
                      m.block_tables, m.max_query_len, m.max_seq_len, c.scale,
                      small_cfg=(16, 16, 4, 1), large_cfg=(32, 16, 4, 1))
    assert_close(out, reference(c), c.valid, dtype)


def test_unified_attention_errors(gen):
    c = build_case([(20, 4)], 4, 2, 16, 16, torch.float32, gen)
    m = c.meta
    base = dict(q=c.q, k_cache=c.k_cache, v_cache=c.v_cache, out=torch.empty_like(c.q),
                query_start_loc=m.query_start_loc, seq_lens=m.seq_lens, block_tables=m.block_tables,
                max_query_len=4, max_seq_len=20, scale=c.scale)
    bad = [
        (dict(query_start_loc=m.query_start_loc.long()), "query_start_loc"),
        (dict(seq_lens=torch.tensor([20, 3], dtype=torch.int32, device=DEVICE)), "query_start_loc"),
        (dict(q=torch.randn(4, 3, 16, device=DEVICE), out=torch.empty(4, 3, 16, device=DEVICE)),
         "multiple"),
        (dict(out=torch.empty_like(c.q).half()), "dtype"),
        (dict(block_tables=m.block_tables.long()), "block_tables"),
    ]
    for over, match in bad:
        with pytest.raises(ValueError, match=match):
            unified_attention(**{**base, **over})


# ---------------------------------------------------------------- split-K decode

DECODE_CASES = {  # id: (seq_lens, Hq, Hkv, D, block_size, num_splits, BLOCK_N)
    "gqa1_s1": ([33, 16, 1, 47], 2, 2, 16, 16, 1, 64),
    "gqa2_s3_n32": ([32, 31, 33, 5], 4, 2, 32, 16, 3, 32),
    "gqa4_s4_bs32": ([64, 63, 65, 96], 8, 2, 16, 32, 4, 64),
    "gqa8_s2": ([90, 17], 8, 1, 32, 16, 2, 32),
    "pad_lanes_s1": ([40, 0, 17, 0], 4, 2, 16, 16, 1, 64),
    "pad_lanes_s4": ([40, 0, 17, 0], 4, 2, 16, 16, 4, 16),
    "splits16_mostly_empty": ([20, 3], 4, 2, 16, 16, 16, 16),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_attention(name, dtype, gen):
    lens, hq, hkv, d, bs, splits, block_n = DECODE_CASES[name]
    c = build_case([(n, 1) for n in lens], hq, hkv, d, bs, dtype, gen)
    m = c.meta
    store_kvcache(c.k, c.v, c.k_cache, c.v_cache, m.slot_mapping)
    # Scratch sized for more sequences than this batch, as a graph runner would hold it.
    scratch = alloc_decode_scratch(len(lens) + 3, hq, d, DEVICE) if splits > 1 else None
    out = torch.full_like(c.q, float("nan"))
    decode_attention(c.q, c.k_cache, c.v_cache, out, m.seq_lens, m.block_tables, c.scale,
                     splits, scratch, block_n=block_n)
    assert_close(out, reference(c), c.valid, dtype)


def test_decode_attention_errors(gen):
    c = build_case([(20, 1), (9, 1)], 4, 2, 16, 16, torch.float32, gen)
    m = c.meta
    base = dict(q=c.q, k_cache=c.k_cache, v_cache=c.v_cache, out=torch.empty_like(c.q),
                seq_lens=m.seq_lens, block_tables=m.block_tables, scale=c.scale, num_splits=2,
                scratch=alloc_decode_scratch(2, 4, 16, DEVICE, max_splits=2))
    bad = [
        (dict(num_splits=0), "num_splits"),
        (dict(num_splits=17), "num_splits"),
        (dict(num_splits=3), "scratch"),
        (dict(scratch=alloc_decode_scratch(1, 4, 16, DEVICE)), "scratch"),
        (dict(seq_lens=m.seq_lens[:1]), "seq_lens"),
        (dict(v_cache=c.v_cache.half()), "dtype"),
        (dict(k_cache=c.k_cache[:, :, :1]), "caches"),
        (dict(order=torch.tensor([1, 0], device=DEVICE)), "order must be int32"),  # int64
        (dict(order=torch.tensor([1], dtype=torch.int32, device=DEVICE)), "order must be int32 \\[2\\]"),
    ]
    for over, match in bad:
        with pytest.raises(ValueError, match=match):
            decode_attention(**{**base, **over})


def test_choose_num_splits():
    assert choose_num_splits(1, 8, 2048) == 16  # 66 wanted, capped
    assert choose_num_splits(16, 8, 2048) == 4
    assert choose_num_splits(64, 8, 2048) == 1
    assert choose_num_splits(256, 8, 2048) == 1
    assert choose_num_splits(1, 8, 100) == 2  # no split shorter than 64 keys
    assert choose_num_splits(0, 8, 0) == 1
    assert choose_num_splits(4, 2, 4096, num_sms=8) == 4


def test_default_decode_tile_by_cache_element():
    """An fp8 cache takes its own stages (two K/V buffers, PERF row 44) at the bf16 key count; fp32
    and head dim 256 keep 64-key tiles; explicit stages size the tile as given; mid-size batches
    of a 2-byte cache take DECODE_TILE_MID."""
    from engine.kernels.decode_attention import (
        DECODE_TILE,
        DECODE_TILE_FP8,
        DECODE_TILE_MID,
        default_tile,
    )

    assert default_tile(2, 128) == DECODE_TILE == (128, 4, 2)
    assert default_tile(1, 128) == DECODE_TILE_FP8 == (128, 4, 5)
    assert default_tile(4, 128) == (64, 4, 2)
    assert default_tile(2, 256) == (64, 4, 2) and default_tile(1, 256) == (64, 4, 5)
    assert default_tile(2, 64, num_stages=3) == (128, 4, 3)
    # 16-64 sequences of 8 KV heads take 64-key tiles on a 2-byte cache (PERF row 58); batch 1 and
    # past 64 sequences keep 128; fp8 keeps its own
    assert default_tile(2, 128, pairs=8) == default_tile(2, 128, pairs=1024) == (128, 4, 2)
    assert default_tile(2, 128, pairs=128) == default_tile(2, 128, pairs=512) == DECODE_TILE_MID == (64, 4, 2)
    assert default_tile(1, 128, pairs=512) == (128, 4, 5)


# ------------------------------------- decode with the rotary and the split merge in the kernel
# (the fused small-batch path's decode step: EngineConfig.fused_small_batch_rotary / _merge)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
ROTARY_CASES = {  # id: (seq_lens, Hq, Hkv, D, block_size, num_splits, BLOCK_N)
    "d64_s4_pad_lane": ([40, 0, 17, 90, 1], 4, 2, 64, 16, 4, 16),  # 17: one full tile cached; 1: none
    "d128_s1": ([33, 5], 4, 2, 128, 16, 1, 32),
    "d16_gqa4_s16_mostly_empty": ([20, 3, 0], 8, 2, 16, 8, 16, 16),
}


def raw_qkv(num_seqs: int, hq: int, hkv: int, d: int, dtype: torch.dtype, gen: torch.Generator):
    """q [B, Hq, D], k and v [B, Hkv, D]: strided views of one qkv projection output, as the model has them."""
    qkv = torch.randn(num_seqs, (hq + 2 * hkv) * d, generator=gen).to(DEVICE, dtype)
    return tuple(x.view(num_seqs, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))


# merge only where there are splits to merge (one split: the kernel writes its output directly)
ROTARY_MERGES = [(name, merge) for name, case in ROTARY_CASES.items() for merge in (False, True)
                 if case[5] > 1 or not merge]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,merge", ROTARY_MERGES)
@pytest.mark.parametrize("norm,scaling", [(True, None), (False, LLAMA3_SCALING)], ids=["qk_norm", "llama3_rope"])
def test_decode_attention_applies_rotary_and_stores_kv(dtype, name, norm, scaling, merge, gen):
    """rotary=: q and k arrive raw; the output is attention of the rotated q over the cache plus
    the rotated k, and the cache rows at the slots hold the K and V the unfused path stores
    (qk_norm_rope's k, V as given). A padded lane (slot -1) stores nothing; no other slot changes."""
    lens, hq, hkv, d, bs, splits, block_n = ROTARY_CASES[name]
    check_rotary_decode(build_case([(n, 1) for n in lens], hq, hkv, d, bs, dtype, gen), splits, block_n, norm,
                        scaling, merge, gen)


def check_rotary_decode(c: Case, splits: int, block_n: int | None, norm: bool, scaling: dict | None, merge: bool,
                        gen: torch.Generator) -> None:
    """decode_attention with rotary= on case c (its q/k/v replaced by raw ones) against the
    unfused path: qk_norm_rope, then the float64 store + attention; the caches as above."""
    from engine.kernels.rope import qk_norm_rope
    from engine.layers.norm import RMSNorm
    from engine.layers.rotary import RotaryEmbedding

    m, (b, hq, d), hkv, dtype = c.meta, c.q.shape, c.k.shape[1], c.q.dtype
    q, k, v = raw_qkv(b, hq, hkv, d, dtype, gen)
    rotary = RotaryEmbedding(d, 4096, 10000.0, scaling).to(DEVICE)
    positions = (m.seq_lens.long() - 1).clamp_min(0)
    norms = (None, None)
    if norm:
        norms = tuple(RMSNorm(d).to(DEVICE, dtype) for _ in range(2))
        for n in norms:
            n.weight.data.copy_(torch.rand(d, generator=gen) + 0.5)
    weights = [n.weight if n is not None else None for n in norms]
    want_q, want_k = qk_norm_rope(q, k, positions, rotary.cos, rotary.sin, *weights, 1e-6)  # the unfused kernel
    want = reference(Case(want_q, want_k, v, c.k_cache.clone(), c.v_cache.clone(), m, c.valid, c.scale))
    k_before, v_before = c.k_cache.clone(), c.v_cache.clone()
    out = torch.full((b, hq, d), float("nan"), device=DEVICE, dtype=dtype)
    scratch = alloc_decode_scratch(b + 3, hq, d, DEVICE)
    decode_attention(q, c.k_cache, c.v_cache, out, m.seq_lens, m.block_tables, c.scale, splits, scratch,
                     block_n=block_n, rotary=rotary.prologue(positions, *norms), new_kv=(k, v, m.slot_mapping),
                     merge=merge)
    assert_close(out, want, c.valid, dtype)
    slots = m.slot_mapping.cpu()
    kept = slots >= 0
    flat_k, flat_v = c.k_cache.view(-1, hkv, d).cpu(), c.v_cache.view(-1, hkv, d).cpu()
    torch.testing.assert_close(flat_k[slots[kept]], want_k.cpu()[kept])  # the q/k norm may sum in another order
    assert torch.equal(flat_v[slots[kept]], v.cpu()[kept])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots[kept]] = False
    for got, before in ((flat_k, k_before), (flat_v, v_before)):
        torch.testing.assert_close(got[untouched], before.view(-1, hkv, d).cpu()[untouched], rtol=0, atol=0,
                                   equal_nan=True)
    assert not scratch.count.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["gqa2_s3_n32", "gqa8_s2", "pad_lanes_s4", "splits16_mostly_empty"])
@pytest.mark.parametrize("merge_tile", [None, 128])  # 128: gqa8's 8 heads merged 2 at a time
def test_decode_attention_merges_its_splits_in_the_split_kernel(name, dtype, merge_tile, gen, monkeypatch):
    """merge=True: the last program of each (sequence, KV head) to finish merges the splits, as the
    reduce kernel would; its counters are back to 0 after a launch, so a second launch (a graph
    replay) gives the same output."""
    if merge_tile:  # the module, not the function engine.kernels re-exports under its name
        monkeypatch.setattr(importlib.import_module("engine.kernels.decode_attention"), "MERGE_TILE", merge_tile)
    lens, hq, hkv, d, bs, splits, block_n = DECODE_CASES[name]
    c = build_case([(n, 1) for n in lens], hq, hkv, d, bs, dtype, gen)
    m = c.meta
    store_kvcache(c.k, c.v, c.k_cache, c.v_cache, m.slot_mapping)
    scratch = alloc_decode_scratch(len(lens) + 3, hq, d, DEVICE)
    reduced = decode_attention(c.q, c.k_cache, c.v_cache, torch.empty_like(c.q), m.seq_lens, m.block_tables,
                               c.scale, splits, scratch, block_n=block_n)
    for _ in range(2):
        out = torch.full_like(c.q, float("nan"))
        decode_attention(c.q, c.k_cache, c.v_cache, out, m.seq_lens, m.block_tables, c.scale, splits, scratch,
                         block_n=block_n, merge=True)
        assert not scratch.count.any()
        assert_close(out, reference(c), c.valid, dtype)
        torch.testing.assert_close(out, reduced)


@pytest.mark.parametrize("name", ["gqa1_s1", "pad_lanes_s1", "gqa2_s3_n32", "pad_lanes_s4"])
@pytest.mark.parametrize("merge", [False, True])
def test_decode_attention_launch_order_changes_no_output(name, merge, gen):
    """order= (the rows longest first, as the model runner builds it) only changes which program
    slot takes which sequence: every output row is bit-equal to the batch-order launch's, and the
    merge counters end at 0."""
    lens, hq, hkv, d, bs, splits, block_n = DECODE_CASES[name]
    c = build_case([(n, 1) for n in lens], hq, hkv, d, bs, torch.float32, gen)
    m = c.meta
    store_kvcache(c.k, c.v, c.k_cache, c.v_cache, m.slot_mapping)
    order = torch.argsort(m.seq_lens, descending=True, stable=True).to(torch.int32)
    assert not torch.equal(order.cpu(), torch.arange(len(lens), dtype=torch.int32))  # a real permutation
    scratch = alloc_decode_scratch(len(lens), hq, d, DEVICE)
    outs = []
    for o in (None, order):
        out = torch.full_like(c.q, float("nan"))
        decode_attention(c.q, c.k_cache, c.v_cache, out, m.seq_lens, m.block_tables, c.scale, splits, scratch,
                         block_n=block_n, merge=merge, order=o)
        assert not scratch.count.any()
        outs.append(out)
    assert_close(outs[1], reference(c), c.valid, torch.float32)
    assert torch.equal(outs[0], outs[1])


def test_decode_attention_rotary_errors(gen):
    from engine.layers.rotary import RotaryEmbedding

    c = build_case([(20, 1), (9, 1)], 4, 2, 16, 16, torch.float32, gen)
    m = c.meta
    rotary = RotaryEmbedding(16, 64, 10000.0).to(DEVICE).prologue(m.seq_lens.long() - 1)
    base = dict(q=c.q, k_cache=c.k_cache, v_cache=c.v_cache, out=torch.empty_like(c.q), seq_lens=m.seq_lens,
                block_tables=m.block_tables, scale=c.scale, num_splits=1, rotary=rotary,
                new_kv=(c.k, c.v, m.slot_mapping))
    bad = [
        (dict(new_kv=None), "new_kv"),
        (dict(new_kv=(c.k, c.v, m.slot_mapping[:1])), "slot_mapping"),
        (dict(rotary=rotary._replace(positions=rotary.positions[:1])), "positions"),
        (dict(rotary=rotary._replace(q_weight=torch.ones(16, device=DEVICE))), "norm weights"),
        (dict(rotary=rotary._replace(cos=rotary.cos.double())), "cos"),
    ]
    for over, match in bad:
        with pytest.raises(ValueError, match=match):
            decode_attention(**{**base, **over})


# ---------------------------------------------------------------- backend


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backend_matches_torch(dtype, gen):
    """Mixed step, then a decode step with a padded lane and a max_seq_len hint far above the
    real lengths (as a captured graph passes max_model_len): 4 splits, most of them empty."""
    triton_be, torch_be = TritonAttention(), TorchAttention()
    steps = [
        (build_case([(50, 50), (33, 1), (40, 18)], 4, 2, 32, 16, dtype, gen), None),
        (build_case([(51, 1), (0, 1), (41, 1)], 4, 2, 32, 16, dtype, gen, max_seq_len=256), 4),
    ]
    for c, want_splits in steps:
        if want_splits:
            assert choose_num_splits(c.meta.num_seqs, 2, c.meta.max_seq_len) == want_splits
        kc, vc = c.k_cache.clone(), c.v_cache.clone()
        out = triton_be.forward(c.q, c.k, c.v, c.k_cache, c.v_cache, c.meta, c.scale)
        torch_be.forward(c.q, c.k, c.v, kc, vc, c.meta, c.scale)  # stores into kc, vc
        torch.testing.assert_close(c.k_cache, kc, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(c.v_cache, vc, rtol=0, atol=0, equal_nan=True)
        assert_close(out, reference(c), c.valid, dtype)


def test_triton_backend_with_kv_already_stored(gen):
    """k = v = None (the GPU rotary kernel wrote this step's K/V into the caches): the backend
    stores nothing and attends over the caches as they are, as if it had stored them itself."""
    be = TritonAttention()
    assert be.accepts_stored_kv and not TorchAttention.accepts_stored_kv
    for specs in ([(50, 50), (33, 1), (40, 18)], [(51, 1), (0, 1), (41, 1)]):
        c = build_case(specs, 4, 2, 32, 16, torch.float32, gen)
        store_kv_ref(c.k, c.v, c.k_cache, c.v_cache, c.meta.slot_mapping)  # what the rotary kernel does
        kc, vc = c.k_cache.clone(), c.v_cache.clone()
        out = be.forward(c.q, None, None, c.k_cache, c.v_cache, c.meta, c.scale)
        torch.testing.assert_close(c.k_cache, kc, rtol=0, atol=0, equal_nan=True)  # untouched
        torch.testing.assert_close(c.v_cache, vc, rtol=0, atol=0, equal_nan=True)
        assert_close(out, reference(c), c.valid, torch.float32)


# ---------------------------------------------------------------- GPU only (bf16, real shapes)

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("bs", [16, 64, 256])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_backend_qwen3_shape_gpu(kind, bs, dtype, gen):
    """Qwen3-0.6B attention shape (Hq 16, Hkv 8, D 128), contexts up to 2k, both paths."""
    if kind == "decode":
        specs = [(n, 1) for n in (1, 255, 256, 257, 1000, 2047, 0, 513)]
    else:
        specs = [(700, 1), (256, 256), (1500, 300), (100, 17), (2000, 1), (64, 16)]
    c = build_case(specs, 16, 8, 128, bs, dtype, gen)
    out = TritonAttention().forward(c.q, c.k, c.v, c.k_cache, c.v_cache, c.meta, c.scale)
    assert_close(out, reference(c), c.valid, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_decode_cuda_graph_replay(gen):
    """Capture one decode forward (16 splits from a max_model_len hint), then replay it with new
    lengths, slots and q/k/v written into the static buffers: lengths must be read on device."""
    dtype = torch.bfloat16
    c = build_case([(40, 1), (17, 1), (0, 1), (90, 1)], 16, 8, 128, 16, dtype, gen,
                   max_seq_len=1024)
    m, be = c.meta, TritonAttention()
    assert choose_num_splits(m.num_seqs, 8, m.max_seq_len) == 16
    be.forward(c.q, c.k, c.v, c.k_cache, c.v_cache, m, c.scale)  # compile + allocate scratch
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = be.forward(c.q, c.k, c.v, c.k_cache, c.v_cache, m, c.scale)
    new_lens = [33, 17, 0, 64]  # <= the captured ones, so every key they read is valid
    slots = [int(m.block_tables[i, (n - 1) // 16]) * 16 + (n - 1) % 16 if n else -1
             for i, n in enumerate(new_lens)]
    m.seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
    m.slot_mapping.copy_(torch.tensor(slots, dtype=torch.int64))
    for t in (c.q, c.k, c.v):
        t.copy_(torch.randn(t.shape, generator=gen))
    before = Case(c.q, c.k, c.v, c.k_cache.clone(), c.v_cache.clone(),
                  AttentionMetadata(m.slot_mapping, m.query_start_loc, m.seq_lens, m.block_tables,
                                    1, max(new_lens), m.query_start_loc_cpu, new_lens),
                  torch.tensor([n > 0 for n in new_lens]), c.scale)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, reference(before), before.valid, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("norm,scaling", [(True, None), (False, LLAMA3_SCALING)], ids=["qk_norm", "llama3_rope"])
def test_fused_decode_qwen3_shape_gpu(dtype, norm, scaling, gen):
    """Qwen3-0.6B's attention (Hq 16, Hkv 8, D 128) and Llama-3's group of 4 (Hq 32), with the
    rotary, the KV store and the split merge in the decode kernel: 16 splits and the default
    128-key tiles, contexts up to 2k, a padded lane."""
    lens = [1, 255, 256, 257, 1000, 2047, 0, 513]
    for hq in (16, 32):
        c = build_case([(n, 1) for n in lens], hq, 8, 128, 16, dtype, gen)
        check_rotary_decode(c, 16, None, norm, scaling, True, gen)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_fused_decode_cuda_graph_replays_agree(gen):
    """TritonAttention.decode_fused (rotary, KV store and merge in one kernel) captured with 16
    splits, replayed 200 times on the same inputs: every output is the first one bit for bit
    (the merging program sees every split's partials; the counters start at 0 each time), and it
    is the reference; then replayed with new lengths and slots."""
    from engine.layers.rotary import RotaryEmbedding

    dtype = torch.bfloat16
    c = build_case([(700, 1), (17, 1), (0, 1), (1500, 1)], 16, 8, 128, 16, dtype, gen, max_seq_len=2048)
    m, be = c.meta, TritonAttention()
    rotary = RotaryEmbedding(128, 4096, 10000.0).to(DEVICE)
    positions = (m.seq_lens.long() - 1).clamp_min(0)
    q, k, v = raw_qkv(4, 16, 8, 128, dtype, gen)
    assert choose_num_splits(m.num_seqs, 8, m.max_seq_len) == 16
    be.reserve(4, 16, 128, q.device)
    caches = c.k_cache.clone(), c.v_cache.clone()
    be.decode_fused(q, k, v, *caches, m, c.scale, rotary.prologue(positions), True)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = be.decode_fused(q, k, v, *caches, m, c.scale, rotary.prologue(positions), True)
    first = None
    for _ in range(200):
        out.fill_(float("nan"))
        graph.replay()
        first = out.clone() if first is None else first
        assert torch.equal(out, first)
    torch.cuda.synchronize()
    assert not be._scratch.count.any()
    want_q, want_k = rotary(positions, q, k)  # the GPU rotary kernel: the unfused path
    assert_close(first, reference(Case(want_q, want_k, v, c.k_cache, c.v_cache, m, c.valid, c.scale)), c.valid,
                 dtype)
    new_lens = [33, 17, 0, 64]  # <= the captured ones, so every key they read is valid
    m.seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
    m.slot_mapping.copy_(torch.tensor([int(m.block_tables[i, (n - 1) // 16]) * 16 + (n - 1) % 16 if n else -1
                                       for i, n in enumerate(new_lens)], dtype=torch.int64))
    positions.copy_((m.seq_lens.long() - 1).clamp_min(0))
    before = [x.clone() for x in caches]
    graph.replay()
    want_q, want_k = rotary(positions, q, k)
    meta = AttentionMetadata(m.slot_mapping, m.query_start_loc, m.seq_lens, m.block_tables, 1, max(new_lens),
                             m.query_start_loc_cpu, new_lens)
    valid = torch.tensor([n > 0 for n in new_lens])
    assert_close(out, reference(Case(want_q, want_k, v, *before, meta, valid, c.scale)), valid, dtype)
