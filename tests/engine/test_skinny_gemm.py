"""The small-batch skinny GEMM (engine/kernels/skinny_gemm.py, tiles in gemv_config.py) against the torch ops it replaces
(RMSNorm with its residual add, F.linear, SiLU * up, split-K sums): fp32/fp16 under
TRITON_INTERPRET on CPU, bf16 too on a GPU. CUDA-core tiles (block_m < 16, one or two weight
tiles prefetched) and tensor-core tiles (block_m >= 16), split K, the norm in one pass (rstd
applied to the accumulators) and with a first pass (norm_first), edge shapes (one row, 16 rows,
17 rows over two row tiles, N and K not multiples of the tile).
Run: pytest tests/engine/test_skinny_gemm.py"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.gemv_config import (
    BIG_WEIGHT_BYTES,
    MAX_SPLIT,
    SMEM_BUDGET,
    SPLIT_MAX_ROWS,
    GemvConfig,
    GemvProblem,
    choose_config,
    dot_cost,
)
from engine.kernels.skinny_gemm import NormIn, partials_rmsnorm, problem, skinny_gemm
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
EPS = 1e-6
# (block_m, block_n, block_k, warps, stages): one row on CUDA cores, a few rows, tensor cores
TILES = {"fma1": (1, 8, 32), "fma4": (4, 8, 64), "dot": (16, 16, 32)}
# stages: how many weight tiles a CUDA-core tile prefetches (1 or 2); tensor-core tiles leave the
# pipelining to the compiler, which the interpreter does not run: one case for them
TILE_STAGES = [("fma1", 1), ("fma1", 2), ("fma4", 1), ("fma4", 2), ("dot", 2)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def cfg(tile: str, split: int = 1, norm_first: bool = False, stages: int = 2) -> GemvConfig:
    """stages 2: CUDA-core tiles prefetch two weight tiles, 1: one."""
    return GemvConfig(*TILES[tile], 4, stages, split, norm_first)


def rand(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=dtype) * scale


def ref_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None):
    """The unfused path: the residual add in the dtype, then RMSNorm (HF's roundings)."""
    norm = RMSNorm(weight.shape[0], EPS).to(DEVICE, weight.dtype)
    norm.weight.data.copy_(weight)
    s = x if residual is None else x + residual
    return norm._norm(s), s


def ref_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """cuBLAS's output: fp32 products and sum, one rounding to the dtype."""
    y = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    return y.to(w.dtype)


def norm_weight(k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(k, device=DEVICE, dtype=dtype).uniform_(0.5, 1.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile", list(TILES))
@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (3, 24, 64), (16, 48, 128), (17, 24, 96)])
def test_plain_gemm_matches_linear(dtype, tile, m, n, k):
    x, w = rand(m, k, dtype=dtype), rand(n, k, dtype=dtype, scale=k ** -0.5)
    y, res = skinny_gemm(x, w, config=cfg(tile))
    assert res is None and y.shape == (m, n) and y.dtype == dtype
    assert rel(y, ref_linear(x, w)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile", ["fma1", "dot"])
def test_bias_is_added_before_the_rounding(dtype, tile):
    x, w, b = rand(2, 64, dtype=dtype), rand(40, 64, dtype=dtype, scale=0.125), rand(40, dtype=dtype)
    y, _ = skinny_gemm(x, w, bias=b, config=cfg(tile))
    assert rel(y, ref_linear(x, w, b)) < TOL[dtype]


# (tile, with_residual, m, norm_first): the K-loop rstd over every tile, row count and first-layer
# case; the first-pass rstd (the old kernel, kept for A/B) once per tile (the interpreter is slow)
NORM_CASES = [(t, r, m, False) for t in TILES for r in (True, False) for m in (1, 5, 16)] + \
    [(t, True, 5, True) for t in TILES]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile,with_residual,m,norm_first", NORM_CASES)
def test_norm_prologue_matches_rmsnorm_then_linear(dtype, tile, with_residual, m, norm_first):
    """norm(x + residual) @ W^T, and the new residual is x + residual bit for bit (written by
    several programs, one K tile each: 5 feature tiles, 3 K tiles of 32 or 2 of 64), with rstd
    from a first pass or along the K loop."""
    k, n = 96, 40
    x, w, g = rand(m, k, dtype=dtype), rand(n, k, dtype=dtype, scale=k ** -0.5), norm_weight(k, dtype)
    residual = rand(m, k, dtype=dtype) if with_residual else None
    y, new_res = skinny_gemm(x, w, norm=NormIn(g, EPS, residual), config=cfg(tile, norm_first=norm_first))
    normed, want_res = ref_norm(x, g, residual)
    assert torch.equal(new_res, want_res)
    assert rel(y, ref_linear(normed, w)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile", list(TILES))
@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("norm_first", [False, True])
def test_partial_sums_in_are_summed_in_order_then_normed(dtype, tile, parts, norm_first):
    m, k, n = 4, 64, 24
    partials = rand(parts, m, k, dtype=torch.float32)
    w, g, residual = rand(n, k, dtype=dtype, scale=0.125), norm_weight(k, dtype), rand(m, k, dtype=dtype)
    y, new_res = skinny_gemm(partials, w, norm=NormIn(g, EPS, residual), config=cfg(tile, norm_first=norm_first))
    total = partials[0]
    for p in partials[1:]:
        total = total + p
    normed, want_res = ref_norm(total.to(dtype), g, residual)
    assert torch.equal(new_res, want_res)
    assert rel(y, ref_linear(normed, w)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile,stages", TILE_STAGES)
@pytest.mark.parametrize("m,inter", [(1, 40), (16, 24), (3, 33)])  # 33: not a multiple of any block_n
def test_gated_epilogue_matches_silu_mul(dtype, tile, m, inter, stages):
    """Gate and up tiles both scaled by rstd; CUDA-core tiles with one and two tiles in flight."""
    k = 160  # 5 K tiles of 32, 3 of 64 (the last one short)
    x, w, g = rand(m, k, dtype=dtype), rand(2 * inter, k, dtype=dtype, scale=0.25), norm_weight(k, dtype)
    residual = rand(m, k, dtype=dtype)
    y, new_res = skinny_gemm(x, w, norm=NormIn(g, EPS, residual), gated=True, config=cfg(tile, stages=stages))
    normed, want_res = ref_norm(x, g, residual)
    gate, up = ref_linear(normed, w).chunk(2, dim=-1)
    assert y.shape == (m, inter) and torch.equal(new_res, want_res)
    assert rel(y, F.silu(gate.float()).to(dtype) * up) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile,stages", TILE_STAGES)
@pytest.mark.parametrize("split,k", [(2, 128), (3, 96), (4, 80)])  # 80: the last split is short
def test_split_k_leaves_fp32_partials_that_sum_to_the_product(dtype, tile, split, k, stages):
    m, n = 2, 40
    x, w = rand(m, k, dtype=dtype), rand(n, k, dtype=dtype, scale=k ** -0.5)
    y, _ = skinny_gemm(x, w, split_ok=True, config=cfg(tile, split, stages=stages))
    assert y.shape == (split, m, n) and y.dtype == torch.float32
    want = F.linear(x.double(), w.double())
    assert rel(y.sum(0), want) < TOL[torch.float32] * 10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile", list(TILES))
def test_norm_with_split_k_normalizes_in_a_first_pass(dtype, tile):
    """A split sees part of each row, so the norm cannot wait for the row's sum of squares:
    whatever the config says, rstd comes from a first pass, and the partials sum to the product."""
    m, k, n, split = 3, 128, 40, 2
    x, w, g, residual = rand(m, k, dtype=dtype), rand(n, k, dtype=dtype, scale=k ** -0.5), norm_weight(
        k, dtype), rand(m, k, dtype=dtype)
    y, new_res = skinny_gemm(x, w, norm=NormIn(g, EPS, residual), split_ok=True, config=cfg(tile, split))
    normed, want_res = ref_norm(x, g, residual)
    assert y.shape == (split, m, n) and torch.equal(new_res, want_res)
    assert rel(y.sum(0), F.linear(normed.double(), w.double())) < TOL[dtype]


@pytest.mark.parametrize("tile", list(TILES))
def test_fp16_norm_of_large_activations_stays_finite(tile):
    """x * g exceeds fp16's range (here 300 * 300): the one-pass norm keeps it in fp32 on CUDA
    cores, and fp16 tensor-core tiles (which would round it to fp16) normalize first."""
    dtype, m, k, n = torch.float16, 2, 64, 24
    x = rand(m, k, dtype=dtype) + 300.0
    w, g = rand(n, k, dtype=dtype, scale=k ** -0.5), torch.full((k,), 300.0, device=DEVICE, dtype=dtype)
    y, _ = skinny_gemm(x, w, norm=NormIn(g, EPS), config=cfg(tile))
    normed, _ = ref_norm(x, g, None)
    assert torch.isfinite(y).all() and rel(y, ref_linear(normed, w)) < TOL[dtype]


@pytest.mark.parametrize("tile", ["fma1", "dot"])
@pytest.mark.parametrize("k", [1024, 4096])
@pytest.mark.parametrize("stages", [1, 3])
def test_model_widths_one_and_sixteen_rows(tile, k, stages):
    """The hidden sizes of Qwen3-0.6B and Llama-3-8B, many K tiles, fp16."""
    dtype, n = torch.float16, 24
    m = 1 if tile == "fma1" else 16
    x, w, g = rand(m, k, dtype=dtype), rand(n, k, dtype=dtype, scale=k ** -0.5), norm_weight(k, dtype)
    residual = rand(m, k, dtype=dtype)
    big = GemvConfig(*TILES[tile][:2], 256, 4, stages)
    y, new_res = skinny_gemm(x, w, norm=NormIn(g, EPS, residual), config=big)
    normed, want_res = ref_norm(x, g, residual)
    assert torch.equal(new_res, want_res) and rel(y, ref_linear(normed, w)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,block_m", [(24, 32), (48, 64)])
def test_split_k_of_a_wide_row_tile_over_fewer_rows(dtype, m, block_m):
    """fused_row_parallel_tokens' steps of 17-64 sequences: 32- and 64-row tensor-core tiles (rows
    padded with zeros) splitting K 4 ways, the last split short."""
    n, k = 40, 112
    x, w = rand(m, k, dtype=dtype), rand(n, k, dtype=dtype, scale=k ** -0.5)
    y, _ = skinny_gemm(x, w, split_ok=True, config=GemvConfig(block_m, 16, 16, 4, 2, split_k=4))
    assert y.shape == (4, m, n) and y.dtype == torch.float32
    assert rel(y.sum(0), F.linear(x.double(), w.double())) < TOL[torch.float32] * 10


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_configs_run_the_layer_shapes_in_small(dtype):
    """choose_config's tiles (no config given), each option, small dims."""
    for m in (1, 2, 16):
        x, residual, g = rand(m, 128, dtype=dtype), rand(m, 128, dtype=dtype), norm_weight(128, dtype)
        w_down = rand(64, 256, dtype=dtype, scale=1 / 16)
        down, _ = skinny_gemm(rand(m, 256, dtype=dtype), w_down, split_ok=True)
        assert down.shape[-2:] == (m, 64)
        y, _ = skinny_gemm(x, rand(48, 128, dtype=dtype, scale=1 / 11), norm=NormIn(g, EPS, residual), gated=True)
        assert y.shape == (m, 24)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", [2, 3])
def test_partials_rmsnorm(dtype, parts):
    m, h = 3, 96
    partials, residual, g = rand(parts, m, h, dtype=torch.float32), rand(m, h, dtype=dtype), norm_weight(h, dtype)
    out, new_res = partials_rmsnorm(partials, g, EPS, residual)
    total = partials[0]
    for p in partials[1:]:
        total = total + p
    want, want_res = ref_norm(total.to(dtype), g, residual)
    assert torch.equal(new_res, want_res) and rel(out, want) < TOL[dtype]


# the decoder layer's projections (n_out, k, gated, can_split) at qwen3-0.6b and llama-3-8b sizes
LAYER_SHAPES = [(4096, 1024, False, False), (3072, 1024, True, False), (1024, 2048, False, True),
                (1024, 3072, False, True), (6144, 4096, False, False), (14336, 4096, True, False),
                (4096, 4096, False, True), (4096, 14336, False, True)]


def test_choose_config_one_row_on_cuda_cores_more_on_tensor_cores():
    """One row: CUDA cores, two weight tiles in flight only for big weights (llama-3-8b), split
    K only where the caller takes partials and the feature tiles leave half the SMs idle. More
    rows: tensor cores, a pipeline within the SMEM budget, split K only for few rows."""
    sms = 132
    for n, k, gated, can_split in LAYER_SHAPES:
        for m in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96):
            p = GemvProblem(m, n, k, 2, 4 if not can_split else 2, gated, can_split)
            c = choose_config(p, sms)
            assert c.block_m >= m and c.use_dot == (m > 1) and not c.norm_first, (p, c)
            assert c.split_k == 1 or (can_split and (m == 1 or m <= SPLIT_MAX_ROWS)), (p, c)
            if m == 1:
                assert c.prefetch == (2 if n * k * (2 if gated else 1) * 2 >= BIG_WEIGHT_BYTES else 1), (p, c)
                tiles = -(-n // c.block_n)
                assert c.split_k == 1 or tiles * c.split_k // 2 < sms // 2, (p, c)
            else:
                assert 2 <= c.num_stages and c.pipelined_bytes(p) <= SMEM_BUDGET and c.split_k <= MAX_SPLIT, (p, c)
                others = [_fit(p, GemvConfig(c.block_m, bn, 128, 4, 6)) for bn in (16, 32, 64)]
                assert all(dot_cost(p, c, sms) <= dot_cost(p, o, sms) for o in others), (p, c)


def _fit(p: GemvProblem, c: GemvConfig) -> GemvConfig:
    """c with as many stages as SMEM_BUDGET takes."""
    while c.num_stages > 2 and c.pipelined_bytes(p) > SMEM_BUDGET:
        c = replace(c, num_stages=c.num_stages - 1)
    return c


def test_dot_cost_prefers_filling_the_gpu_and_deep_pipelines():
    """The model behind the tensor-core choice: fewer programs than SMs, a shallower pipeline and
    more x reads each cost more."""
    p, sms = GemvProblem(2, 4096, 4096, 2, 4), 132
    wide, narrow = GemvConfig(16, 64, 128, 4, 4), GemvConfig(16, 16, 128, 4, 4)
    few = replace(p, n_out=512)  # 32 programs of 16 features: a quarter of the SMs
    assert dot_cost(few, narrow, sms) / few.n_out > 2 * dot_cost(p, narrow, sms) / p.n_out
    assert dot_cost(p, replace(narrow, num_stages=2), sms) > dot_cost(p, narrow, sms)
    assert dot_cost(replace(p, x_bytes=18), narrow, sms) > dot_cost(p, narrow, sms)
    many_rows = replace(p, m=16)  # x reads grow with the rows: the wide tile reads x 4x less often
    assert dot_cost(many_rows, wide, sms) < dot_cost(many_rows, narrow, sms)


@pytest.mark.parametrize("itemsize,parts", [(2, 1), (2, 4), (4, 2)])
def test_choose_config_keeps_the_pipeline_within_the_smem_budget(itemsize, parts):
    """Tensor-core tiles pipeline the x side (fp32 partials, residual) with the weights: fewer
    stages where those are wide, never past the budget for the engine's shapes."""
    for gated in (False, True):
        p = GemvProblem(16, 3072, 1024, itemsize, 4 * parts + itemsize if parts > 1 else 2 * itemsize, gated)
        c = choose_config(p, 132)
        assert c.use_dot and c.num_stages >= 2 and c.pipelined_bytes(p) <= SMEM_BUDGET, c
    wide = GemvProblem(16, 3072, 1024, 2, 4 * 4 + 2, gated=True)
    assert choose_config(wide, 132).num_stages < choose_config(replace(wide, x_bytes=2), 132).num_stages


def test_problem_describes_the_call():
    w = torch.empty(96, 64)
    res = torch.empty(3, 64)
    assert problem(torch.empty(3, 64), w) == GemvProblem(3, 96, 64, 4, 4)
    assert problem(torch.empty(2, 3, 64), w, NormIn(w[0], EPS, res), gated=True, split_ok=True) == GemvProblem(
        3, 48, 64, 4, 2 * 4 + 4, gated=True, can_split=False)
    assert problem(torch.empty(3, 64), w, split_ok=True).can_split


def test_config_parse_and_errors():
    assert GemvConfig.parse("16,16,256,4,4,2") == GemvConfig(16, 16, 256, 4, 4, 2)
    assert GemvConfig.parse("1,8,512,4,3").split_k == 1
    first = GemvConfig.parse("16,32,128,4,5,1,first")
    assert first == GemvConfig(16, 32, 128, 4, 5, 1, norm_first=True) and GemvConfig.parse(first.text()) == first
    assert GemvConfig.parse(GemvConfig(1, 8, 512, 4, 2).text()) == GemvConfig(1, 8, 512, 4, 2)
    assert (GemvConfig(1, 8, 512, 4, 1).prefetch, GemvConfig(1, 8, 512, 4, 2).prefetch) == (1, 2)
    for bad in ("1,8,512", "a,b,c,d,e", "1,8,500,4,3", "16,8,256,4,3", "1,8,512,4,0", "1,8,512,4,1,first",
                "1,8,512,4,1,1,last"):
        with pytest.raises(ValueError):
            GemvConfig.parse(bad)
    x, w = rand(2, 64, dtype=torch.float32), rand(32, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="split_k"):
        skinny_gemm(x, w, gated=True, config=cfg("fma1", 2))
    with pytest.raises(ValueError, match="NormIn"):
        skinny_gemm(rand(2, 2, 64, dtype=torch.float32), w)
    with pytest.raises(ValueError, match="residual"):
        skinny_gemm(x, w, norm=NormIn(torch.ones(64, device=DEVICE), EPS, rand(3, 64, dtype=torch.float32)))
    with pytest.raises(ValueError, match="input"):
        skinny_gemm(x.half(), w)


# ---- the decoder layer's fused path (DecoderLayer._forward_fused), on the CPU interpreter ----

def _fused_hidden(model, ids, positions, caches, meta, backend, row_parallel: bool = False) -> torch.Tensor:
    """LlamaModel.forward with every layer on its fused path, or with `row_parallel` on the usual
    path with skinny o_proj and down_proj (the GPU takes either by itself)."""
    from engine.models.llama import SkinnyRowParallel

    m = model.model
    h, residual = m.embed_tokens(ids), None
    for layer, kv in zip(m.layers, caches):
        if row_parallel:
            h, residual = layer._forward(positions, h, residual, kv, meta, backend, SkinnyRowParallel())
        else:
            h, residual = layer._forward_fused(positions, h, residual, kv, meta, backend)
    return m.norm(h, residual)[0]


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU engine test covers this path on a GPU")
@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])  # q/k norm; q/k/v bias; untied head
@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("row_parallel", [False, True])
def test_decoder_layers_fused_path_matches_the_unfused_one(checkpoint_dirs, monkeypatch, arch, split, row_parallel):
    """float32 prefill of two sequences (8 tokens): hidden states and greedy picks agree with the
    layer's usual path; split=2 makes o_proj and down_proj leave partial sums, so the norm
    prologues and the model's last norm add them up. row_parallel: the usual path with only
    o_proj and down_proj as skinny GEMMs (their partials summed by the RMSNorm kernels)."""
    import engine.kernels.skinny_gemm as sg
    from engine.config import EngineConfig
    from engine.model_runner import ModelRunner
    from engine.sampling_params import SamplingParams
    from engine.scheduler import ScheduledSequence, SchedulerOutput

    choose = sg.choose_config
    monkeypatch.setattr(sg, "choose_config", lambda p, num_sms: (
        GemvConfig(16, 16, 32, 4, 2, split) if p.can_split else choose(p, num_sms)))
    config = EngineConfig(model=checkpoint_dirs[arch], device="cpu", dtype="float32", block_size=4,
                          max_model_len=64, num_kv_blocks=16, max_num_seqs=4, max_num_batched_tokens=64)
    runner = ModelRunner(config)
    runner.allocate_kv_cache(16)
    seqs = [ScheduledSequence(request_id=f"r{i}", token_ids=toks, start_pos=0, block_table=table, sample=True,
                              sampling_params=SamplingParams(), num_output_tokens=0, num_preemptions=0, seq_no=i)
            for i, (toks, table) in enumerate([([5, 17, 250, 3, 9], [1, 2]), ([42, 7, 7], [3])])]
    inputs = runner.prepare_inputs(SchedulerOutput(seqs, num_prefill_tokens=8))
    args = (inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta, runner.backend)
    with torch.inference_mode():
        want = runner.model(*args)
        got = _fused_hidden(runner.model, *args, row_parallel=row_parallel)
        logits = [runner.model.compute_logits(h) for h in (want, got)]
    assert rel(got, want) < 1e-5
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
    down = runner.model.model.layers[0].mlp.down_proj
    assert down.forward_fused(torch.zeros(8, down.in_per_rank)).dim() == (3 if split > 1 else 2)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU engine tests cover this path on a GPU")
# every architecture (q/k norm; q/k/v bias; neither) with both in the kernel, as by default; each
# one alone on qwen3
@pytest.mark.parametrize("arch,rotary,merge", [("qwen3", True, True), ("qwen2", True, True), ("llama", True, True),
                                               ("qwen3", True, False), ("qwen3", False, True)])
@pytest.mark.parametrize("path", ["fused", "usual"])
def test_fused_decode_step_matches_the_unfused_one(checkpoint_dirs, monkeypatch, arch, rotary, merge, path):
    """A float32 decode step of two sequences (41 and 23 tokens of context) and a padded lane, on the
    Triton backend: the q/k norm, rotary and KV store (`rotary`) and the split merge (`merge`) in
    the decode kernel give the unfused attention's hidden states, greedy picks and cache contents,
    on the fused path, and on the usual path with EngineConfig.fused_decode_attention (`usual`:
    the layers' own forward, cuBLAS projections). 16-key tiles and a max_seq_len hint of 256 (as
    a captured graph passes): 4 splits, 3 with keys."""
    import importlib
    from dataclasses import replace as replace_field

    from engine.config import EngineConfig
    from engine.graph_shapes import GraphShape
    from engine.model_runner import ModelRunner
    from engine.sampling_params import SamplingParams
    from engine.scheduler import ScheduledSequence, SchedulerOutput

    monkeypatch.setattr(importlib.import_module("engine.kernels.decode_attention"), "DECODE_TILE", (16, 4, 2))
    config = EngineConfig(model=checkpoint_dirs[arch], device="cpu", dtype="float32", attention_backend="triton",
                          block_size=4, max_model_len=256, num_kv_blocks=24, max_num_seqs=4,
                          max_num_batched_tokens=64, fused_small_batch_rotary=rotary, fused_small_batch_merge=merge)
    runner = ModelRunner(config)
    runner.allocate_kv_cache(24)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 250, (n,), generator=gen).tolist() for n in (40, 22)]
    tables = [list(range(1, 12)), list(range(12, 18))]

    def step(chunks, pad=None):
        seqs = [ScheduledSequence(request_id=f"r{i}", token_ids=toks, start_pos=start, block_table=tables[i],
                                  sample=True, sampling_params=SamplingParams(), num_output_tokens=0, seq_no=i)
                for i, (toks, start) in enumerate(chunks)]
        n = sum(len(t) for t, _ in chunks)
        out = SchedulerOutput(seqs, num_prefill_tokens=0 if pad else n, num_decode_tokens=n if pad else 0)
        inputs = runner.prepare_inputs(out, pad)
        meta = replace_field(inputs.meta, max_seq_len=256) if pad else inputs.meta
        return inputs.input_ids, inputs.positions, runner.kv_caches, meta, runner.backend

    with torch.inference_mode():
        runner.model(*step([(p, 0) for p in prompts]))  # the prefill fills the caches
        args = step([([7], 40), ([250], 22)], GraphShape(3, 3, True))
        before = runner.kv_cache.clone()
        want = runner.model(*args)
        want_cache = runner.kv_cache.clone()
        runner.kv_cache.copy_(before)
        calls = []
        decode_fused = runner.backend.decode_fused
        monkeypatch.setattr(runner.backend, "decode_fused", lambda *a: calls.append(a[-2:]) or decode_fused(*a))
        layers = runner.model.model.layers
        assert not any(layer.fusion.every_decode for layer in layers)  # off by default
        if path == "fused":
            got = _fused_hidden(runner.model, *args)
        else:
            for layer in layers:
                layer.fusion = replace_field(layer.fusion, every_decode=True)
            got = runner.model(*args)
        logits = [runner.model.compute_logits(h) for h in (want, got)]
    assert len(calls) == len(layers) and all((r is not None, m) == (rotary, merge) for r, m in calls)
    assert rel(got, want) < 1e-5
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
    # this step's K and V at their slots (the projections sum in another order), the rest as it was
    torch.testing.assert_close(runner.kv_cache, want_cache)
    changed = (runner.kv_cache != before).flatten(3).any(-1)  # [2, layers, blocks, block_size]
    assert changed.sum() == 2 * 2 * 2 and torch.equal(changed, (want_cache != before).flatten(3).any(-1))
    if path == "usual":  # the config flag is what sets every_decode
        flagged = ModelRunner(replace_field(config, fused_decode_attention=True))
        assert all(layer.fusion.every_decode for layer in flagged.model.model.layers)


def test_row_parallel_columns_run_qkv_and_gate_up_as_skinny_gemms(monkeypatch):
    """EngineConfig.fused_row_parallel_columns: on the row-parallel path the attention's qkv_proj
    and the MLP's gate_up_proj (SiLU * up in the epilogue) are skinny GEMMs of the norm kernels'
    output; o_proj and down_proj leave split-K partials. The decoder layer's pieces against torch."""
    import engine.kernels.skinny_gemm as kernels
    from engine.distributed import SINGLE
    from engine.layers.activation import silu_and_mul
    from engine.models.config import PRESETS
    from engine.models.llama import Attention, DecoderLayer, SkinnyRowParallel

    torch.manual_seed(0)
    mc = PRESETS["tiny"]
    with torch.device(DEVICE):
        layer = DecoderLayer(mc, SINGLE, RotaryEmbedding(mc.head_dim, mc.max_position_embeddings, mc.rope_theta))
    for p in layer.parameters():
        p.data.normal_(0, 0.05)
    calls = []
    monkeypatch.setattr(kernels, "skinny_gemm", lambda x, w, *a, **k: calls.append(w) or skinny_gemm(x, w, *a, **k))
    skinny, x = SkinnyRowParallel(columns=True), torch.randn(5, mc.hidden_size, device=DEVICE)
    mlp = layer.mlp
    got = mlp(x, skinny)
    assert [id(w) for w in calls] == [id(mlp.gate_up_proj.weight), id(mlp.down_proj.weight)]
    want = F.linear(silu_and_mul(F.linear(x, mlp.gate_up_proj.weight)), mlp.down_proj.weight)
    assert rel(got.sum(0) if got.dim() == 3 else got, want) < 1e-5
    seen = {}

    def attend(self, positions, qkv, *args):
        seen["qkv"] = qkv
        return torch.zeros(qkv.shape[0], self.num_heads * self.head_dim, device=qkv.device)

    monkeypatch.setattr(Attention, "attend", attend)
    attn = layer.self_attn
    attn(None, x, None, None, None, skinny)
    assert [id(w) for w in calls[2:]] == [id(attn.qkv_proj.weight), id(attn.o_proj.weight)]
    assert rel(seen["qkv"], F.linear(x, attn.qkv_proj.weight, attn.qkv_proj.bias)) < 1e-5
