"""OpenAIBackend (harness/backends/openai.py) against the shim, run as its own process.

    .venv/bin/python -m pytest tests/test_openai_backend.py -q

The server runs in a subprocess (`python -m engine.serve`), as in real use: in-process, the
client thread would compete with the server's threads for the GIL and its timings would say
more about that than about the server.

TTFT agreement: the same smoke trace (16 requests, timed arrivals over 3.6 s) is replayed
through the shim and through the in-process EngineBackend, both warmed on these prompts first,
with one torch thread each. The HTTP path adds request parsing, tokenization, the hop to the
engine thread and the loopback round trip, so its TTFT is a little higher. Tolerance: the
medians differ by at most 30 ms (the tiny model's TTFT is ~4-15 ms on an idle 2-core machine;
measured difference +5 to +11 ms there). The machine is shared, and another process's burst can
stall either replay by hundreds of ms, so the comparison gets up to 3 attempts. In the same
run, the client's mean TTFT from send must lie between the server's own mean TTFT (parse ->
first token, from /metrics) and that plus 30 ms.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import torch

from harness.backends.base import ReplayOptions
from harness.backends.engine import EngineBackend
from harness.backends.openai import OpenAIBackend
from harness.loadtest import running, scrape_metrics, start_server, wait_healthy
from harness.replay import replay
from workloads.trace import TraceRequest, load_trace

SMOKE = Path(__file__).resolve().parents[2] / "workloads" / "traces" / "smoke.jsonl"
TTFT_MEDIAN_TOLERANCE_S = 0.030
MAX_ATTEMPTS = 3
# One torch thread on both sides: with two OpenMP threads on a busy 2-core machine a step
# stalls at the thread barrier whenever another process holds a core (steps of 0.3-0.9 s were
# measured for the tiny model, against < 11 ms with one thread).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    from engine.serve import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("shim") / "server.log"
    with running(start_server("tiny", port, [], log, env=ONE_THREAD)) as proc:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc, timeout_s=120)
        except Exception:
            print(log.read_text())
            raise
        yield url


def _ttft(records) -> list[float]:
    return [r.first_token_s - r.scheduled_s for r in records if r.status == "ok"]


def test_replay_accounts_for_every_request(shim):
    from engine.tokenizer import build_byte_tokenizer

    trace = load_trace(SMOKE)
    bad = TraceRequest(
        arrival_s=0.5, max_tokens=4, prompt_token_ids=[1, 10**6], request_id="bad-token"
    )
    requests = sorted([*trace, bad], key=lambda r: r.arrival_s)
    result = OpenAIBackend(shim, "tiny").run(
        requests, time.perf_counter(), ReplayOptions(timed=False, max_concurrency=8)
    )
    assert [r.request_id for r in result.requests] == [r.request_id for r in requests]
    by_id = {r.request_id: r for r in result.requests}
    assert by_id["bad-token"].status == "error" and "HTTP 400" in by_id["bad-token"].error
    tok = build_byte_tokenizer()
    for req in trace:
        rec = by_id[req.request_id]
        assert rec.status == "ok", rec.error
        assert rec.output_tokens == len(rec.token_times_s) >= 1
        assert rec.output_tokens <= req.max_tokens
        assert rec.prompt_tokens == len(tok(req.prompt).input_ids)
        assert rec.sent_s <= rec.first_token_s <= rec.finished_s
        assert rec.token_times_s == sorted(rec.token_times_s) and rec.finish_reason in (
            "stop",
            "length",
        )
    assert result.info["usage_mismatches"] == 0


def test_chat_endpoint_and_unreachable_server(shim):
    from engine.serve import free_port

    reqs = [
        TraceRequest(
            arrival_s=0.0, max_tokens=5, prompt="hi there", request_id="c0", ignore_eos=True
        ),
        TraceRequest(arrival_s=0.0, max_tokens=5, prompt_token_ids=[1, 2], request_id="c1"),
    ]
    chat = OpenAIBackend(shim, "tiny", endpoint="chat").run(
        reqs, time.perf_counter(), ReplayOptions(timed=False)
    )
    assert chat.requests[0].status == "ok" and chat.requests[0].output_tokens == 5
    assert chat.requests[1].status == "error" and "endpoint='completions'" in chat.requests[1].error
    dead = OpenAIBackend(f"http://127.0.0.1:{free_port()}", "tiny", timeout_s=5).run(
        reqs, time.perf_counter(), ReplayOptions(timed=False)
    )
    assert [r.status for r in dead.requests] == ["error", "error"]
    assert all(r.error and r.finished_s is not None for r in dead.requests)
    with pytest.raises(ValueError, match="endpoint"):
        OpenAIBackend(shim, "tiny", endpoint="embeddings")


def _median_ttft_pair(shim: str, engine_backend: EngineBackend, trace: list[TraceRequest]):
    http = replay(
        OpenAIBackend(shim + "/v1", "tiny"), trace, ReplayOptions(timed=True), telemetry=False
    ).run
    local = replay(engine_backend, trace, ReplayOptions(timed=True), telemetry=False).run
    assert all(r.status == "ok" for r in http.requests + local.requests)
    return http, statistics.median(_ttft(http.requests)), statistics.median(_ttft(local.requests))


def test_ttft_agrees_with_engine_backend_and_server(shim):
    trace = load_trace(SMOKE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine_backend = EngineBackend("tiny")
    try:  # warm both paths on these prompts first, untimed
        replay(engine_backend, trace, ReplayOptions(timed=False), telemetry=False)
        OpenAIBackend(shim, "tiny").run(trace, time.perf_counter(), ReplayOptions(timed=False))
        attempts = []
        for _ in range(MAX_ATTEMPTS):  # the CI machine is shared: a noisy neighbour gets a retry
            before = scrape_metrics(shim)
            http, http_med, local_med = _median_ttft_pair(shim, engine_backend, trace)
            after = scrape_metrics(shim)
            attempts.append((http_med - local_med) * 1e3)
            print(
                f"median TTFT: shim over HTTP {http_med * 1e3:.1f} ms, in-process engine {local_med * 1e3:.1f} ms, "
                f"difference {attempts[-1]:+.1f} ms (tolerance {TTFT_MEDIAN_TOLERANCE_S * 1e3:.0f} ms)"
            )
            if abs(attempts[-1]) <= TTFT_MEDIAN_TOLERANCE_S * 1e3:
                break
    finally:
        engine_backend.close()
        torch.set_num_threads(threads)
    assert abs(attempts[-1]) <= TTFT_MEDIAN_TOLERANCE_S * 1e3, (
        f"median TTFT differences (ms) {attempts}"
    )
    # The same run, seen from both ends: the client's interval contains the server's.
    key_sum, key_n = (
        "llmbench_time_to_first_token_seconds_sum",
        "llmbench_time_to_first_token_seconds_count",
    )
    assert after[key_n] - before[key_n] == len(trace)
    server_mean = (after[key_sum] - before[key_sum]) / (after[key_n] - before[key_n])
    client_mean = statistics.mean(r.first_token_s - r.sent_s for r in http.requests)
    print(
        f"mean TTFT from send: client {client_mean * 1e3:.1f} ms, server-side {server_mean * 1e3:.1f} ms"
    )
    assert server_mean <= client_mean <= server_mean + TTFT_MEDIAN_TOLERANCE_S
