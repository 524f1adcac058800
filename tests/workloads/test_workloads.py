"""Trace format and workload generators.

Run: .venv/bin/python -m pytest tests/test_workloads.py -q
"""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workloads.generators import (
    GENERATORS,
    SHIPPED_TRACES,
    assign_arrivals,
    bench,
    generate,
    sharegpt_like_lengths,
)
from workloads.trace import TraceError, TraceRequest, load_trace, save_trace, with_request_ids

TRACES_DIR = Path(__file__).resolve().parents[2] / "workloads" / "traces"


# --- bench ----------------------------------------------------------------------------------


def test_bench_matches_nano_vllm_totals():
    reqs = bench()
    assert len(reqs) == 256
    assert sum(len(r.prompt_token_ids) for r in reqs) == 142_827
    assert sum(r.max_tokens for r in reqs) == 133_966
    assert all(r.ignore_eos and r.temperature == 0.6 and r.arrival_s == 0.0 for r in reqs)


def test_bench_equals_module_level_random_sequence():
    # bench.py itself: random.seed(0) and the module functions, prompts first, then max_tokens.
    saved = random.getstate()
    try:
        random.seed(0)
        prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
        max_tokens = [random.randint(100, 1024) for _ in range(256)]
    finally:
        random.setstate(saved)
    reqs = bench()
    assert [r.prompt_token_ids for r in reqs] == prompts
    assert [r.max_tokens for r in reqs] == max_tokens


def test_bench_vocab_clamp_only_below_bench_range():
    assert [r.prompt_token_ids for r in bench(vocab_size=32000)] == [r.prompt_token_ids for r in bench()]
    small = bench(num_seqs=8, min_input_len=4, max_input_len=32, min_output_len=2, max_output_len=8, vocab_size=512)
    assert len(small) == 8
    assert all(0 <= t < 512 for r in small for t in r.prompt_token_ids)
    assert all(4 <= len(r.prompt_token_ids) <= 32 and 2 <= r.max_tokens <= 8 for r in small)


def test_bench_rejects_inverted_lengths():
    with pytest.raises(ValueError, match="min=100, max=50"):
        bench(max_input_len=50)


# --- arrivals -------------------------------------------------------------------------------


def _gaps(rate: float, burstiness: float, n: int = 20_000) -> list[float]:
    reqs = [TraceRequest(arrival_s=0.0, max_tokens=1, prompt="x")] * n
    times = [r.arrival_s for r in assign_arrivals(reqs, rate=rate, burstiness=burstiness, seed=1)]
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.mark.parametrize("burstiness, cv", [(1.0, 1.0), (4.0, 0.5), (0.25, 2.0)])
def test_arrival_gaps_mean_and_cv(burstiness, cv):
    gaps = _gaps(rate=10.0, burstiness=burstiness)
    assert all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(0.1, rel=0.05)  # 1 / rate
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, rel=0.1)


def test_arrivals_first_at_zero_seeded_and_infinite_rate():
    reqs = [TraceRequest(arrival_s=5.0, max_tokens=1, prompt="x")] * 5
    a = assign_arrivals(reqs, rate=2.0, seed=3)
    assert a[0].arrival_s == 0.0 and a == assign_arrivals(reqs, rate=2.0, seed=3)
    assert a != assign_arrivals(reqs, rate=2.0, seed=4)
    assert all(r.arrival_s == 0.0 for r in assign_arrivals(reqs, rate=math.inf))


@pytest.mark.parametrize("kwargs", [{"rate": 0}, {"rate": -1}, {"rate": 1, "burstiness": 0}])
def test_arrivals_reject_bad_parameters(kwargs):
    with pytest.raises(ValueError, match="must be"):
        assign_arrivals([], **kwargs)


# --- other generators ---------------------------------------------------------------------


def test_random_dataset_lengths_and_vocab():
    reqs = generate("random", input_len=100, output_len=20, range_ratio=0.5, num_prompts=200, vocab_size=50, seed=7)
    assert all(50 <= len(r.prompt_token_ids) <= 150 and 10 <= r.max_tokens <= 30 for r in reqs)
    assert all(0 <= t < 50 for r in reqs for t in r.prompt_token_ids)
    assert reqs == generate("random", input_len=100, output_len=20, range_ratio=0.5, num_prompts=200,
                            vocab_size=50, seed=7)
    fixed = generate("random", input_len=64, output_len=8, num_prompts=5)
    assert {len(r.prompt_token_ids) for r in fixed} == {64} and {r.max_tokens for r in fixed} == {8}
    with pytest.raises(ValueError, match="range_ratio"):
        generate("random", range_ratio=1.0)


def test_prefix_groups_share_prefixes():
    reqs = generate("prefix", num_groups=3, prefix_len=16, suffix_len=4, output_len=5, num_prompts=12,
                    vocab_size=100, rate=5.0)
    by_group: dict[str, list[TraceRequest]] = {}
    for r in reqs:
        by_group.setdefault(r.prefix_group, []).append(r)
    assert sorted(by_group) == ["group-0", "group-1", "group-2"]
    assert all(len(g) == 4 for g in by_group.values())  # round-robin: equal shares
    for group in by_group.values():
        assert len({tuple(r.prompt_token_ids[:16]) for r in group}) == 1
        assert all(len(r.prompt_token_ids) == 20 for r in group)
    assert len({tuple(g[0].prompt_token_ids[:16]) for g in by_group.values()}) == 3
    assert [r.arrival_s for r in reqs] == sorted(r.arrival_s for r in reqs)


def test_long_context_lengths():
    reqs = generate("long-context", num_prompts=3, min_input_len=4096, max_input_len=8192, output_len=16)
    assert len(reqs) == 3 and all(4096 <= len(r.prompt_token_ids) <= 8192 for r in reqs)


def test_sharegpt_like_lengths_follow_the_documented_means_and_vllms_filter():
    lengths = sharegpt_like_lengths(20_000, random.Random(3))
    ins, outs = [i for i, _ in lengths], [o for _, o in lengths]
    # vLLM's ShareGPT figures (229.7 prompt, 203.1 output tokens a request), within sampling noise
    assert statistics.mean(ins) == pytest.approx(229.7, rel=0.04)
    assert statistics.mean(outs) == pytest.approx(203.1, rel=0.04)
    assert statistics.median(ins) < statistics.mean(ins)  # heavy right tail
    assert min(ins) >= 4 and min(outs) >= 4 and max(ins) <= 1024 and max(i + o for i, o in lengths) <= 2048
    assert max(i + o for i, o in lengths) > 1500  # the tail reaches the filter's cap


def test_sharegpt_like_requests():
    reqs = generate("sharegpt-like", num_prompts=50, vocab_size=100, seed=4, rate=10.0)
    assert reqs == generate("sharegpt-like", num_prompts=50, vocab_size=100, seed=4, rate=10.0)
    assert [(len(r.prompt_token_ids), r.max_tokens) for r in reqs] == sharegpt_like_lengths(50, random.Random(4))
    assert all(r.ignore_eos and 0 <= min(r.prompt_token_ids) and max(r.prompt_token_ids) < 100 for r in reqs)
    assert reqs[-1].arrival_s > 0
    with pytest.raises(ValueError, match="sigma"):
        generate("sharegpt-like", sigma=0)
    small = generate("sharegpt-like", num_prompts=200, input_median=16, output_median=8, max_total_len=48)
    assert max(len(r.prompt_token_ids) + r.max_tokens for r in small) <= 48
    with pytest.raises(ValueError, match="rarely fit"):
        generate("sharegpt-like", num_prompts=5, input_median=5000, max_total_len=64)


def test_generate_rejects_unknown_kind_and_parameter():
    with pytest.raises(ValueError) as e:
        generate("nope")
    assert all(kind in str(e.value) for kind in GENERATORS)
    with pytest.raises(ValueError, match="num_seqs"):
        generate("bench", num_prompts=3)


# --- trace files ----------------------------------------------------------------------------


def _mixed_requests() -> list[TraceRequest]:
    return [
        TraceRequest(arrival_s=0.5, max_tokens=4, prompt="hello", request_id="b", temperature=0.0,
                     stop=["\n", "END"]),
        TraceRequest(arrival_s=0.0, max_tokens=2, prompt_token_ids=[1, 2, 3], prefix_group="g",
                     request_id="a", top_k=5, top_p=0.9, seed=1, min_tokens=1, ignore_eos=True),
        TraceRequest(arrival_s=0.25, max_tokens=1, prompt="x"),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_trace_round_trip(tmp_path, suffix):
    reqs = _mixed_requests()
    path = save_trace(reqs, tmp_path / f"t{suffix}")
    loaded = load_trace(path)
    assert loaded == sorted(reqs, key=lambda r: r.arrival_s)


def test_load_sorts_by_arrival(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 2, "prompt": "b", "max_tokens": 1}\n\n'
                    '{"arrival_s": 1, "prompt": "a", "max_tokens": 1, "stop": "x"}\n')
    loaded = load_trace(path)
    assert [r.prompt for r in loaded] == ["a", "b"] and loaded[0].stop == ["x"]
    assert loaded[1].arrival_s == 2.0 and isinstance(loaded[1].arrival_s, float)


def test_sampling_kwargs_and_prompt_input():
    text, ids, _ = _mixed_requests()
    assert text.prompt_input == "hello"
    assert text.sampling_kwargs() == {"max_tokens": 4, "temperature": 0.0, "stop": ["\n", "END"]}
    assert ids.prompt_input == [1, 2, 3]
    assert ids.sampling_kwargs() == {"max_tokens": 2, "top_k": 5, "top_p": 0.9, "seed": 1, "min_tokens": 1,
                                     "ignore_eos": True}


def test_with_request_ids_fills_missing():
    out = with_request_ids(_mixed_requests())
    assert [r.request_id for r in out] == ["b", "a", "req-00002"]


GOOD = '{"arrival_s": 0, "prompt": "ok", "max_tokens": 1}'
BAD_ROWS = [
    ('{"prompt": "p", "max_tokens": 3}', "arrival_s", "missing"),
    ('{"arrival_s": 0, "prompt": "p"}', "max_tokens", "missing"),
    ('{"arrival_s": 0, "prompt": "p", "max_tokens": "3"}', "max_tokens", "int"),
    ('{"arrival_s": 0, "prompt": "p", "max_tokens": 0}', "max_tokens", ">= 1"),
    ('{"arrival_s": 0, "prompt": "p", "max_tokens": -2}', "max_tokens", ">= 1"),
    ('{"arrival_s": 0, "prompt": "p", "max_tokens": 2.0}', "max_tokens", "int"),
    ('{"arrival_s": -1, "prompt": "p", "max_tokens": 1}', "arrival_s", ">= 0"),
    ('{"arrival_s": "0", "prompt": "p", "max_tokens": 1}', "arrival_s", "number"),
    ('{"arrival_s": 0, "prompt": "p", "prompt_token_ids": [1], "max_tokens": 1}', "prompt", "both"),
    ('{"arrival_s": 0, "max_tokens": 1}', "prompt", "neither"),
    ('{"arrival_s": 0, "prompt_token_ids": [1, "2"], "max_tokens": 1}', "prompt_token_ids", "list of ints"),
    ('{"arrival_s": 0, "prompt": 5, "max_tokens": 1}', "prompt", "string"),
    ('{"arrival_s": 0, "prompt": "p", "max_tokens": 1, "temperature": -1}', "temperature", ">= 0"),
    ('{"arrival_s": 0, "prompt": "p", "max_tokens": 1, "max_token": 1}', "max_token", "unknown field"),
    ('{"arrival_s": 0, "prompt": "p", "max_tokens": 1, "ignore_eos": 1}', "ignore_eos", "bool"),
    # limits the engine and server apply, checked at load
    ('{"arrival_s": 0, "prompt": "p", "max_tokens": 1000000000}', "max_tokens", "<= 10_000_000"),
    ('{"arrival_s": 0, "prompt": "\\ud800", "max_tokens": 1}', "prompt", "valid Unicode"),
    ('{"arrival_s": 0, "prompt": "p", "max_tokens": 1, "stop": ["\\udfff"]}', "stop", "valid Unicode"),
    ('{"arrival_s": 0, "prompt": "p", "max_tokens": 1, "stop": [""]}', "stop", "non-empty"),
    (json.dumps({"arrival_s": 0, "prompt": "p", "max_tokens": 1, "stop": ["x" * 257]}), "stop", "256 characters"),
    (json.dumps({"arrival_s": 0, "prompt": "p", "max_tokens": 1, "stop": ["x"] * 65}), "stop", "at most 64"),
    ('{"arrival_s": 0, "prompt": "p", "max_tokens": 1, "seed": 100000000000000000000}', "seed", "int"),
]


@pytest.mark.parametrize("line, field, words", BAD_ROWS)
def test_bad_jsonl_row_names_file_row_and_field(tmp_path, line, field, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n{line}\n")
    with pytest.raises(TraceError) as e:
        load_trace(path)
    assert (e.value.row, e.value.field) == (2, field)
    assert str(path) in str(e.value) and "row 2" in str(e.value) and f"'{field}'" in str(e.value)
    assert words in str(e.value)


def test_bad_json_line_and_non_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n{GOOD}\n{{not json\n")
    with pytest.raises(TraceError, match="row 3: bad JSON") as e:
        load_trace(path)
    assert e.value.row == 3 and e.value.field is None
    path.write_text("[1, 2]\n")
    with pytest.raises(TraceError, match="row 1: row must be a JSON object"):
        load_trace(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_empty_trace_is_an_error_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n\n")
    else:
        pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("arrival_s", pa.float64())])), path)
    with pytest.raises(TraceError, match="has no requests") as e:
        load_trace(path)
    assert str(path) in str(e.value)
    with pytest.raises(TraceError, match="cannot read") as e:
        load_trace(tmp_path / "missing.jsonl")
    assert "missing.jsonl" in str(e.value)


def test_trace_limits_equal_the_engines():
    """workloads/ repeats the engine's limits (it does not import engine/): they must agree."""
    from engine import sampling_params
    from workloads import trace

    assert trace.MAX_STOP_STRINGS == sampling_params.MAX_STOP_STRINGS
    assert trace.MAX_STOP_STRING_CHARS == sampling_params.MAX_STOP_STRING_CHARS
    assert trace.INT64_MAX == sampling_params.MAX_INT


def test_duplicate_request_id(tmp_path):
    path = tmp_path / "dup.jsonl"
    row = {"arrival_s": 0, "prompt": "p", "max_tokens": 1, "request_id": "x"}
    path.write_text(f"{json.dumps(row)}\n{GOOD}\n{json.dumps(row)}\n")
    with pytest.raises(TraceError, match="row 3: field 'request_id': duplicate id 'x' \\(first at row 1\\)"):
        load_trace(path)


def test_unknown_extension(tmp_path):
    with pytest.raises(TraceError, match=r"unknown trace extension '\.csv'; allowed: \.jsonl, \.parquet"):
        load_trace(tmp_path / "t.csv")
    with pytest.raises(TraceError, match="unknown trace extension"):
        save_trace([], tmp_path / "t.json")


def test_bad_parquet_row(tmp_path):
    path = tmp_path / "bad.parquet"
    table = pa.Table.from_pylist([{"arrival_s": 0.0, "prompt": "a", "max_tokens": 1},
                                  {"arrival_s": 1.0, "prompt": "b", "max_tokens": 0}])
    pq.write_table(table, path)
    with pytest.raises(TraceError, match="row 2: field 'max_tokens': must be an int >= 1 and <= 10_000_000, got 0"):
        load_trace(path)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(TraceError, match="cannot read Parquet"):
        load_trace(tmp_path / "junk.parquet")


@pytest.mark.parametrize("name", sorted(SHIPPED_TRACES))
def test_shipped_traces_load_and_match_their_generator(name):
    kind, params = SHIPPED_TRACES[name]
    loaded = load_trace(TRACES_DIR / name)
    assert len(loaded) >= 16
    assert loaded == generate(kind, **params)  # regenerating gives the shipped file
