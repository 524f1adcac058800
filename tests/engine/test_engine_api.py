"""Engine public and step APIs on the tiny preset: bad input raises a clear error and the
engine keeps serving; aborts free blocks; stop strings, seeds and limits behave.
Run: pytest tests/test_engine_api.py"""

from __future__ import annotations

import pytest

from engine import LLM, EngineConfig, LLMEngine, SamplingParams


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(model="tiny", max_model_len=64, num_kv_blocks=40, block_size=4))


def drain(engine):
    deltas = []
    while engine.has_unfinished_requests():
        deltas += engine.step()
    return deltas


@pytest.mark.parametrize(
    "kwargs, field",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -5}, "top_k"),
     ({"max_tokens": 0}, "max_tokens"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
     ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"seed": "x"}, "seed")],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "prompt, params, match",
    [("", None, "empty"), ([], None, "empty"), ([1, 2, 10_000], None, "outside the vocabulary"),
     ([1] * 64, None, "max_model_len"), ([1.5], None, "integer"), (None, None, "string or a list"),
     ([1, 2], SamplingParams(stop_token_ids=[600], min_tokens=1), "stop_token_ids"),
     ([1] * 10, SamplingParams(max_tokens=10_000), None)],
)
def test_bad_requests_rejected_and_engine_keeps_serving(engine, prompt, params, match):
    if match is None:  # fits max_model_len (generation stops there) but check it still runs
        rid = engine.add_request(None, prompt, params)
        deltas = [d for d in drain(engine) if d.request_id == rid]
        assert deltas[-1].finish_reason == "length"
        assert 10 + sum(len(d.new_token_ids) for d in deltas) == 64  # stopped at max_model_len
        return
    with pytest.raises(ValueError, match=match):
        engine.add_request(None, prompt, params)
    rid = engine.add_request(None, [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    assert sum(len(d.new_token_ids) for d in drain(engine) if d.request_id == rid) == 3
    engine.block_manager.check_invariants([])


def test_request_that_can_never_fit_the_cache_is_rejected():
    small = LLMEngine(EngineConfig(model="tiny", num_kv_blocks=5, block_size=4, max_model_len=64))
    with pytest.raises(ValueError, match="KV blocks"):
        small.add_request(None, [1] * 10, SamplingParams(max_tokens=20))
    small.add_request(None, [1] * 10, SamplingParams(max_tokens=6, ignore_eos=True))
    assert [d.finish_reason for d in drain(small) if d.finished] == ["length"]


def test_static_max_needs_room_for_max_model_len():
    small = LLMEngine(EngineConfig(model="tiny", num_kv_blocks=9, block_size=4, max_model_len=64,
                                   scheduling_policy="static", static_reservation="max_model_len"))
    with pytest.raises(ValueError, match="for 64 tokens.*max_model_len 64"):  # 16 blocks, 8 in the cache
        small.add_request(None, [1] * 3, SamplingParams(max_tokens=2))
    assert not small.has_unfinished_requests()


def test_duplicate_request_id(engine):
    engine.add_request("dup", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [1, 2], SamplingParams(max_tokens=2))
    drain(engine)


def test_abort_frees_blocks_and_reports(engine):
    rid = engine.add_request(None, [5] * 20, SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    assert engine.abort_request(rid)
    deltas = engine.step()
    assert [(d.request_id, d.finish_reason) for d in deltas] == [(rid, "abort")]
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()
    assert not engine.abort_request(rid)


def test_stop_string_truncates_text():
    llm = LLM("tiny")
    full = llm.generate("abc", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    text = full.outputs[0].text
    assert len(text) >= 4
    stop = text[2:4]
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]


def test_seeded_sampling_is_reproducible_and_batch_independent():
    llm = LLM("tiny")
    p = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    alone = llm.generate([[3, 4, 5]], p, use_tqdm=False)[0].outputs[0].token_ids
    batched = llm.generate([[9, 9], [3, 4, 5], [1]], [SamplingParams(temperature=1.0, max_tokens=5), p,
                                                      SamplingParams(temperature=0.5, max_tokens=7)], use_tqdm=False)
    assert batched[1].outputs[0].token_ids == alone


def test_generate_outputs_in_order_with_text_and_ids():
    llm = LLM("tiny")
    outs = llm.generate(["hi", [7, 8, 9], "longer prompt"], SamplingParams(temperature=0, max_tokens=5,
                                                                            ignore_eos=True), use_tqdm=False)
    assert [o.prompt for o in outs] == ["hi", None, "longer prompt"]
    assert outs[1].prompt_token_ids == [7, 8, 9]
    tok = llm.engine.tokenizer
    for o in outs:
        assert len(o.outputs[0].token_ids) == 5 and o.finished
        assert o.outputs[0].text == tok.decode(o.outputs[0].token_ids, skip_special_tokens=True)


def test_unknown_option_and_bad_config():
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM("tiny", max_num_seq=3)
    with pytest.raises(ValueError, match="neither a preset"):
        EngineConfig(model="no-such-model")
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineConfig(scheduling_policy="fifo")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=3)
    with pytest.raises(ValueError, match="all_reduce_norm_fusion"):
        EngineConfig(all_reduce_norm_fusion="fast")


def test_top_k_above_vocab_and_top_p_sample_within_vocab():
    llm = LLM("tiny")
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=1.0, top_k=10_000, top_p=0.9, max_tokens=6,
                                                   ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 6 and all(0 <= t < llm.engine.config.model_config.vocab_size for t in out.token_ids)


def test_reused_request_ids_get_their_own_block_tables():
    """A finished request's id may come back; the runner's staged block table must be the new
    sequence's, not rows left from the old one."""
    engine = LLMEngine(EngineConfig(model="tiny", num_kv_blocks=64, block_size=4, enable_prefix_caching=False))
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request("same-id", [9] * 30, params)
    old_table = None
    while engine.has_unfinished_requests():
        old_table = list(engine.scheduler.requests["same-id"].block_table) if engine.scheduler.requests else old_table
        engine.step()
    engine.add_request("same-id", [5] * 30, params)
    engine.step()
    seq = engine.scheduler.requests["same-id"]
    assert seq.block_table[:2] != old_table[:2]  # fresh blocks: the free queue hands out others
    staged = engine.executor.runner.buffers.block_tables.np[0, : len(seq.block_table)].tolist()
    assert staged == seq.block_table


def test_reset_prefix_cache_forgets_cached_blocks():
    engine = LLMEngine(EngineConfig(model="tiny", max_model_len=64, num_kv_blocks=40, block_size=4))
    prompt, params = list(range(1, 18)), SamplingParams(max_tokens=2, ignore_eos=True)

    def cached_tokens() -> int:
        engine.add_request("r", prompt, params)
        return next(d.num_cached_tokens for d in drain(engine) if d.finished)

    assert cached_tokens() == 0
    assert cached_tokens() == 16  # the 4 full prompt blocks are hit
    engine.add_request("busy", prompt, params)
    engine.step()
    with pytest.raises(RuntimeError, match="unfinished"):
        engine.reset_prefix_cache()
    drain(engine)
    engine.reset_prefix_cache()
    assert cached_tokens() == 0
    engine.block_manager.check_invariants([])


@pytest.mark.parametrize("freeze", [True, False])
def test_warm_up_freezes_the_heap_until_shutdown(freeze):
    """freeze_gc: warm_up() moves the start-up heap out of the collector's scans (a full collection
    of it would stall a decode step) and shutdown() gives it back, so the engine's reference
    cycles can be freed; without it the collector is left alone."""
    import gc

    gc.unfreeze()  # a clean start whatever ran before
    engine = LLMEngine(model="tiny", device="cpu", max_model_len=128, freeze_gc=freeze)
    try:
        engine.warm_up()
        assert (gc.get_freeze_count() > 0) == freeze
    finally:
        engine.shutdown()
    assert gc.get_freeze_count() == 0
    with pytest.raises(ValueError, match="freeze_gc"):
        EngineConfig(model="tiny", freeze_gc="yes")
