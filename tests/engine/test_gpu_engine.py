"""GPU path (marked gpu; skipped without CUDA): Triton kernels + CUDA graphs give the same greedy
tokens as the CPU torch reference (float32) and as HF transformers on a small checkpoint.
Run on a GPU machine: PYTHONPATH=. python3 -m pytest -m gpu tests/test_gpu_engine.py"""

from __future__ import annotations

import random

import pytest
from checkpoints import assert_bf16_near, assert_matches_hf, build_checkpoint, hf_greedy

from engine import LLM, SamplingParams

pytestmark = pytest.mark.gpu

_rng = random.Random(7)
PROMPTS = [[_rng.randrange(256) for _ in range(n)] for n in (1, 5, 16, 17, 33, 64, 100, 129)]
PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def tokens(llm: LLM, prompts=PROMPTS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]


@pytest.mark.parametrize("eager", [True, False])
def test_gpu_float32_matches_cpu_reference(checkpoint_dirs, eager):
    path = checkpoint_dirs["qwen3"]
    cpu = tokens(LLM(path, device="cpu", dtype="float32"))
    gpu = tokens(LLM(path, device="cuda", dtype="float32", attention_backend="triton", enforce_eager=eager,
                     max_num_seqs=16, max_model_len=256, num_kv_blocks=512))
    reference = hf_greedy(path, PROMPTS, PARAMS.max_tokens)
    assert_matches_hf(cpu, reference)
    assert_matches_hf(gpu, reference)


def test_gpu_chunked_prefix_and_graph_padding(checkpoint_dirs):
    """Odd batch sizes pad to captured graph sizes; chunked prefill and prefix hits on GPU."""
    path = checkpoint_dirs["llama"]
    shared = [_rng.randrange(256) for _ in range(48)]
    prompts = PROMPTS + [shared + [i] for i in range(5)]
    reference = hf_greedy(path, prompts, PARAMS.max_tokens)
    llm = LLM(path, device="cuda", dtype="float32", max_num_batched_tokens=64, max_num_seqs=12,
              max_model_len=256, num_kv_blocks=512)
    assert_matches_hf(tokens(llm, prompts), reference)
    assert_matches_hf(tokens(llm, prompts), reference)  # second pass: prefix-cache hits
    assert llm.engine.block_manager.prefix_hit_tokens > 0


def test_bf16_engine_runs_preset_and_sampling():
    llm = LLM("qwen3-0.6b", max_model_len=1024, max_num_seqs=32, num_kv_blocks=4096)
    outs = llm.generate([[1, 2, 3] * k for k in range(1, 20)],
                        SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)


def test_sampling_kernels_compile_at_engine_start():
    """Each sampling chunk size is its own compiled kernel (batch 1 and a full batch pick
    different ones): both compile when the engine starts, not in the first sampled steps."""
    from harness.kernels.jit_watch import watch_jit

    llm = LLM("qwen3-0.6b", max_model_len=256, max_num_seqs=64, num_kv_blocks=2048)
    params = SamplingParams(temperature=0.7, max_tokens=4, ignore_eos=True)
    with watch_jit() as jit:
        for batch in (1, 64):
            llm.generate([[3, 1, 4, 1, 5]] * batch, params, use_tqdm=False)
    assert jit.available
    assert not [k for k in jit.seen if k.startswith("engine.kernels.sample")], jit.seen


# ---- small batches through the fused skinny-GEMM path (EngineConfig.fused_small_batch_tokens) ----
SMALL = dict(device="cuda", max_num_seqs=16, max_model_len=256, num_kv_blocks=512)
# cuBLAS and the norm kernels for every projection (the default fuses small steps of narrow models)
CUBLAS = dict(fused_small_batch_tokens=0, fused_row_parallel_tokens=0)
# the fused path with its own qk_norm_rope and reduce kernels (the default folds them into decode attention)
NOT_IN_DECODE = dict(fused_small_batch_rotary=False, fused_small_batch_merge=False)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])  # q/k norm; q/k/v bias; untied head
def test_fused_small_batch_float32_matches_hf(checkpoint_dirs, arch):
    """float32, CUDA graphs: decode steps of 8 rows, then prompts alone (prefills of 1, 5 and 16
    tokens, eager, and 1-row decode graphs) through the fused path; HF's greedy tokens with the
    near-tie rule, as the cuBLAS path gives them."""
    path = checkpoint_dirs[arch]
    reference = hf_greedy(path, PROMPTS, PARAMS.max_tokens)
    fused = LLM(path, dtype="float32", fused_small_batch_tokens=16, **NOT_IN_DECODE, **SMALL)
    assert_matches_hf(tokens(fused), reference)
    assert_matches_hf([tokens(fused, [p])[0] for p in PROMPTS[:3]], reference[:3])
    cublas = LLM(path, dtype="float32", **CUBLAS, **SMALL)
    assert_matches_hf(tokens(cublas), reference)
    row_parallel = LLM(path, dtype="float32", fused_small_batch_tokens=0, fused_row_parallel_tokens=16, **SMALL)
    assert_matches_hf(tokens(row_parallel), reference)
    columns = LLM(path, dtype="float32", fused_small_batch_tokens=0, fused_row_parallel_tokens=16,
                  fused_row_parallel_columns=True, **SMALL)
    assert_matches_hf(tokens(columns), reference)


@pytest.mark.parametrize("batch", [24, 48])
def test_row_parallel_default_at_17_to_64_rows_float32_matches_hf(checkpoint_dirs, batch):
    """The default fused_row_parallel_tokens (FUSED_AUTO_ROW_PARALLEL_TOKENS) reaches steps of 17-64
    sequences: o_proj and down_proj on 32- and 64-row tiles splitting K; HF's greedy tokens."""
    from engine.config import FUSED_AUTO_ROW_PARALLEL_TOKENS

    assert FUSED_AUTO_ROW_PARALLEL_TOKENS >= batch
    path, rng = checkpoint_dirs["qwen3"], random.Random(11)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(3, 40))] for _ in range(batch)]
    llm = LLM(path, dtype="float32", **{**SMALL, "max_num_seqs": 64})
    assert llm.engine.config.resolved_row_parallel_tokens == FUSED_AUTO_ROW_PARALLEL_TOKENS
    assert_matches_hf(tokens(llm, prompts), hf_greedy(path, prompts, PARAMS.max_tokens))


def test_fused_small_batch_pdl_float32_matches_hf(checkpoint_dirs):
    """The fused kernels launched as programmatic dependents (fused_small_batch_pdl), eager and
    captured in CUDA graphs: still HF's tokens."""
    import torch

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90 or later")
    path = checkpoint_dirs["qwen3"]
    reference = hf_greedy(path, PROMPTS, PARAMS.max_tokens)
    for eager in (False, True):
        llm = LLM(path, dtype="float32", fused_small_batch_pdl=True, enforce_eager=eager, **NOT_IN_DECODE, **SMALL)
        assert_matches_hf(tokens(llm), reference)
        assert_matches_hf([tokens(llm, [p])[0] for p in PROMPTS[:3]], reference[:3])


def test_fused_small_batch_bf16_matches_the_cublas_path(checkpoint_dirs):
    path = checkpoint_dirs["qwen3"]
    got = tokens(LLM(path, dtype="bfloat16", **SMALL))  # the default: batch-1 steps fused (a narrow model)
    want = tokens(LLM(path, dtype="bfloat16", **CUBLAS, **SMALL))
    assert_bf16_near(path, got, want, PROMPTS, PARAMS.max_tokens, "fused vs cuBLAS")
    single = [tokens(LLM(path, dtype="bfloat16", **{**CUBLAS, "fused_small_batch_tokens": n}, **SMALL),
                     [PROMPTS[1]])[0] for n in (16, 0)]
    assert_bf16_near(path, single[:1], single[1:], [PROMPTS[1]], PARAMS.max_tokens, "batch 1: fused vs cuBLAS")


def decode_step_kernels(path: str, prompt: list[int], **config) -> tuple[list[str], int]:
    """The CUDA kernels of one eager decode step of one sequence (torch.profiler; off the
    persistent kernel unless config turns it on), and the model's layer count."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    config = {"persistent_decode": False, **config}  # the fused path's kernels unless asked
    llm = LLM(path, dtype="bfloat16", enforce_eager=True, async_scheduling=False, **{**SMALL, **config})
    engine, layers = llm.engine, llm.engine.config.model_config.num_hidden_layers
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.step()  # the prefill
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    llm.shutdown()
    return names, layers


@pytest.mark.parametrize("fused,row_parallel", [(16, 0), (0, 0), (0, 16)])
def test_fused_small_batch_launches_one_kernel_per_projection(checkpoint_dirs, fused, row_parallel):
    """One eager decode step of one sequence: 4 skinny-GEMM kernels a layer and no SiLU * up or
    RMSNorm kernel besides the model's last norm; with fused_small_batch_tokens=0, none, or with
    fused_row_parallel_tokens, 2 (o_proj and down_proj) beside the SiLU * up and norm kernels
    (two norms a layer and the last)."""
    names, layers = decode_step_kernels(checkpoint_dirs["qwen3"], PROMPTS[2], fused_small_batch_tokens=fused,
                                        fused_row_parallel_tokens=row_parallel)
    count = lambda part: sum(part in n for n in names)  # noqa: E731
    if fused:
        assert count("_skinny_gemm_kernel") == 4 * layers and count("_silu_mul_kernel") == 0
        assert count("_rmsnorm_kernel") <= 1, names
    else:
        assert count("_skinny_gemm_kernel") == (2 * layers if row_parallel else 0), names
        assert count("_silu_mul_kernel") == layers and count("_rmsnorm_kernel") == 2 * layers + 1, names


def test_fused_decode_kernel_takes_rotary_and_merge(checkpoint_dirs):
    """fused_small_batch_rotary and _merge: a decode step (101 tokens of context: 2 KV splits)
    launches 5 kernels a layer where the fused path otherwise launches 7: no qk_norm_rope and no
    decode reduce kernel, the rest as before."""
    runs = {on: decode_step_kernels(checkpoint_dirs["qwen3"], PROMPTS[6], fused_small_batch_tokens=16,
                                    fused_small_batch_rotary=on, fused_small_batch_merge=on) for on in (False, True)}
    steps, layers = {on: names for on, (names, _) in runs.items()}, runs[True][1]
    count = {on: (lambda part, names=names: sum(part in n for n in names)) for on, names in steps.items()}
    for on in (False, True):
        assert count[on]("_skinny_gemm_kernel") == 4 * layers and count[on]("_decode_split_kernel") == layers
        assert count[on]("_qk_norm_rope_kernel") == count[on]("_decode_reduce_kernel") == (0 if on else layers)
        assert count[on]("_store_kv_kernel") == 0
    assert len(steps[True]) == len(steps[False]) - 2 * layers, (steps[False], steps[True])


FUSED_DECODE = dict(fused_small_batch_rotary=True, fused_small_batch_merge=True)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])  # q/k norm; q/k/v bias; untied head
def test_fused_decode_kernel_float32_matches_hf(checkpoint_dirs, arch):
    """float32 with the rotary, KV store and split merge in the decode kernel: CUDA graphs of 8
    decode rows and of 1 (4 splits from max_model_len 256), then eager steps; HF's greedy
    tokens with the near-tie rule."""
    path = checkpoint_dirs[arch]
    reference = hf_greedy(path, PROMPTS, PARAMS.max_tokens)
    for eager in (False, True):
        llm = LLM(path, dtype="float32", fused_small_batch_tokens=16, enforce_eager=eager, **FUSED_DECODE, **SMALL)
        assert_matches_hf(tokens(llm), reference)
        assert_matches_hf([tokens(llm, [p])[0] for p in PROMPTS[:3]], reference[:3])
        assert_matches_hf([tokens(llm, [PROMPTS[-1]])[0]], reference[-1:])


def test_fused_decode_kernel_bf16_matches_the_cublas_path(checkpoint_dirs):
    """bf16, batch 1 (the default fused path) and 8 rows: the tokens of the cuBLAS path up to near-ties."""
    path = checkpoint_dirs["qwen3"]
    got = tokens(LLM(path, dtype="bfloat16", fused_small_batch_tokens=16, **FUSED_DECODE, **SMALL))
    want = tokens(LLM(path, dtype="bfloat16", **CUBLAS, **SMALL))
    assert_bf16_near(path, got, want, PROMPTS, PARAMS.max_tokens, "fused decode kernel vs cuBLAS")
    single = [tokens(LLM(path, dtype="bfloat16", **config, **SMALL), [PROMPTS[6]])[0]
              for config in (FUSED_DECODE, CUBLAS)]
    assert_bf16_near(path, single[:1], single[1:], [PROMPTS[6]], PARAMS.max_tokens, "batch 1: fused vs cuBLAS")


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])  # q/k norm; q/k/v bias; untied head
@pytest.mark.parametrize("max_context", [1536, 40])  # 40: prompts of 17-33 tokens cross it mid-generation
def test_persistent_decode_float32_matches_hf(checkpoint_dirs, arch, max_context):
    """EngineConfig.persistent_decode: batch-1 decode steps run every layer in one kernel with
    grid barriers; prompts one at a time (and a batch of 8, which takes the other paths), CUDA
    graphs and eager: HF's greedy tokens with the near-tie rule. Past persistent_decode_max_context
    a sequence's steps take the fused path (its own batch-1 graph). The test models' o slices are
    small, so their plans run o inside the attention step (fused_o)."""
    path = checkpoint_dirs[arch]
    reference = hf_greedy(path, PROMPTS, PARAMS.max_tokens)
    for eager in (False, True):
        llm = LLM(path, dtype="float32", persistent_decode=True, persistent_decode_max_context=max_context,
                  enforce_eager=eager, **SMALL)
        assert_matches_hf([tokens(llm, [p])[0] for p in PROMPTS], reference)
        assert_matches_hf(tokens(llm), reference)
        assert llm.engine.executor.runner.model.model._persistent[1].plan.fused_o == 1


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_persistent_decode_of_several_sequences_float32_matches_hf(checkpoint_dirs, arch):
    """persistent_decode_max_seqs 16: decode steps of up to 16 sequences run the persistent kernel
    (the batch of 8 prompts, padded up the graph ladder as sequences finish), CUDA graphs and
    eager: HF's greedy tokens with the near-tie rule."""
    path = checkpoint_dirs[arch]
    reference = hf_greedy(path, PROMPTS, PARAMS.max_tokens)
    for eager in (False, True):
        llm = LLM(path, dtype="float32", persistent_decode_max_seqs=16, enforce_eager=eager, **SMALL)
        assert_matches_hf(tokens(llm), reference)
        assert 8 in llm.engine.executor.runner.model.model._persistent  # the batch of 8 took the kernel


@pytest.mark.parametrize("arch,knob,value,field", [("qwen3", "FUSED_O_MAX_SLICE", 0, "fused_o"),
                                                   ("llama", "FUSED_O_MAX_SLICE", 0, "fused_o"),
                                                   ("qwen3", "COOPERATIVE", 1, "cooperative")])
def test_persistent_decode_variants_float32_match_hf(checkpoint_dirs, arch, knob, value, field, monkeypatch):
    """The persistent kernel's other variants, each through its module knob (read by choose_plan
    when the model builds its plan): o in a step of its own (FUSED_O_MAX_SLICE 0; the small test
    models' plans otherwise run o inside the attention step) and a cooperative launch
    (COOPERATIVE, captured into the batch-1 graph). HF's greedy tokens, prompts one at a time,
    CUDA graphs."""
    import engine.kernels.persistent_decode as pd

    monkeypatch.setattr(pd, knob, value)
    path = checkpoint_dirs[arch]
    llm = LLM(path, dtype="float32", persistent_decode=True, **SMALL)
    assert getattr(llm.engine.executor.runner.model.model._persistent[1].plan, field) == value
    assert_matches_hf([tokens(llm, [p])[0] for p in PROMPTS], hf_greedy(path, PROMPTS, PARAMS.max_tokens))


def test_persistent_decode_reaches_layers_past_32_bit_offsets(tmp_path):
    """A KV cache whose last layer starts 2^31 or more elements past the first while a layer's
    stride fits 32 bits (llama-3-8b with the cache filling an H200: an illegal address at batch 1
    before the kernel's layer offsets were int64, reports/PERF.md row 58). Three layers, 2^30 + a
    few elements a layer's K (26 GB of float32 K and V): HF's greedy tokens, prompts one at a time."""
    path = build_checkpoint("qwen3", str(tmp_path / "deep"), num_layers=3)
    per_block = 256 * 2 * 16  # block size x KV heads x head_dim
    llm = LLM(path, dtype="float32", device="cuda", block_size=256, num_kv_blocks=2**30 // per_block + 8,
              max_num_seqs=4, max_model_len=256)
    k = [kc for kc, _ in llm.engine.executor.runner.kv_caches]
    stride = (k[1].data_ptr() - k[0].data_ptr()) // k[0].element_size()
    assert stride < 2**31 <= 2 * stride
    assert_matches_hf([tokens(llm, [p])[0] for p in PROMPTS], hf_greedy(path, PROMPTS, PARAMS.max_tokens))
    assert llm.engine.executor.runner.model.model._persistent  # the kernel ran


def test_persistent_decode_bf16_matches_the_fused_path(checkpoint_dirs):
    """bf16, prompts one at a time: the persistent kernel's tokens are the fused path's up to
    near-ties, and a batch-1 decode step is that one kernel (no skinny GEMM or decode kernel)."""
    path = checkpoint_dirs["qwen3"]
    got = [tokens(LLM(path, dtype="bfloat16", persistent_decode=True, **SMALL), [p])[0] for p in PROMPTS]
    want = [tokens(LLM(path, dtype="bfloat16", persistent_decode=False, **SMALL), [p])[0] for p in PROMPTS]
    assert_bf16_near(path, got, want, PROMPTS, PARAMS.max_tokens, "persistent decode vs the fused path")
    names, _ = decode_step_kernels(path, PROMPTS[6], persistent_decode=True)
    count = lambda part: sum(part in n for n in names)  # noqa: E731
    assert count("_persistent_decode_kernel") == 1, names
    assert count("_skinny_gemm_kernel") == count("_decode_split_kernel") == 0, names
    # past persistent_decode_max_context (PROMPTS[6] has 100 tokens): the fused path's kernels
    names, layers = decode_step_kernels(path, PROMPTS[6], persistent_decode=True, persistent_decode_max_context=64)
    assert count("_persistent_decode_kernel") == 0 and count("_decode_split_kernel") == layers, names


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])  # q/k norm; q/k/v bias; untied head
def test_fused_decode_attention_float32_matches_hf(checkpoint_dirs, arch):
    """EngineConfig.fused_decode_attention: the usual (cuBLAS) path's decode steps with the q/k
    norm, rotary, KV store and split merge in the decode kernel; CUDA graphs and eager, batches
    of 8 and 1; HF's greedy tokens with the near-tie rule."""
    path = checkpoint_dirs[arch]
    reference = hf_greedy(path, PROMPTS, PARAMS.max_tokens)
    for eager in (False, True):
        llm = LLM(path, dtype="float32", fused_decode_attention=True, enforce_eager=eager, **CUBLAS, **SMALL)
        assert_matches_hf(tokens(llm), reference)
        assert_matches_hf([tokens(llm, [p])[0] for p in (PROMPTS[0], PROMPTS[-1])], [reference[0], reference[-1]])


def test_fused_decode_attention_drops_the_rope_and_reduce_kernels(checkpoint_dirs):
    """A decode step of 101 tokens of context (2 KV splits) on the usual path: with
    fused_decode_attention, no qk_norm_rope, store_kv or decode reduce kernel; the split kernel
    once a layer either way."""
    counts = {}
    for on in (False, True):
        names, layers = decode_step_kernels(checkpoint_dirs["qwen3"], PROMPTS[6], fused_decode_attention=on, **CUBLAS)
        counts[on] = {k: sum(k in n for n in names) for k in
                      ("_qk_norm_rope_kernel", "_decode_reduce_kernel", "_decode_split_kernel", "_store_kv_kernel")}
    assert counts[False]["_qk_norm_rope_kernel"] == counts[False]["_decode_reduce_kernel"] == layers, counts
    assert counts[True]["_qk_norm_rope_kernel"] == counts[True]["_decode_reduce_kernel"] == 0, counts
    assert counts[True]["_store_kv_kernel"] == 0 and counts[True]["_decode_split_kernel"] == layers, counts
