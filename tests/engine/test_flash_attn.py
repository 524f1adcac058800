"""The FlashAttention 4 backend (engine/attention/flash_attn_backend.py).

CPU: choosing it without CUDA, at float32, or without the package fails when EngineConfig (or
the backend) is built, and the error names the install extra; its mapping of the engine's
metadata onto FA4's varlen call, checked with a stand-in that computes FA4's documented
semantics with the torch reference; decode-only steps go to the Triton split-K path; warmup()
runs every kernel variant a step can need.
    PYTHONPATH=. python -m pytest tests/engine/test_flash_attn.py -q
GPU (flash_attn.cute importable; the FA4 wheels installed with `pip install --target $FA4`):
    PYTHONPATH=.:$FA4:$FA4/nvidia_cutlass_dsl/dsl_packages python3 -m pytest -m gpu tests/engine/test_flash_attn.py
bf16 kernel-level agreement with the Triton unified attention and a float64 reference (varlen
prefill, prefix hits, mixed batches, page sizes 16/64/128, head dims 16-128, > 256 sequences);
no compile after warmup(); greedy tokens of an engine on flash_attn equal those on triton, up to
a bf16 near tie (DESIGN.md §5, as the TP=2 vs TP=1 test).
"""

from __future__ import annotations

import importlib.machinery
import random
import re
import sys
import types
import zlib

import pytest
import torch
from checkpoints import assert_same_up_to_near_tie, build_checkpoint, hf_greedy
from test_kernels import CUDA, Case, assert_close, build_case, reference

from engine import LLM, EngineConfig, SamplingParams
from engine.attention import get_backend
from engine.attention.flash_attn_backend import WARMUP_QUERY_LENS, FlashAttention
from engine.attention.metadata import AttentionMetadata
from engine.attention.requirements import FLASH_ATTN_INSTALL, FLASH_ATTN_MODULE, module_available
from engine.attention.torch_backend import paged_attention_ref, store_kv_ref
from engine.attention.triton_backend import TritonAttention

INSTALL = re.escape(FLASH_ATTN_INSTALL)


# ---------------------------------------------------------------- errors at construction (CPU)

@pytest.fixture
def no_fa4(monkeypatch):
    """flash_attn.cute is not importable, whatever this environment has installed."""
    monkeypatch.setitem(sys.modules, FLASH_ATTN_MODULE, None)


@pytest.fixture
def fake_fa4(monkeypatch):
    """flash_attn.cute is found on the path (a stub module with a spec), whatever is installed."""
    stub = types.ModuleType(FLASH_ATTN_MODULE)
    stub.__spec__ = importlib.machinery.ModuleSpec(FLASH_ATTN_MODULE, None)
    monkeypatch.setitem(sys.modules, FLASH_ATTN_MODULE, stub)


def test_config_without_the_package_names_the_extra(no_fa4):
    with pytest.raises(ValueError, match=INSTALL):
        EngineConfig(model="tiny", device="cuda", attention_backend="flash_attn")


def test_config_accepts_flash_attn_when_the_package_is_found(fake_fa4):
    cfg = EngineConfig(model="tiny", device="cuda", attention_backend="flash_attn")
    assert cfg.attention_backend == "flash_attn" and cfg.resolved_dtype == "bfloat16"


@pytest.mark.parametrize("kw, match", [
    (dict(device="cpu"), "CUDA"),
    (dict(device="cuda", dtype="float32"), "bfloat16"),
])
def test_config_rejects_cpu_and_float32(fake_fa4, kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(model="tiny", attention_backend="flash_attn", **kw)


def test_backend_without_the_package_raises_import_error_naming_the_extra(no_fa4):
    with pytest.raises(ImportError, match=INSTALL):
        FlashAttention()
    with pytest.raises(ImportError, match=INSTALL):
        get_backend("flash_attn", "cuda")
    assert not module_available(FLASH_ATTN_MODULE)


def test_backend_with_a_module_lacking_the_function_raises_import_error(fake_fa4):
    with pytest.raises(ImportError, match=INSTALL):
        FlashAttention()


# ---------------------------------------------------------------- argument mapping (CPU)

class FakeVarlen:
    """FA4's flash_attn_varlen_func as documented (paged K/V through page_table, per-sequence
    key counts in seqused_k, causal aligned bottom-right), computed with the torch reference;
    keyword-only, so an argument FA4 would not get by that name fails. Records each call."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, q, k, v, *, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, page_table,
                 softmax_scale, causal):
        assert causal and page_table.dtype == torch.int32 and seqused_k.dtype == torch.int32
        qsl, lens = cu_seqlens_q.tolist(), seqused_k.tolist()
        self.calls.append(dict(k=k, v=v, num_seqs=len(lens), max_seqlen_q=max_seqlen_q,
                               max_seqlen_k=max_seqlen_k, page_table=page_table.clone()))
        assert max_seqlen_q == max(b - a for a, b in zip(qsl, qsl[1:])) and max_seqlen_k == max(lens)
        meta = AttentionMetadata(None, cu_seqlens_q, seqused_k, page_table, max_seqlen_q, max_seqlen_k, qsl, lens)
        return paged_attention_ref(q, k, v, meta, softmax_scale), None  # (out, lse) as FA4 returns


@pytest.fixture
def gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.mark.parametrize("stored", [False, True], ids=["stores_kv", "kv_already_stored"])
def test_mixed_and_prefix_steps_go_to_fa4_with_the_engine_metadata(stored, gen):
    fake = FakeVarlen()
    be = FlashAttention(fake)
    for specs in ([(50, 50), (33, 1), (40, 18)], [(90, 10), (81, 17), (5, 5)]):  # mixed, prefix hits
        c = build_case(specs, 4, 2, 32, 16, torch.float32, gen)
        if stored:  # what the GPU rotary kernel does before forward(q, None, None, ...)
            store_kv_ref(c.k, c.v, c.k_cache, c.v_cache, c.meta.slot_mapping)
        k, v = (None, None) if stored else (c.k, c.v)
        out = be.forward(c.q, k, v, c.k_cache, c.v_cache, c.meta, c.scale)
        call = fake.calls[-1]
        assert call["k"] is c.k_cache and call["v"] is c.v_cache  # the paged caches themselves
        assert torch.equal(call["page_table"], c.meta.block_tables)
        assert_close(out, reference(c), c.valid, torch.float32)
    assert len(fake.calls) == 2


def test_decode_only_steps_use_the_triton_split_k_path(gen):
    fake = FakeVarlen()
    be = FlashAttention(fake)
    c = build_case([(51, 1), (0, 1), (41, 1)], 4, 2, 32, 16, torch.float32, gen, max_seq_len=256)
    out = be.forward(c.q, c.k, c.v, c.k_cache, c.v_cache, c.meta, c.scale)
    assert fake.calls == []
    assert_close(out, reference(c), c.valid, torch.float32)


def test_warmup_runs_one_and_many_sequences_at_short_and_long_queries(gen):
    fake = FakeVarlen()
    k_cache, v_cache = torch.randn(2, 3, 16, 2, 32, generator=gen)
    before = k_cache.clone(), v_cache.clone()
    FlashAttention(fake).warmup(4, k_cache, v_cache, max_seqs=3)
    assert {(c["num_seqs"], c["max_seqlen_q"]) for c in fake.calls} == {
        (n, q) for n in (1, 3) for q in WARMUP_QUERY_LENS}
    assert all(c["k"] is k_cache and not c["page_table"].any() for c in fake.calls)  # null block only
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


# ---------------------------------------------------------------- GPU: FA4 itself

fa4 = pytest.mark.skipif(not CUDA or not module_available(FLASH_ATTN_MODULE),
                         reason="needs CUDA and flash_attn.cute (flash-attn-4)")
BF16 = torch.bfloat16
MIXED = [(700, 1), (256, 256), (1500, 300), (100, 17), (2000, 1), (64, 16)]
FA_CASES = {  # id: (specs [(seq_len, q_len)], Hq, Hkv, D, block_size); Qwen3-0.6B: 16, 8, 128
    "prefill_varlen": ([(700, 700), (256, 256), (1, 1), (1500, 1500), (17, 17)], 16, 8, 128, 16),
    "prefix_hit": ([(2000, 300), (1024, 17), (513, 512), (4096, 1000)], 16, 8, 128, 16),
    "mixed": (MIXED, 16, 8, 128, 16),
    "mixed_bs64": (MIXED, 16, 8, 128, 64),
    "mixed_bs128": (MIXED, 16, 8, 128, 128),  # page = FA4's key tile: TMA page loads
    "d64_gqa4": ([(300, 300), (200, 50), (90, 1), (33, 2)], 16, 4, 64, 16),
    "d16_gqa2": ([(129, 129), (40, 7), (18, 1)], 4, 2, 16, 16),
    "mha": ([(300, 300), (200, 50)], 8, 8, 128, 16),
    "batch_300": ([(37, 5)] * 150 + [(16, 1)] * 150, 16, 8, 128, 16),
}


def finite_case(specs, hq, hkv, d, bs, gen) -> Case:
    """build_case with its NaN slots (no valid key) set to 30: FA4 loads the unused rows of a
    sequence's last page and masks their scores, which needs finite values (the engine's cache
    only ever holds K/V); 30 still makes an unmasked read show up."""
    c = build_case(specs, hq, hkv, d, bs, BF16, gen)
    c.k_cache.nan_to_num_(nan=30.0)
    c.v_cache.nan_to_num_(nan=30.0)
    return c


@pytest.mark.gpu
@fa4
@pytest.mark.parametrize("name", list(FA_CASES))
def test_fa4_matches_triton_unified_attention_bf16(name, gen):
    c = finite_case(*FA_CASES[name], gen)
    kc, vc = c.k_cache.clone(), c.v_cache.clone()
    fa = FlashAttention().forward(c.q, c.k, c.v, c.k_cache, c.v_cache, c.meta, c.scale)
    tri = TritonAttention().forward(c.q, c.k, c.v, kc, vc, c.meta, c.scale)
    assert torch.equal(c.k_cache, kc) and torch.equal(c.v_cache, vc)  # the same K/V stored
    ref = reference(c)
    assert_close(fa, ref, c.valid, BF16)
    assert_close(tri, ref, c.valid, BF16)
    diff = ((fa.double() - tri.double()).norm() / tri.double().norm()).item()
    assert diff < 1e-2, f"FA4 vs Triton relative difference {diff:.2e}"


@pytest.mark.gpu
@fa4
def test_no_fa4_compile_after_warmup(gen):
    """After warmup(), steps of any query length and batch up to max_seqs reuse its kernels
    (FA4 4.0.0b36 keeps them in interface._flash_attn_fwd.compile_cache.cache)."""
    from flash_attn.cute import interface

    compiled = interface._flash_attn_fwd.compile_cache.cache
    be = FlashAttention()
    base = finite_case([(40, 40)], 16, 8, 128, 16, gen)
    be.warmup(16, base.k_cache, base.v_cache, max_seqs=8)
    n = len(compiled)
    for specs in ([(3000, 3000)], [(64, 64), (90, 2)], [(500, 1)] * 7 + [(900, 400)], [(30, 3)] * 8):
        c = finite_case(specs, 16, 8, 128, 16, gen)
        be.forward(c.q, c.k, c.v, c.k_cache, c.v_cache, c.meta, c.scale)
    torch.cuda.synchronize()
    assert len(compiled) == n, "a step compiled a FA4 kernel that warmup() did not"


# ---------------------------------------------------------------- GPU: the engine

_rng = random.Random(11)
_SHARED = [_rng.randrange(256) for _ in range(48)]
PROMPTS = ([[_rng.randrange(256) for _ in range(n)] for n in (1, 5, 16, 17, 33, 64, 100, 129, 200)]
           + [_SHARED + [i] for i in range(4)])  # 64-token chunks: chunked prefill, mixed steps, prefix hits
MAX_NEW = 24
ENGINE = dict(device="cuda", dtype="bfloat16", max_num_batched_tokens=64, max_num_seqs=12, max_model_len=256,
              num_kv_blocks=512)


def generate_twice(path: str, backend: str) -> tuple[list[list[list[int]]], int]:
    """Greedy tokens of two passes over PROMPTS (the second hits the prefix cache), and how many
    calls reached FA4; on flash_attn no step compiles (the runner warmed FA4 up at start)."""
    from flash_attn.cute import interface

    compiled = interface._flash_attn_fwd.compile_cache.cache  # FA4 4.0.0b36's in-memory kernels
    llm = LLM(path, attention_backend=backend, **ENGINE)
    be, calls, num_compiled = llm.engine.executor.runner.backend, [], len(compiled)
    if backend == "flash_attn":
        assert isinstance(be, FlashAttention)
        real = be.varlen
        be.varlen = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    runs = [[o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)] for _ in range(2)]
    assert llm.engine.block_manager.prefix_hit_tokens > 0
    assert len(compiled) == num_compiled, "a step compiled a FA4 kernel (warmup missed a variant)"
    llm.shutdown()
    return runs, len(calls)


@pytest.mark.gpu
@fa4
@pytest.mark.parametrize("arch, head_dim", [("qwen3", 16), ("llama", 64)])
def test_engine_greedy_tokens_flash_attn_equal_triton(tmp_path, arch, head_dim):
    path = build_checkpoint(arch, str(tmp_path / arch), head_dim=head_dim)
    want, _ = generate_twice(path, "triton")
    got, fa4_calls = generate_twice(path, "flash_attn")
    assert fa4_calls > 0, "no step reached FA4"
    gaps = [g for _, g in hf_greedy(path, PROMPTS, MAX_NEW)]
    for got_pass, want_pass in zip(got, want):
        assert_same_up_to_near_tie(got_pass, want_pass, gaps)
