"""GPU path (marked gpu; skipped without CUDA): Triton kernels + CUDA graphs give the same greedy
tokens as the CPU torch reference (float32) and as HF transformers on a small checkpoint.
Run on a GPU machine: PYTHONPATH=. python3 -m pytest -m gpu tests/test_gpu_engine.py"""

from __future__ import annotations

import random

import pytest
from checkpoints import assert_matches_hf, hf_greedy

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
