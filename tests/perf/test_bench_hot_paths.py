"""pytest-benchmark benchmarks of the engine's CPU hot paths: the block manager with prefix
hashing, a scheduler step at 256 running requests, and ModelRunner.prepare_inputs at 256
decodes (the detokenizer's are in tests/engine/test_detokenizer.py).

In the normal test run (`nox -s tests`, pyproject's --benchmark-disable) each runs once, as a
correctness test: the asserts check what the timed code produced, never how long it took.
`nox -s perf` times them and compares with the saved baseline (noxfile.py says how).
"""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSequence, SchedulerOutput, make_scheduler
from engine.sequence import Sequence

BLOCK = 16
RUNNING = 256


def _prompt(i: int, shared: int, total: int) -> list[int]:
    """`shared` tokens common to every prompt, then tokens unique to prompt i."""
    return [7 + k % 50 for k in range(shared)] + [1000 + i * total + k for k in range(total - shared)]


def test_block_manager_allocate_cache_free_with_prefix_hits(benchmark):
    bm = BlockManager(num_blocks=64 * 16 + 1, block_size=BLOCK)
    params = SamplingParams(max_tokens=1)
    prompts = [_prompt(i, shared=128, total=256) for i in range(64)]

    def cycle() -> list[int]:
        bm.reset_prefix_cache()  # every round starts cold: the same work each time
        seqs, hits = [], []
        for i, prompt in enumerate(prompts):
            seq = Sequence(f"s{i}", prompt, params)
            cached = bm.find_cached_prefix(seq)
            assert bm.allocate_slots(seq, len(prompt), cached)
            seq.num_computed_tokens = len(prompt)
            bm.cache_full_blocks(seq)
            seqs.append(seq)
            hits.append(len(cached))
        for seq in seqs:
            bm.free(seq)
        return hits

    hits = benchmark(cycle)
    # 128 shared tokens = 8 blocks, found by every sequence after the first
    assert hits == [0] + [128 // BLOCK] * 63
    assert bm.num_free_blocks == bm.num_usable_blocks


@pytest.fixture
def decoding_scheduler():
    """256 requests past their prefill: every further step is a pure decode step."""
    cfg = EngineConfig(model="tiny", block_size=BLOCK, max_num_seqs=RUNNING, max_num_batched_tokens=8192,
                       max_model_len=2048)
    bm = BlockManager(RUNNING * 40, BLOCK, cfg.enable_prefix_caching)
    sched = make_scheduler(cfg, bm, eos_token_id=None)
    for i in range(RUNNING):
        sched.add(Sequence(f"r{i}", _prompt(i, shared=0, total=32), SamplingParams(max_tokens=1500, ignore_eos=True),
                           max_model_len=cfg.max_model_len))
    out = sched.schedule()  # all 256 prompts fit one step's budget
    sched.update_from_output(out, [5 if s.sample else None for s in out.seqs])
    return sched


def test_scheduler_decode_step_at_256_running(benchmark, decoding_scheduler):
    sched = decoding_scheduler

    def step() -> SchedulerOutput:
        out = sched.schedule()
        sched.update_from_output(out, [5] * len(out.seqs))
        return out

    out = benchmark.pedantic(step, rounds=200, iterations=1, warmup_rounds=5)
    assert len(out.seqs) == RUNNING and out.num_decode_tokens == RUNNING and out.num_prefill_tokens == 0
    assert all(len(s.token_ids) == 1 and s.sample for s in out.seqs)


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    cfg = EngineConfig(model="tiny", device="cpu", block_size=BLOCK, max_model_len=2048, num_kv_blocks=RUNNING * 8,
                       max_num_seqs=RUNNING, max_num_batched_tokens=8192)
    r = ModelRunner(cfg)
    r.allocate_kv_cache(RUNNING * 8)
    return r


def test_prepare_inputs_decode_at_256(benchmark, runner):
    # each sequence at a position in 100..119 (inside its own 8-block table of 128 slots)
    pos = [100 + i % 20 for i in range(RUNNING)]
    seqs = [ScheduledSequence(f"r{i}", [3 + i], pos[i], list(range(8 * i, 8 * i + 8)), True, SamplingParams(), 1,
                              seq_no=i) for i in range(RUNNING)]
    out = SchedulerOutput(seqs, num_decode_tokens=RUNNING)
    inputs = benchmark(runner.prepare_inputs, out)
    assert inputs.positions.tolist() == pos
    assert inputs.meta.slot_mapping.tolist() == [(8 * i + p // BLOCK) * BLOCK + p % BLOCK for i, p in enumerate(pos)]
    assert inputs.meta.seq_lens.tolist() == [p + 1 for p in pos]
    assert inputs.input_ids.tolist() == [3 + i for i in range(RUNNING)]
