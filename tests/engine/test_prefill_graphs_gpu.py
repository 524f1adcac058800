"""CUDA graphs for prefill and mixed steps (marked gpu; skipped without CUDA): greedy tokens equal
HF transformers with prefill graphs on and off, through prefix-cache hits, chunked prefill and
mixed prefill + decode steps; the graphs are really replayed; the KV cache after a graphed
prefill equals the eager one.
Run on a GPU machine: PYTHONPATH=. python3 -m pytest -m gpu tests/engine/test_prefill_graphs_gpu.py"""

from __future__ import annotations

import random

import pytest
import torch
from checkpoints import assert_matches_hf, hf_greedy

from engine import LLM, SamplingParams
from engine.graph_shapes import GraphShape

pytestmark = pytest.mark.gpu

_rng = random.Random(11)
LENGTHS = (1, 5, 16, 17, 33, 64, 100, 128, 129, 300, 400)
LIMIT = 256  # max_graph_prefill_tokens: the 300 and 400-token prefills run eagerly when whole
PROMPTS = [[_rng.randrange(256) for _ in range(n)] for n in LENGTHS]
PARAMS = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
ENGINE = dict(device="cuda", dtype="float32", attention_backend="triton", max_model_len=512, num_kv_blocks=1024)


def llm_with_spy(path: str, **config) -> tuple[LLM, list[GraphShape | None]]:
    """An engine whose runner records the graph shape each step replays (None: eager)."""
    llm = LLM(path, **ENGINE, **config)
    graphs = llm.engine.executor.runner.graphs
    seen: list[GraphShape | None] = []
    lookup = graphs.lookup

    def spy(out):
        graph = lookup(out)
        seen.append(graph.shape if graph is not None else None)
        return graph

    graphs.lookup = spy  # the instance attribute shadows the method
    return llm, seen


def tokens(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]


def prefill_shapes(seen: list[GraphShape | None]) -> set[GraphShape]:
    return {s for s in seen if s is not None and not s.decode}


@pytest.mark.parametrize("one_at_a_time", [True, False])
def test_prefill_graphs_on_and_off_match_hf(checkpoint_dirs, one_at_a_time):
    """One request at a time (prefill steps alone), and all at once with a small token budget
    (chunked prefills mixed with the decodes of earlier prompts)."""
    path = checkpoint_dirs["qwen3"]
    reference = hf_greedy(path, PROMPTS, PARAMS.max_tokens)
    budget = dict(max_num_batched_tokens=512 if one_at_a_time else 160, max_num_seqs=8)
    for limit in (LIMIT, 0):
        llm, seen = llm_with_spy(path, max_graph_prefill_tokens=limit, **budget)
        got = [tokens(llm, [p])[0] for p in PROMPTS] if one_at_a_time else tokens(llm, PROMPTS)
        assert_matches_hf(got, reference)
        graphed = prefill_shapes(seen)
        if limit == 0:
            assert not graphed
        elif one_at_a_time:  # each prompt's prefill up to LIMIT tokens ran in a graph
            assert {s.num_tokens for s in graphed} == {16, 32, 48, 64, 128, 192}
            assert None in seen  # ... the longer ones eagerly
        else:  # 160-token chunks and mixed steps: every step fits a graph
            assert None not in seen and len(graphed) >= 2
        llm.shutdown()


def test_prefix_hits_and_chunks_under_prefill_graphs(checkpoint_dirs):
    """Chunks of at most 64 tokens and prefix-cache hits (q_len < seq_len) in graphs."""
    path = checkpoint_dirs["llama"]
    shared = [_rng.randrange(256) for _ in range(80)]
    prompts = PROMPTS[:8] + [shared + [i] * (i + 1) for i in range(5)]
    reference = hf_greedy(path, prompts, PARAMS.max_tokens)
    llm, seen = llm_with_spy(path, max_num_batched_tokens=64, max_num_seqs=12)
    assert_matches_hf(tokens(llm, prompts), reference)
    assert_matches_hf(tokens(llm, prompts), reference)  # second pass: prefix-cache hits
    assert llm.engine.block_manager.prefix_hit_tokens > 0
    assert None not in seen  # every step fits a graph under a 64-token budget
    assert GraphShape(64, 12, False) in prefill_shapes(seen)
    llm.shutdown()


def kv_after_prefill(path: str, prompt: list[int], limit: int) -> torch.Tensor:
    llm, seen = llm_with_spy(path, max_graph_prefill_tokens=limit, enable_prefix_caching=False)
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    assert (seen[0] is not None) == (limit > 0)
    kv = llm.engine.executor.runner.kv_cache.clone()
    llm.shutdown()
    return kv


@pytest.mark.parametrize("length", [128, 100])
def test_kv_cache_same_after_graphed_prefill(checkpoint_dirs, length):
    """128 tokens fill the 128 graph: the same kernels at the same shapes, so the same bits. 100
    pad to 128: the GEMMs run at another M, so equal up to float32 rounding."""
    path = checkpoint_dirs["qwen3"]
    prompt = PROMPTS[LENGTHS.index(length)]
    graphed, eager = kv_after_prefill(path, prompt, LIMIT), kv_after_prefill(path, prompt, 0)
    assert graphed.abs().sum() > 0  # the prompt's K/V are there
    if length == 128:
        assert torch.equal(graphed, eager)
    else:
        torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-5)
        assert torch.equal(graphed == 0, eager == 0)  # the same slots written, none by padding
