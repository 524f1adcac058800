"""Scheduler on CPU with hand-built model outputs: token budget, chunked prefill, preemption,
static batching, and invariants under random add/step/abort (hypothesis).
Run: pytest tests/test_scheduler.py"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import make_scheduler
from engine.sequence import FinishReason, Sequence

BS = 4


def make(num_blocks=64, policy="continuous", max_model_len=256, **kw):
    cfg = EngineConfig(model="tiny", block_size=BS, scheduling_policy=policy, max_model_len=max_model_len, **kw)
    bm = BlockManager(num_blocks, BS, cfg.enable_prefix_caching)
    return make_scheduler(cfg, bm, eos_token_id=0), bm


def add(sched, rid, n_prompt, max_tokens=4, **params):
    s = Sequence(rid, [1 + (i % 7) for i in range(n_prompt)], SamplingParams(max_tokens=max_tokens, **params),
                 max_model_len=sched.config.max_model_len)
    sched.add(s)
    return s


def step(sched, token=5):
    out = sched.schedule()
    return out, sched.update_from_output(out, [token if s.sample else None for s in out.seqs])


def test_budget_chunks_prefill_and_mixes_with_decode():
    sched, _ = make(max_num_batched_tokens=10)
    add(sched, "a", 6)
    add(sched, "b", 9)
    out, _ = step(sched)
    assert [(s.request_id, len(s.token_ids), s.sample) for s in out.seqs] == [("a", 6, True), ("b", 4, False)]
    out, _ = step(sched)  # a decodes (1 token) while b's prefill continues with the remaining budget
    assert [(s.request_id, len(s.token_ids), s.start_pos) for s in out.seqs] == [("a", 1, 6), ("b", 5, 4)]
    assert out.num_decode_tokens == 1 and out.num_prefill_tokens == 5


def test_without_chunking_a_prompt_waits_for_budget():
    sched, _ = make(max_num_batched_tokens=256, enable_chunked_prefill=False)
    add(sched, "a", 200)
    add(sched, "b", 100)
    out, _ = step(sched)
    assert [s.request_id for s in out.seqs] == ["a"]


def test_preemption_recomputes_the_last_request():
    sched, bm = make(num_blocks=7)  # 6 usable blocks of 4 tokens
    a = add(sched, "a", 8, max_tokens=8)
    b = add(sched, "b", 8, max_tokens=8)
    step(sched)  # both prefilled: 2 blocks each, 1 token sampled each
    preempted = 0
    while b.num_preemptions == 0:
        out, _ = step(sched)
        preempted += out.num_preempted
    assert preempted == 1 and b.num_computed_tokens == 0 and b in sched.waiting
    assert a.num_preemptions == 0
    while sched.has_unfinished():
        step(sched)
    assert a.num_output_tokens == 8 and b.num_output_tokens == 8
    assert a.finish_reason == FinishReason.LENGTH and bm.num_free_blocks == bm.num_usable_blocks


def test_static_batches_wait_and_reserve_up_front():
    sched, bm = make(policy="static", max_num_seqs=2)
    add(sched, "a", 4, max_tokens=2)
    add(sched, "b", 4, max_tokens=8)
    add(sched, "c", 4, max_tokens=2)
    out, _ = step(sched)
    assert {s.request_id for s in out.seqs} == {"a", "b"}
    assert bm.num_used_blocks == 2 + 3  # a: 6 tokens -> 2 blocks, b: 12 tokens -> 3 blocks
    seen = set()
    while sched.has_unfinished():
        out, _ = step(sched)
        ids = {s.request_id for s in out.seqs}
        if "c" in ids:
            assert "b" not in ids and "b" not in sched.requests  # c only after the batch finished
        seen |= ids
    assert "c" in seen


def test_static_max_reserves_max_model_len_per_request():
    sched, bm = make(num_blocks=10, policy="static", max_model_len=16, static_reservation="max_model_len")
    for rid in "abc":
        add(sched, rid, 4, max_tokens=2)
    out, _ = step(sched)
    assert {s.request_id for s in out.seqs} == {"a", "b"}  # 9 usable blocks hold two 16-token reservations
    assert bm.num_used_blocks == 2 * 4
    assert sched.kv_stats()["kv_waste_reserved_slots"] == 2 * (16 - 4)  # only the prompts are stored yet
    while sched.has_unfinished():
        step(sched)
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_static_batches_hit_the_prefix_cache_of_earlier_batches():
    sched, bm = make(policy="static", max_num_seqs=1)
    first, second = add(sched, "a", 9), add(sched, "b", 9)  # same prompt
    while sched.has_unfinished():
        step(sched)
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 8  # two full blocks; the last prompt token is always computed
    assert bm.prefix_hit_tokens == 8 and bm.prefix_query_tokens == 18


def test_stop_token_respects_min_tokens():
    sched, _ = make()
    s = add(sched, "a", 3, max_tokens=10, min_tokens=2)
    out, _ = step(sched, token=0)  # eos would stop, but min_tokens bans it: sampler masks it
    assert out.seqs[0].banned_token_ids == [0]
    assert not s.is_finished  # one token of two so far
    step(sched, token=0)
    assert not s.is_finished
    step(sched, token=0)
    assert s.finish_reason == FinishReason.STOP


@settings(max_examples=60, deadline=None)
@given(
    actions=st.lists(st.tuples(st.sampled_from(["add", "step", "abort"]), st.integers(1, 40), st.integers(1, 12)),
                     min_size=1, max_size=50),
    policy=st.sampled_from(["continuous", "static", "static-max"]),
    caching=st.booleans(),
)
def test_random_traffic_never_leaks_blocks(actions, policy, caching):
    reservation = "max_model_len" if policy == "static-max" else "max_tokens"
    sched, bm = make(num_blocks=20, policy=policy.removesuffix("-max"), max_num_batched_tokens=16, max_num_seqs=4,
                     enable_prefix_caching=caching, max_model_len=64, static_reservation=reservation)
    n = 0
    for action, a, b in actions:
        if action == "add" and a + b <= 19 * BS:
            add(sched, f"r{n}", a, max_tokens=b)
            n += 1
        elif action == "abort" and sched.requests:
            sched.abort(sorted(sched.requests)[a % len(sched.requests)])
        else:
            step(sched, token=3)
        bm.check_invariants(sched.running)
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        step(sched, token=3)
    assert not sched.has_unfinished(), "requests left unfinished"
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_usable_blocks
