"""Trace replay against the in-process backends (engine, static, static-max, hf) on the tiny model, CPU.

Run: .venv/bin/python -m pytest tests/test_replay.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import EngineConfig
from harness.backends.base import ReplayOptions, RunResult
from harness.backends.engine import EngineBackend
from harness.backends.hf import HFBackend
from harness.profiles import RatePoint, make_profile
from harness.records import RequestRecord
from harness.replay import replay
from harness.report import load_report
from harness.run import RunSpec, make_backend, run_once
from workloads.generators import generate
from workloads.spec import WorkloadSpec
from workloads.trace import TraceRequest

# Scaled-down bench workload; 64 KV blocks of 16 tokens for both policies (equal KV memory),
# few enough that the static baseline's up-front reservation limits its batches.
BENCH = {"num_seqs": 16, "min_input_len": 16, "max_input_len": 64, "min_output_len": 8, "max_output_len": 96,
         "vocab_size": 512}
ENGINE_ARGS = {"num_kv_blocks": 64, "device": "cpu", "max_model_len": 160}  # 160: the longest BENCH request
TOO_LONG = TraceRequest(arrival_s=0.0, max_tokens=4, prompt_token_ids=[7] * 2100, request_id="too-long")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The tiny model is bound by host overhead; OpenMP threads spinning against other processes
    # on a small shared machine make steps many times slower and the timings noisy.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def bench_reports(tmp_path_factory):
    """Offline replay of the same requests (plus one the engine must reject) on each policy."""
    requests = generate("bench", **BENCH) + [TOO_LONG]
    root = tmp_path_factory.mktemp("replay")
    out = {}
    for backend in ("engine", "static", "static-max"):
        spec = RunSpec(backend=backend, workload=WorkloadSpec(kind="bench", params=BENCH, rate=math.inf),
                       engine_args=ENGINE_ARGS, telemetry=False, progress=False)
        run_once(spec, root / backend, requests=requests)
        out[backend] = load_report(root / backend)
    return requests, out


def test_continuous_beats_static_at_equal_kv_memory(bench_reports):
    _, reports = bench_reports
    cont, static = (reports[b].summary_row() for b in ("engine", "static"))
    blocks = {b: r.metadata["config"]["backend_info"]["num_kv_blocks"] for b, r in reports.items()}
    assert blocks == {"engine": 64, "static": 64, "static-max": 64}
    assert cont["num_steps"] < static["num_steps"]  # scheduling only: exact on any machine
    assert cont["output_throughput"] > static["output_throughput"]
    assert cont["kv_waste_mean"] < static["kv_waste_mean"]
    assert static["kv_waste_reserved_peak"] > 0.2  # the up-front reservation shows up as waste


def test_reserving_max_model_len_wastes_more_than_max_tokens(bench_reports):
    _, reports = bench_reports
    static, static_max = (reports[b].summary_row() for b in ("static", "static-max"))
    config = reports["static-max"].metadata["config"]["backend_info"]["engine_config"]
    assert config["static_reservation"] == "max_model_len" and config["scheduling_policy"] == "static"
    assert static_max["kv_waste_reserved_mean"] > static["kv_waste_reserved_mean"]
    assert static_max["mean_batch_size"] < static["mean_batch_size"]  # 6 reservations fit, not up to 10
    assert static_max["num_steps"] > static["num_steps"]


def test_every_request_is_accounted_for(bench_reports):
    requests, reports = bench_reports
    for report in reports.values():
        rows = report.requests.set_index("request_id")
        assert list(rows.index) == [r.request_id for r in requests]  # trace order, none missing
        bad = rows.loc["too-long"]
        assert bad["status"] == "error" and "max_model_len" in bad["error"]
        ok = rows.drop(index="too-long")
        assert (ok["status"] == "ok").all()
        expected = {r.request_id: r.max_tokens for r in requests if r.request_id != "too-long"}
        assert ok["output_tokens"].to_dict() == expected  # ignore_eos: exactly max_tokens
        assert all(len(t) == n for t, n in zip(ok["token_times_s"], ok["output_tokens"]))
        assert (ok["finish_reason"] == "length").all()


def test_summary_recomputes_from_requests_parquet(bench_reports):
    for report in bench_reports[1].values():
        assert report.recompute_summary() == report.summary_row()
        assert report.summary_row()["num_error"] == 1


def test_engine_backends_time_the_detokenized_path_by_default(bench_reports):
    for report in bench_reports[1].values():
        assert report.metadata["config"]["backend_info"]["detokenize"] is True


@pytest.mark.parametrize("detokenize", [True, False])
def test_detokenize_option_reaches_the_engine(detokenize):
    from harness.run import backend_options

    assert backend_options("engine", {"detokenize": detokenize}) == {"detokenize": detokenize}
    backend = EngineBackend("tiny", warmup=False, detokenize=detokenize, **ENGINE_ARGS)
    texts = []
    step = backend.engine.step

    def spy():
        deltas = step()
        texts.extend(d.new_text for d in deltas)
        return deltas

    backend.engine.step = spy
    try:
        requests = [TraceRequest(0.0, max_tokens=6, prompt_token_ids=list(range(40, 52)), request_id="a"),
                    TraceRequest(0.0, max_tokens=6, prompt_token_ids=list(range(60, 70)), request_id="b")]
        run = replay(backend, requests, ReplayOptions(timed=False, progress=False), telemetry=False).run
    finally:
        backend.close()
    assert run.info["detokenize"] is detokenize
    assert [r.output_tokens for r in run.requests] == [6, 6]
    assert any(texts) is detokenize  # the tiny model's bytes decode to some text


def test_detokenize_option_must_be_a_bool():
    with pytest.raises(ValueError, match="detokenize"):
        EngineBackend("tiny", warmup=False, detokenize="no", **ENGINE_ARGS)


def test_timed_replay_honours_arrivals_and_concurrency():
    requests = generate("smoke", num_prompts=8, min_tokens_out=4, max_tokens_out=8, rate=40.0)
    backend = EngineBackend("tiny", **ENGINE_ARGS)
    try:
        result = replay(backend, requests, ReplayOptions(timed=True, max_concurrency=2, progress=False),
                        telemetry=True)
    finally:
        backend.close()
    recs = result.run.requests
    assert [r.scheduled_s for r in recs] == [r.arrival_s for r in requests]
    for r in recs:
        assert r.status == "ok"
        assert r.sent_s >= r.scheduled_s and r.first_token_s >= r.sent_s
        assert r.token_times_s == sorted(r.token_times_s) and r.finished_s == r.token_times_s[-1]
    events = sorted([(r.sent_s, 1) for r in recs] + [(r.finished_s, -1) for r in recs], key=lambda e: (e[0], e[1]))
    in_flight = [sum(d for _, d in events[: i + 1]) for i in range(len(events))]
    assert max(in_flight) <= 2
    assert result.telemetry_status["nvml_available"] in (True, False)  # CPU: False, no samples faked
    assert result.telemetry == [] or result.telemetry_status["nvml_available"]


def test_hf_backend_records_output_tokens():
    requests = [TraceRequest(0.0, max_tokens=n, prompt_token_ids=list(range(1, 4 + 3 * n)), request_id=f"h{n}")
                for n in (3, 6, 2)] + [TraceRequest(0.0, max_tokens=4, prompt="Hello there", request_id="text"),
                                       TraceRequest(0.0, max_tokens=8, prompt_token_ids=[1] * 2045, request_id="long")]
    backend = HFBackend("tiny", batch_size=2, device="cpu")
    result = replay(backend, requests, ReplayOptions(timed=False, progress=False), telemetry=False)
    recs = {r.request_id: r for r in result.run.requests}
    for req in requests[:4]:
        rec = recs[req.request_id]
        assert rec.status == "ok" and rec.output_tokens == req.max_tokens == len(rec.token_times_s)
        assert rec.sent_s <= rec.first_token_s <= rec.finished_s
    assert recs["long"].status == "error" and "positions" in recs["long"].error
    assert len(result.run.info["batch_end_s"]) == 2  # 4 valid requests in batches of 2


def test_roofline_weight_bytes_match_the_model():
    from engine.config import PRESETS
    from harness.backends.hf import hf_model_from_config
    from harness.roofline import weight_bytes

    mc = PRESETS["tiny"]  # tied embeddings: the LM head is the embedding, counted once
    model = hf_model_from_config(EngineConfig(model="tiny"), torch.float32, "cpu")
    assert weight_bytes(mc, 4) == 4 * sum(p.numel() for p in model.parameters())


class _LosingBackend:
    name = "losing"

    def run(self, requests, t0, options) -> RunResult:
        first = requests[0]
        return RunResult([RequestRecord(first.request_id, 0.0, 0.0, 0.1, 0.2, [0.1], 3, 1, status="ok")])

    def close(self) -> None:
        pass


def test_replay_fills_in_lost_requests():
    requests = generate("smoke", num_prompts=3, rate=math.inf)
    with pytest.warns(UserWarning, match="no record"):
        result = replay(_LosingBackend(), requests, ReplayOptions(timed=False, progress=False), telemetry=False)
    assert [r.status for r in result.run.requests] == ["ok", "error", "error"]


def test_unknown_backend_lists_the_valid_names():
    with pytest.raises(ValueError, match="engine, static, static-max, hf, openai"):
        make_backend("vllm")


def test_sweep_profile_takes_fractions_of_the_measured_rate():
    profile = make_profile("sweep", fractions=[0.5, 1.0])
    assert math.isinf(next(profile).rate)
    assert profile.send({"request_throughput": 8.0}).rate == 4.0
    assert profile.send({}).rate == 8.0
    with pytest.raises(StopIteration):
        profile.send({})
    with pytest.raises(ValueError, match="valid profiles"):
        make_profile("ramp")


def test_sweep_profile_with_a_base_rate_ignores_the_measured_one():
    profile = make_profile("sweep", fractions=[1.0, 2.0], base_rate=3.0)
    assert next(profile).label == "offline"
    assert [profile.send({"request_throughput": 100.0}), profile.send({})] == [
        RatePoint("x1", 3.0), RatePoint("x2", 6.0)]
    for bad in (0, math.inf, "fast"):
        with pytest.raises(ValueError, match="base_rate"):
            make_profile("sweep", base_rate=bad)


def test_sweep_reusing_backends_resets_the_prefix_cache(tmp_path, monkeypatch):
    """One engine serves every point; each point's prefix hits come from its own requests
    only (the same prompts replayed without a reset would hit on every full block). One
    request at a time, so the hits do not depend on how arrivals overlap."""
    import harness.sweep as sweep_mod
    from harness.sweep import SweepSpec, run_sweep

    built = []
    real = sweep_mod.make_backend
    monkeypatch.setattr(sweep_mod, "make_backend", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    workload = WorkloadSpec(kind="prefix", label="shared", params=dict(
        num_groups=2, prefix_len=32, suffix_len=8, output_len=4, num_prompts=6))
    spec = SweepSpec(backends=["engine"], workload=workload, profile="fixed",
                     profile_params={"rates": [500.0, 1000.0]}, engine_args={"num_kv_blocks": 64, "block_size": 4, "max_num_seqs": 1},
                     telemetry=False, progress=False, reuse_backends=True)
    frame = run_sweep(spec, tmp_path)
    assert built == ["engine"]
    assert list(frame["run_dir"]) == ["shared-engine-rate-500", "shared-engine-rate-1000"]
    assert list(frame["workload"]) == ["shared", "shared"]
    first, second = frame["prefix_cache_hit_rate"]
    assert 0 < first < 0.9 and second == first
    assert all(frame["num_ok"] == 6)
