"""The load generators against harness/mock_server.py: token counts, worker processes, ceilings.

The mock runs as a subprocess (as in harness.ceiling); nothing here asserts a speed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from harness.backends.base import ReplayOptions
from harness.backends.openai import OpenAIBackend
from harness.ceiling import main as ceiling_main
from harness.ceiling import mock_server
from workloads.trace import TraceRequest


@pytest.fixture(scope="module")
def mock4(tmp_path_factory):
    """A mock sending 4 tokens per event."""
    with mock_server(4, 8, 1, "asyncio", tmp_path_factory.mktemp("mock")) as (url, _):
        yield url


def test_mock_stream_format(mock4):
    body = {"model": "mock", "prompt": [1, 2, 3], "max_tokens": 10, "stream": True,
            "stream_options": {"include_usage": True}}
    lines = [ln for ln in httpx.post(mock4 + "/v1/completions", json=body).text.split("\n") if ln]
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert lines[-1] == "data: [DONE]"
    assert [len(e["choices"][0]["token_ids"]) for e in events[:-1]] == [4, 4, 2]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, "length"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 10
    assert events[-1]["usage"]["prompt_tokens"] == 3
    whole = httpx.post(mock4 + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).json()
    assert whole["choices"][0]["message"]["content"] == " tok" * 5
    assert httpx.get(mock4 + "/v1/models").json()["data"][0]["id"] == "mock"


def test_openai_backend_counts_multi_token_chunks(mock4):
    reqs = [TraceRequest(arrival_s=0.0, max_tokens=n, prompt_token_ids=[1, 2], request_id=f"r{n}")
            for n in (1, 4, 10)]
    for endpoint in ("completions", "chat"):
        if endpoint == "chat":
            reqs = [TraceRequest(arrival_s=0.0, max_tokens=r.max_tokens, prompt="a b", request_id=r.request_id)
                    for r in reqs]
        result = OpenAIBackend(mock4, "mock", endpoint=endpoint).run(
            reqs, time.perf_counter(), ReplayOptions(timed=False, progress=False))
        for req, rec in zip(reqs, result.requests):
            assert rec.status == "ok", rec.error
            assert rec.output_tokens == len(rec.token_times_s) == req.max_tokens
            assert rec.first_token_s == rec.token_times_s[0] and rec.finish_reason == "length"
            # a chunk's tokens share its arrival time (10 tokens in chunks of 4, 4, 2; one read
            # may bring several chunks)
            assert rec.token_times_s == sorted(rec.token_times_s)
            assert len(set(rec.token_times_s)) <= -(-req.max_tokens // 4)
        assert result.info["usage_mismatches"] == 0


def test_openai_workers_lose_no_request_and_share_the_clock(mock4):
    n = 30
    reqs = [TraceRequest(arrival_s=0.01 * i, max_tokens=1 + i % 9, prompt_token_ids=[1, 2, 3], request_id=f"w{i}")
            for i in range(n)]
    backend = OpenAIBackend(mock4, "mock", num_workers=3)
    try:
        t0 = time.perf_counter()
        result = backend.run(reqs, t0, ReplayOptions(timed=True, max_concurrency=6, progress=False))
        wall = time.perf_counter() - t0
        again = backend.run(reqs[:5], time.perf_counter(), ReplayOptions(timed=False, progress=False))
    finally:
        backend.close()
    assert [r.request_id for r in result.requests] == [r.request_id for r in reqs]
    assert [r.status for r in result.requests] == ["ok"] * n
    for req, rec in zip(reqs, result.requests):
        assert rec.output_tokens == len(rec.token_times_s) == req.max_tokens
        # the workers' times are on the caller's t0 axis: never before the arrival, never after the run
        assert req.arrival_s - 0.002 <= rec.sent_s <= rec.first_token_s <= rec.finished_s <= wall
    assert result.info["num_workers"] == 3 and result.info["usage_mismatches"] == 0
    assert [r.status for r in again.requests] == ["ok"] * 5  # the pool serves a second run
    with pytest.raises(ValueError, match="num_workers"):
        OpenAIBackend(mock4, "mock", num_workers=0)


def test_ceiling_drives_both_clients(tmp_path, capsys):
    out = tmp_path / "ceiling.json"
    rc = ceiling_main(["--client", "openai", "locust", "--processes", "1", "2", "--tokens-per-chunk", "3",
                       "--streams", "4", "--chunks", "5", "--requests", "12", "--run-time", "2s",
                       "--server-processes", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = json.loads(Path(out).read_text())
    assert [(r["client"], r["processes"]) for r in rows] == [("openai", 1), ("openai", 2), ("locust", 1), ("locust", 2)]
    for row in rows:
        assert row["errors"] == 0 and row["requests"] >= 1
        assert row["tokens"] == row["requests"] * 15  # every token counted, none twice
        assert row["tok_per_s_per_process"] == pytest.approx(row["tok_per_s"] / row["processes"])
    assert rows[0]["requests"] == rows[1]["requests"] == 12
    assert all(r["server_processes"] == 2 for r in rows)  # two mock processes on one port


def test_starlette_mock_serves_the_same_stream(tmp_path):
    reqs = [TraceRequest(arrival_s=0.0, max_tokens=7, prompt_token_ids=[1], request_id=f"s{i}") for i in range(3)]
    with mock_server(2, 8, 1, "starlette", tmp_path) as (url, _):
        result = OpenAIBackend(url, "mock").run(reqs, time.perf_counter(), ReplayOptions(timed=False, progress=False))
    assert [(r.status, r.output_tokens, len(r.token_times_s)) for r in result.requests] == [("ok", 7, 7)] * 3
