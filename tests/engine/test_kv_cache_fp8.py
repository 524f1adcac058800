"""An fp8 KV cache (EngineConfig.kv_cache_dtype): the kernels' stores and reads against torch's
own fp8 casts, attention over an fp8 cache against a reference that dequantizes the same cache,
and the CPU engine (torch backend) against the model-dtype cache.

CPU (interpreter, fp32/fp16):  python -m pytest tests/engine/test_kv_cache_fp8.py -q
GPU (bf16, exact rounding):    PYTHONPATH=. python3 -m pytest tests/engine/test_kv_cache_fp8.py -m gpu -q

The Triton interpreter (3.9) loads fp8 exactly but rounds fp32 -> fp8 its own way, unlike the GPU's
cvt.rn.satfinite and torch (round to nearest even): ties away from zero, small values truncated,
and a mantissa that rounds up past 1.111b wraps to the bottom of its binade instead of carrying
(1.97 -> 1.0). So in the tests that run in the interpreter, the K and V the kernels store are
already on the fp8 grid after scaling (every rounding keeps those), and the tests of rounding
random values run on a GPU only. Reads never round: attention is checked against a reference
that reads back the caches the kernels left.
"""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")

from test_kernels import CUDA, DEVICE, DTYPES, Case, assert_close, build_case, raw_qkv  # noqa: E402

from engine.attention.metadata import AttentionMetadata  # noqa: E402
from engine.attention.torch_backend import (  # noqa: E402
    TorchAttention,
    dequantize_ref,
    paged_attention_ref,
    quantize_ref,
    store_kv_ref,
)
from engine.attention.triton_backend import TritonAttention  # noqa: E402
from engine.kernels import alloc_decode_scratch, decode_attention, store_kvcache, unified_attention  # noqa: E402
from engine.kernels.rope import KVStore  # noqa: E402


@pytest.fixture
def gen(request) -> torch.Generator:
    """Per-test seeded generator, as test_kernels' (fresh inputs per case, reproducible by test id)."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


FP8 = [pytest.param(torch.float8_e4m3fn, id="e4m3"), pytest.param(torch.float8_e5m2, id="e5m2")]
# (k_scale, v_scale): the default, and powers of two (x / scale exact, so on-grid inputs stay on the grid)
SCALES = [pytest.param((1.0, 1.0), id="unit"), pytest.param((0.5, 4.0), id="scaled")]


def fp8_grid_values(shape: tuple[int, ...], cache_dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """fp32 values that are fp8 values of cache_dtype (normals, subnormals, zeros, both largest
    finite values), plus some past the largest (they must saturate): every rounding agrees on them."""
    bits = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    x = bits.view(cache_dtype).float()
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))  # NaN / inf bit patterns: 0
    flat = x.view(-1)
    big = torch.finfo(cache_dtype).max
    flat[:4] = torch.tensor([big, -big, 3 * big, -5 * big])  # the last two saturate to +-max
    return x


def random_values(shape: tuple[int, ...], cache_dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Normal values over magnitudes from fp8's subnormals to past its range."""
    big = torch.finfo(cache_dtype).max
    return torch.randn(shape, generator=gen) * torch.logspace(-12, 1.3 * torch.tensor(big).log10().item(),
                                                              shape[-1])[None, None, :]


def store_case(values, num_tokens: int, dtype, cache_dtype, gen, k_scale: float, v_scale: float):
    """k, v [T, 2, 32] of `values` times the scales, caches of cache_dtype (NaN-filled), slots with a -1."""
    k = (values((num_tokens, 2, 32), cache_dtype, gen) * k_scale).to(DEVICE, dtype)
    v = (values((num_tokens, 2, 32), cache_dtype, gen) * v_scale).to(DEVICE, dtype)
    caches = [torch.full((6, 16, 2, 32), float("nan"), device=DEVICE).to(cache_dtype) for _ in range(2)]
    slots = torch.randperm(6 * 16, generator=gen)[:num_tokens]
    slots[1] = -1
    return k, v, caches, slots.to(DEVICE)


def check_store(k, v, caches, slots, k_scale: float, v_scale: float) -> None:
    """store_kvcache's fp8 bits are torch's: quantize_ref, i.e. (x / scale).clamp(+-max).to(fp8)."""
    want = [c.clone() for c in caches]
    store_kvcache(k, v, *caches, slots, k_scale=k_scale, v_scale=v_scale)
    store_kv_ref(k, v, *want, slots, k_scale, v_scale)
    for got, ref in zip(caches, want):  # bit for bit, NaN (never written) included
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scales", SCALES)
def test_store_on_the_fp8_grid_is_torchs_cast(cache_dtype, dtype, scales, gen):
    k, v, caches, slots = store_case(fp8_grid_values, 40, dtype, cache_dtype, gen, *scales)
    check_store(k, v, caches, slots, *scales)
    big = torch.finfo(cache_dtype).max  # token 0 starts with max, -max, 3 max, -5 max: saturated, not NaN
    assert caches[0][slots[0] // 16, slots[0] % 16, 0, :4].tolist() == [big, -big, big, -big]


@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.37, 3.1)], ids=["unit", "odd"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the interpreter does not round to nearest even")
def test_store_random_values_is_torchs_cast_gpu(cache_dtype, dtype, scales, gen):
    """Any value, any scale: the GPU's division (div.rn) and cast (cvt.rn.satfinite) are torch's."""
    k, v, caches, slots = store_case(random_values, 90, dtype, cache_dtype, gen, *scales)
    check_store(k, v, caches, slots, *scales)


# ---------------------------------------------------------------- reads


def on_grid(x: torch.Tensor, scale: float, cache_dtype: torch.dtype) -> torch.Tensor:
    """x moved to the nearest value that an fp8 cache with this scale stores exactly."""
    return dequantize_ref(quantize_ref(x, scale, cache_dtype), scale, x.dtype)


def fp8_case(specs: list[tuple[int, int]], hq: int, hkv: int, d: int, bs: int, dtype: torch.dtype,
             cache_dtype: torch.dtype, gen: torch.Generator, scales: tuple[float, float],
             max_seq_len: int | None = None) -> Case:
    """test_kernels.build_case with fp8 caches (slots no valid key occupies stay NaN) and this step's
    K and V on the fp8 grid of `scales` (see the module's note)."""
    c = build_case(specs, hq, hkv, d, bs, dtype, gen, max_seq_len)
    k, v = on_grid(c.k, scales[0], cache_dtype), on_grid(c.v, scales[1], cache_dtype)
    return Case(c.q, k, v, c.k_cache.to(cache_dtype), c.v_cache.to(cache_dtype), c.meta, c.valid, c.scale)


def cache_reference(c: Case, k_scale: float, v_scale: float, q: torch.Tensor | None = None) -> torch.Tensor:
    """float64 attention of q (default c.q) over c's caches as they are now (this step's K/V already
    stored by the kernel under test), each element read as the kernels read it: dequantize_ref."""
    m, q = c.meta, c.q if q is None else q
    kc = dequantize_ref(c.k_cache.cpu(), k_scale, q.dtype).double()
    vc = dequantize_ref(c.v_cache.cpu(), v_scale, q.dtype).double()
    cpu_meta = AttentionMetadata(m.slot_mapping.cpu(), m.query_start_loc.cpu(), m.seq_lens.cpu(),
                                 m.block_tables.cpu(), m.max_query_len, m.max_seq_len,
                                 m.query_start_loc_cpu, m.seq_lens_cpu)
    return paged_attention_ref(q.cpu().double(), kc, vc, cpu_meta, c.scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["decode", "unified"])
@pytest.mark.parametrize("scales", SCALES)
def test_one_key_reads_back_the_stored_value_exactly(dtype, path, scales, gen):
    """Sequences of one key: softmax weight 1, so attention returns the value as the kernel reads it
    back from the cache: exactly torch's fp8 cast of v / v_scale, times v_scale, in q's dtype."""
    k_scale, v_scale = scales
    c = fp8_case([(1, 1)] * 5, 4, 2, 32, 16, dtype, torch.float8_e4m3fn, gen, scales)
    v = (fp8_grid_values(tuple(c.v.shape), torch.float8_e4m3fn, gen) * v_scale).to(DEVICE, dtype)
    m, out = c.meta, torch.full_like(c.q, float("nan"))
    store_kvcache(c.k, v, c.k_cache, c.v_cache, m.slot_mapping, k_scale=k_scale, v_scale=v_scale)
    if path == "decode":
        decode_attention(c.q, c.k_cache, c.v_cache, out, m.seq_lens, m.block_tables, c.scale, 1,
                         k_scale=k_scale, v_scale=v_scale)
    else:
        unified_attention(c.q, c.k_cache, c.v_cache, out, m.query_start_loc, m.seq_lens, m.block_tables,
                          m.max_query_len, m.max_seq_len, c.scale, k_scale=k_scale, v_scale=v_scale)
    want = ((v.float() / v_scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * v_scale).to(dtype)
    assert torch.equal(out, want.repeat_interleave(2, dim=1))  # 2 q heads per KV head


@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, specs, hq, hkv", [
    ("prefill_varlen", [(17, 17), (5, 5), (33, 33)], 4, 2),
    ("prefix_hit", [(90, 10), (81, 17)], 4, 2),
    ("mixed", [(40, 1), (17, 1), (64, 30), (20, 0), (50, 20), (1, 1)], 8, 1),
])
def test_unified_attention_over_an_fp8_cache(name, specs, hq, hkv, dtype, cache_dtype, gen):
    """Prefill, prefix hits and mixed steps: store this step's K/V into fp8 caches, then attend;
    the output is the reference over the same caches read back (scales 0.5 and 4)."""
    c = fp8_case(specs, hq, hkv, 32, 16, dtype, cache_dtype, gen, (0.5, 4.0))
    m, out = c.meta, torch.full_like(c.q, float("nan"))
    store_kvcache(c.k, c.v, c.k_cache, c.v_cache, m.slot_mapping, k_scale=0.5, v_scale=4.0)
    unified_attention(c.q, c.k_cache, c.v_cache, out, m.query_start_loc, m.seq_lens, m.block_tables,
                      m.max_query_len, m.max_seq_len, c.scale, k_scale=0.5, v_scale=4.0)
    assert_close(out, cache_reference(c, 0.5, 4.0), c.valid, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("name, lens, hq, hkv, bs, splits, block_n", [
    ("gqa1_s1", [33, 16, 1, 47], 2, 2, 16, 1, 64),
    ("gqa2_s3_n32", [32, 31, 33, 5], 4, 2, 16, 3, 32),
    ("pad_lanes_s4", [40, 0, 17, 0], 4, 2, 16, 4, 16),
])
def test_decode_attention_over_an_fp8_cache(name, lens, hq, hkv, bs, splits, block_n, merge, dtype, gen):
    c = fp8_case([(n, 1) for n in lens], hq, hkv, 16, bs, dtype, torch.float8_e4m3fn, gen, (2.0, 0.25))
    m, out = c.meta, torch.full_like(c.q, float("nan"))
    store_kvcache(c.k, c.v, c.k_cache, c.v_cache, m.slot_mapping, k_scale=2.0, v_scale=0.25)
    scratch = alloc_decode_scratch(len(lens) + 3, hq, 16, DEVICE)
    decode_attention(c.q, c.k_cache, c.v_cache, out, m.seq_lens, m.block_tables, c.scale, splits, scratch,
                     block_n=block_n, merge=merge, k_scale=2.0, v_scale=0.25)
    assert_close(out, cache_reference(c, 2.0, 0.25), c.valid, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the interpreter ignores register caps")
def test_decode_over_an_fp8_cache_under_a_register_cap_gpu(gen):
    """The engine's fp8 tile (two K/V buffers) at 128-dim heads, with and without the register cap
    that PERF row 45 times (DECODE_MAXNREG_FP8): both within the reference, bit-equal to each
    other (a cap changes register allocation, not arithmetic)."""
    from engine.kernels.decode_attention import DECODE_TILE_FP8

    lens = [700, 129, 1, 2048, 333, 0, 1024, 64]
    c = fp8_case([(n, 1) for n in lens], 16, 8, 128, 16, torch.bfloat16, torch.float8_e4m3fn, gen, (2.0, 0.25))
    m = c.meta
    store_kvcache(c.k, c.v, c.k_cache, c.v_cache, m.slot_mapping, k_scale=2.0, v_scale=0.25)
    outs = []
    for cap in (None, 168):
        out = torch.full_like(c.q, float("nan"))
        decode_attention(c.q, c.k_cache, c.v_cache, out, m.seq_lens, m.block_tables, c.scale, 1,
                         block_n=DECODE_TILE_FP8[0], num_warps=DECODE_TILE_FP8[1], num_stages=DECODE_TILE_FP8[2],
                         k_scale=2.0, v_scale=0.25, max_registers=cap)
        assert_close(out, cache_reference(c, 2.0, 0.25), c.valid, torch.bfloat16)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False], ids=["qk_norm", "no_norm"])
def test_fused_rotary_decode_stores_and_reads_fp8(dtype, norm, gen):
    """decode_attention with rotary= (fused_small_batch_rotary) on fp8 caches: K and V stored as the
    unfused rotary kernel stores them (qk_norm_rope with a KVStore: the same fp8 bits; on a GPU
    also torch's rounding of its k), no other slot touched, and the output attention over the
    caches as left, this step's key and value included as read back."""
    from engine.kernels.rope import qk_norm_rope
    from engine.layers.norm import RMSNorm
    from engine.layers.rotary import RotaryEmbedding

    k_scale, v_scale = 0.5, 2.0
    c = fp8_case([(n, 1) for n in (40, 0, 17, 90, 1)], 4, 2, 64, 16, dtype, torch.float8_e4m3fn, gen,
                 (k_scale, v_scale))
    m, (b, hq, d), hkv = c.meta, c.q.shape, c.k.shape[1]
    q, k, v = raw_qkv(b, hq, hkv, d, dtype, gen)
    rotary = RotaryEmbedding(d, 4096, 10000.0).to(DEVICE)
    positions = (m.seq_lens.long() - 1).clamp_min(0)
    norms = tuple(RMSNorm(d).to(DEVICE, dtype) for _ in range(2)) if norm else (None, None)
    weights = [n.weight if n is not None else None for n in norms]
    want_q, want_k = qk_norm_rope(q, k, positions, rotary.cos, rotary.sin, *weights, 1e-6)
    want_caches = [x.clone() for x in (c.k_cache, c.v_cache)]
    qk_norm_rope(q, k, positions, rotary.cos, rotary.sin, *weights, 1e-6,
                 KVStore(v, *want_caches, m.slot_mapping, k_scale, v_scale))
    if CUDA:  # the GPU rounds as torch does
        torch_caches = [x.clone() for x in (c.k_cache, c.v_cache)]
        store_kv_ref(want_k, v, *torch_caches, m.slot_mapping, k_scale, v_scale)
        for got, want in zip(want_caches, torch_caches):
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    out = torch.full((b, hq, d), float("nan"), device=DEVICE, dtype=dtype)
    decode_attention(q, c.k_cache, c.v_cache, out, m.seq_lens, m.block_tables, c.scale, 4,
                     alloc_decode_scratch(b, hq, d, DEVICE), block_n=16, rotary=rotary.prologue(positions, *norms),
                     new_kv=(k, v, m.slot_mapping), merge=True, k_scale=k_scale, v_scale=v_scale)
    for got, want in zip((c.k_cache, c.v_cache), want_caches):  # NaN (never written slots) included
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert_close(out, cache_reference(c, k_scale, v_scale, want_q), c.valid, dtype)


# ---------------------------------------------------------------- backends


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backend_matches_torch_backend_on_fp8(dtype, gen):
    """TritonAttention and TorchAttention with the same scales, a mixed step then a decode step
    (split-K, from a max_seq_len hint): the same caches bit for bit, and the same output to the
    dtype's tolerance."""
    triton_be, torch_be = TritonAttention(0.5, 2.0), TorchAttention(0.5, 2.0)
    for specs in ([(50, 50), (33, 1), (40, 18)], [(51, 1), (0, 1), (41, 1)]):
        c = fp8_case(specs, 4, 2, 32, 16, dtype, torch.float8_e4m3fn, gen, (0.5, 2.0), max_seq_len=256)
        kc, vc = c.k_cache.clone(), c.v_cache.clone()
        out = triton_be.forward(c.q, c.k, c.v, c.k_cache, c.v_cache, c.meta, c.scale)
        torch_be.forward(c.q, c.k, c.v, kc, vc, c.meta, c.scale)  # its output: the test below
        for got, want in ((c.k_cache, kc), (c.v_cache, vc)):
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert_close(out, cache_reference(c, 0.5, 2.0), c.valid, dtype)


def test_torch_backend_attends_over_the_dequantized_cache():
    """TorchAttention (the CPU engine's path) on an fp8 cache: what it stores is quantize_ref's, and
    its output equals attention over the dequantized caches, computed apart in float64. (Its
    batched SDPA reads whole blocks, so the unused slots hold zeros, as in the engine, not NaN.)"""
    gen = torch.Generator().manual_seed(7)
    specs = [(50, 50), (33, 1), (40, 18), (0, 1)]
    c = build_case(specs, 4, 2, 32, 16, torch.float32, gen)
    k_cache, v_cache = (x.cpu().nan_to_num(0.0).to(torch.float8_e4m3fn) for x in (c.k_cache, c.v_cache))
    c = Case(c.q.cpu(), c.k.cpu(), c.v.cpu(), k_cache, v_cache, c.meta, c.valid, c.scale)
    m = c.meta
    cpu_meta = AttentionMetadata(m.slot_mapping.cpu(), m.query_start_loc.cpu(), m.seq_lens.cpu(),
                                 m.block_tables.cpu(), m.max_query_len, m.max_seq_len,
                                 m.query_start_loc_cpu, m.seq_lens_cpu)
    c = Case(c.q, c.k, c.v, c.k_cache, c.v_cache, cpu_meta, c.valid, c.scale)
    before = c.k_cache.clone()
    out = TorchAttention(0.25, 3.0).forward(c.q, c.k, c.v, c.k_cache, c.v_cache, cpu_meta, c.scale)
    kept = cpu_meta.slot_mapping >= 0
    stored = c.k_cache.view(-1, 2, 32)[cpu_meta.slot_mapping[kept]]
    assert torch.equal(stored.view(torch.uint8), quantize_ref(c.k[kept], 0.25, torch.float8_e4m3fn).view(torch.uint8))
    assert not torch.equal(before.view(torch.uint8), c.k_cache.view(torch.uint8))
    assert_close(out, cache_reference(c, 0.25, 3.0), c.valid, torch.float32)
