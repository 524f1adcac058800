"""Greedy tokens identical to HF transformers `generate` (float32, CPU) for each architecture,
with prefix caching, preemption and chunked prefill each on and off.
Run: pytest tests/test_hf_equality.py"""

from __future__ import annotations

import random

import pytest
from checkpoints import ARCHS, assert_matches_hf, hf_greedy

from engine import EngineConfig, LLMEngine, SamplingParams

MAX_NEW = 12
_rng = random.Random(1234)
SHARED = [_rng.randrange(256) for _ in range(40)]
PROMPTS = [[_rng.randrange(256) for _ in range(n)] for n in (1, 3, 7, 15, 16, 17, 24, 31, 32, 33, 47, 60)]
for i, n in zip((2, 7, 12, 15), (1, 5, 9, 20)):  # shared 40-token prefix, spread over admission waves
    PROMPTS.insert(i, SHARED + [_rng.randrange(256) for _ in range(n)])

MODES = {
    "default": {},
    "all_off": {"enable_prefix_caching": False, "enable_chunked_prefill": False},
    "prefix": {"enable_prefix_caching": True, "max_num_seqs": 4},
    "preempt": {"num_kv_blocks": 14, "enable_prefix_caching": False},
    "chunked": {"max_num_batched_tokens": 16, "enable_prefix_caching": False},
    # plan step N+1 before step N's tokens reach the host, with preemption and chunking in play
    "async": {"async_scheduling": True, "num_kv_blocks": 14, "max_num_batched_tokens": 16},
}


@pytest.fixture(scope="module")
def references(checkpoint_dirs):
    return {arch: hf_greedy(checkpoint_dirs[arch], PROMPTS, MAX_NEW) for arch in ARCHS}


def run_engine(engine: LLMEngine, prompts, params) -> tuple[list[list[int]], list]:
    ids = [engine.add_request(None, p, params) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    stats = []
    while engine.has_unfinished_requests():
        for d in engine.step():
            tokens[d.request_id] += d.new_token_ids
        stats.append(engine.last_step_stats)
    engine.block_manager.check_invariants([])
    return [tokens[i] for i in ids], stats


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf(arch, mode, checkpoint_dirs, references):
    config = EngineConfig(model=checkpoint_dirs[arch], device="cpu", dtype="float32", block_size=16,
                          max_model_len=128, **MODES[mode])
    engine = LLMEngine(config)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    tokens, stats = run_engine(engine, PROMPTS, params)
    assert_matches_hf(tokens, references[arch])
    if mode == "prefix":
        again, stats2 = run_engine(engine, PROMPTS, params)  # second pass: whole prompts cached
        assert_matches_hf(again, references[arch])
        assert stats[-1].prefix_hit_tokens >= 3 * 32, "later shared-prefix prompts should hit 2 blocks each"
        assert stats2[-1].prefix_hit_tokens > stats[-1].prefix_hit_tokens
    if mode in ("preempt", "async"):
        assert sum(s.num_preempted for s in stats) > 0
    if mode in ("chunked", "async"):
        assert any(s.num_prefill_tokens and s.num_decode_tokens for s in stats), "no mixed prefill+decode step"
        assert max(s.num_prefill_tokens + s.num_decode_tokens for s in stats) <= 16
