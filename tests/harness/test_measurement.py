"""Measurement you can trust and share: steady-state windows, time-bounded runs, percentiles,
the /metrics scraper, vLLM-shaped exports, ratios at equal load, narrow tables and
machine-aware baselines.

    PYTHONPATH=$PWD python -m pytest tests/harness/test_measurement.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from rich.console import Console

from harness import gate
from harness.backends.base import ReplayOptions
from harness.backends.engine import EngineBackend
from harness.cli import main
from harness.compare import Run, summary_table, sweep_frame, table_rows, write_html
from harness.exports import RESULT_JSON, SUMMARY_CSV, SWEEP_CSV
from harness.metrics import summarize
from harness.records import RequestRecord
from harness.replay import replay
from harness.report import (
    Report,
    append_sweep_summary,
    load_report,
    requests_frame,
    steps_frame,
    telemetry_frame,
    write_report,
)
from harness.run import RunSpec, run_once
from harness.scrape import parse_metrics, server_summary
from harness.window import Bound, flag_window, parse_bound
from workloads.spec import WorkloadSpec
from workloads.trace import TraceRequest


def _ok(rid: str, sent: float, first: float, end: float, n: int = 3) -> RequestRecord:
    times = [first + (end - first) * k / (n - 1) for k in range(n)]
    return RequestRecord(rid, sent, sent_s=sent, first_token_s=first, finished_s=end, token_times_s=times,
                         prompt_tokens=8, output_tokens=n, status="ok", finish_reason="length")


# ---- steady-state windows --------------------------------------------------------------------
def test_parse_bound():
    assert parse_bound("10") == Bound(requests=10)
    assert parse_bound("5s") == Bound(seconds=5.0) and parse_bound("0.5s") == Bound(seconds=0.5)
    assert not parse_bound(None) and not parse_bound("0")
    with pytest.raises(ValueError, match="request count"):
        parse_bound("5m")


def test_warmup_and_cooldown_rows_are_flagged_and_left_out_of_the_summary():
    # r0/r1 are sent first (warm-up 2); r5 finishes last (cool-down 1); r9 was never sent
    recs = [_ok(f"r{i}", 0.1 * i, 0.1 * i + 0.05, 0.1 * i + 0.2) for i in range(5)]
    recs.append(_ok("r5", 0.5, 0.55, 3.0))
    recs.append(RequestRecord("r9", 9.0, status="not_sent", error="not sent"))
    flag_window(recs, parse_bound("2"), parse_bound("1"))
    assert [r.window for r in recs] == ["warmup"] * 2 + ["steady"] * 3 + ["cooldown", "steady"]
    s = summarize(requests_frame(recs))
    assert (s["num_warmup"], s["num_cooldown"], s["num_not_sent"], s["num_requests"]) == (2, 1, 1, 4)
    # duration: steady r2..r4 (and the unsent row, with no finish): 0.2 -> 0.6
    assert s["num_ok"] == 3 and s["duration_s"] == pytest.approx(0.4)
    assert s["mean_ttft_ms"] == pytest.approx(50)  # the 2.45 s of r5 is not in it
    # seconds: sent in the first 0.15 s (r0, r1), finishing in the last 0.5 s (r5 only)
    flag_window(recs, parse_bound("0.15s"), parse_bound("0.5s"))
    assert [r.window for r in recs] == ["warmup"] * 2 + ["steady"] * 3 + ["cooldown", "steady"]


def test_step_figures_cover_the_steady_window_only():
    from harness.records import StepRecord
    from harness.report import steps_frame

    recs = [_ok("w", 0.0, 0.05, 0.1), _ok("a", 1.0, 1.1, 1.5), _ok("b", 1.2, 1.3, 2.0)]
    recs[0].window = "warmup"

    def step(k, start, end, seqs, query, hit):
        return StepRecord(k, start, end, num_running=seqs, num_waiting=0, num_scheduled_seqs=seqs,
                          num_prefill_tokens=0, num_decode_tokens=seqs, num_preempted=0, kv_blocks_used=1,
                          kv_blocks_total=10, kv_slots_allocated=16, kv_tokens_stored=8, kv_waste_internal_slots=8,
                          kv_waste_reserved_slots=0, prefix_query_tokens=query, prefix_hit_tokens=hit)

    # the warm-up step ran 8 sequences with all-hit prefixes; the steady ones 2, half hits
    steps = steps_frame([step(0, 0.0, 0.1, 8, 100, 100), step(1, 1.0, 1.4, 2, 150, 125),
                         step(2, 1.4, 2.0, 2, 200, 150)])
    s = summarize(requests_frame(recs), steps)
    assert s["num_steps"] == 2 and s["mean_batch_size"] == 2.0
    assert s["prefix_cache_hit_rate"] == pytest.approx(50 / 100)  # not 150 / 200 over the whole run
    recs[0].window = "steady"  # nothing left out: the whole run, as before windows existed
    whole = summarize(requests_frame(recs), steps)
    assert whole["num_steps"] == 3 and whole["prefix_cache_hit_rate"] == pytest.approx(150 / 200)


def test_engine_run_keeps_warmup_rows_in_the_parquet(tmp_path):
    spec = RunSpec(backend="engine", workload=WorkloadSpec(kind="smoke"), telemetry=False, progress=False,
                   warmup=Bound(requests=3), cooldown=Bound(requests=2), percentiles=(50, 99.9))
    summary = run_once(spec, tmp_path / "run")
    report = load_report(tmp_path / "run")
    counts = report.requests["window"].value_counts().to_dict()
    assert counts == {"warmup": 3, "cooldown": 2, "steady": len(report.requests) - 5}
    assert summary["num_requests"] == counts["steady"] and summary["num_warmup"] == 3
    assert summary["p99.9_ttft_ms"] is not None and "p99_ttft_ms" not in summary
    assert report.recompute_summary() == pytest.approx(summary)


@pytest.mark.parametrize("flags, message", [
    (["--warmup", "5m"], "--warmup/--cooldown"),
    (["--duration", "soon"], "--duration expects a duration"),
    (["--percentiles", "50,101"], "--percentiles"),
    (["--scrape-interval", "0"], "--scrape-interval"),
])
def test_bad_measurement_flags_are_usage_errors(flags, message, capsys):
    assert main(["run", "--backend", "engine", "--workload", "smoke", *flags]) == 2
    assert message in capsys.readouterr().err


# ---- time-bounded runs -----------------------------------------------------------------------
def _late_trace(n: int = 12) -> list[TraceRequest]:
    # half the requests arrive at 0.0-0.25 s, half at 30 s: past a 1 s deadline
    return [TraceRequest(prompt_token_ids=[1, 2, 3, 4], max_tokens=4, ignore_eos=True,
                         arrival_s=0.05 * i if i < n // 2 else 30.0, request_id=f"q{i}") for i in range(n)]


def test_duration_records_unsent_requests_on_the_engine_backend():
    backend = EngineBackend("tiny", device="cpu")
    try:
        result = replay(backend, _late_trace(), ReplayOptions(timed=True, progress=False, duration_s=1.0),
                        telemetry=False)
    finally:
        backend.close()
    statuses = [r.status for r in result.run.requests]
    assert statuses == ["ok"] * 6 + ["not_sent"] * 6  # nothing dropped, nothing waited 30 s for
    late = result.run.requests[-1]
    assert late.sent_s is None and "duration" in late.error


def test_duration_offline_with_a_concurrency_cap_on_the_hf_backend():
    from harness.backends.hf import HFBackend

    trace = [TraceRequest(prompt_token_ids=[1, 2, 3], max_tokens=200, arrival_s=0.0, request_id=f"h{i}")
             for i in range(40)]
    backend = HFBackend("tiny", batch_size=2, device="cpu")
    result = replay(backend, trace, ReplayOptions(timed=False, progress=False, duration_s=0.3), telemetry=False)
    statuses = pd.Series([r.status for r in result.run.requests]).value_counts().to_dict()
    assert statuses.get("ok", 0) >= 2 and statuses.get("not_sent", 0) >= 1
    assert sum(statuses.values()) == 40


# ---- the server: scraper, duration over HTTP -------------------------------------------------
@pytest.fixture(scope="module")
def server():
    from engine import EngineConfig
    from engine.serve import ServerThread, create_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ServerThread(create_app(EngineConfig(model="tiny", device="cpu"), "tiny")) as srv:
            yield srv.url
    finally:
        torch.set_num_threads(threads)


def test_scraper_writes_server_metrics_during_an_openai_run(server, tmp_path):
    workload = WorkloadSpec(kind="random", params={"num_prompts": 24, "input_len": 16, "output_len": 24},
                            rate=30.0)
    spec = RunSpec(backend="openai", workload=workload, backend_args={"base_url": server}, telemetry=False,
                   progress=False, scrape_interval_s=0.1, duration_s=0.5)
    summary = run_once(spec, tmp_path / "run")
    report = load_report(tmp_path / "run")
    scraped = report.server_metrics
    assert scraped is not None and scraped["t_s"].nunique() >= 3  # several scrapes during the run
    assert {"llmbench_num_requests_running", "llmbench_kv_cache_usage_ratio"} <= set(scraped["family"])
    assert summary["server_scrapes"] >= 2 and summary["server_running_peak"] >= 1
    # the engine's own step counters over HTTP: steps of 1+ sequences taking some time
    assert summary["server_step_batch_mean"] >= 1 and summary["server_mean_step_ms"] > 0
    # --duration over HTTP: arrivals run to ~0.8 s at 30 req/s; those after 0.5 s are not sent
    statuses = report.requests["status"].value_counts().to_dict()
    assert statuses.get("not_sent", 0) >= 1 and statuses.get("ok", 0) >= 1
    assert summary["num_not_sent"] == statuses["not_sent"] and len(report.requests) == 24
    assert report.recompute_summary() == pytest.approx(summary)  # server_* figures included


def test_scraper_reads_vllm_names_as_ours():
    text = ("# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"m\"} 3.0\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.5\n"
            "# TYPE vllm:num_preemptions counter\nvllm:num_preemptions_total{model_name=\"m\"} 2.0\n")
    later = text.replace(" 3.0", " 5.0").replace(" 2.0", " 7.0")
    frame = pd.DataFrame(parse_metrics(text, 1.0) + parse_metrics(later, 2.0),
                         columns=["t_s", "family", "sample", "labels", "value"])
    s = server_summary(frame)
    assert (s["server_queue_mean"], s["server_queue_peak"], s["server_kv_usage_peak"]) == (4.0, 5.0, 0.5)
    assert s["server_preemptions"] == 5.0 and s["server_scrapes"] == 2


# ---- exports ---------------------------------------------------------------------------------
VLLM_KEYS = {"duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
             "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
             "mean_tpot_ms", "median_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms",
             "median_e2el_ms", "ttfts", "itls", "input_lens", "output_lens", "errors"}


def test_vllm_json_and_csv_round_trip(tmp_path):
    recs = [_ok(f"r{i}", 0.1 * i, 0.1 * i + 0.02 * (i + 1), 0.1 * i + 0.3, n=4) for i in range(5)]
    recs.append(RequestRecord("bad", 0.6, sent_s=0.6, finished_s=0.6, prompt_tokens=5, status="error", error="boom"))
    report = write_report(tmp_path / "run", recs, [], [], {"backend": "engine", "model": "tiny"})
    summary = report.summary_row()
    doc = json.loads((tmp_path / "run" / RESULT_JSON).read_text())
    assert VLLM_KEYS <= set(doc)
    assert doc["completed"] == summary["num_ok"] == 5 and doc["failed"] == 1
    assert doc["duration"] == pytest.approx(summary["duration_s"])
    assert doc["output_throughput"] == pytest.approx(summary["output_throughput"])
    assert doc["p99_ttft_ms"] == pytest.approx(summary["p99_ttft_ms"])
    assert doc["median_ttft_ms"] == pytest.approx(summary["p50_ttft_ms"])
    assert doc["ttfts"][:5] == pytest.approx([0.02 * (i + 1) for i in range(5)]) and doc["ttfts"][5] == 0.0
    assert doc["itls"][0] == pytest.approx([0.28 / 3] * 3) and doc["itls"][5] == []
    assert doc["input_lens"] == [8] * 5 + [5] and doc["output_lens"] == [4] * 5 + [0]
    assert doc["errors"] == [""] * 5 + ["boom"]
    assert doc["start_times"] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.6])
    csv_row = pd.read_csv(tmp_path / "run" / SUMMARY_CSV).iloc[0]
    assert csv_row["num_ok"] == 5 and csv_row["mean_ttft_ms"] == pytest.approx(summary["mean_ttft_ms"])
    append_sweep_summary(tmp_path, {"backend": "engine", **summary})
    append_sweep_summary(tmp_path, {"backend": "static", **summary})
    assert list(pd.read_csv(tmp_path / SWEEP_CSV)["backend"]) == ["engine", "static"]


# ---- ratios at equal load, narrow tables, load curves ---------------------------------------
def _run(backend: str, point: str | None, rate: float | None, throughput: float, tmp: Path) -> Run:
    labels = {} if point is None else {"workload": "random", "backend": backend, "point": point, "rate": rate}
    summary = {"num_requests": 10, "num_ok": 10, "output_throughput": throughput, "p50_ttft_ms": throughput / 10,
               "p99_ttft_ms": throughput / 5, "p50_tpot_ms": 5.0, "p99_tpot_ms": 9.0}
    report = Report(tmp / f"{backend}-{point}", requests_frame([]), steps_frame([]), telemetry_frame([]),
                    pd.DataFrame([summary]), {"config": {"labels": labels}})
    return Run(f"{backend}-{point}", report)


def test_sweep_ratios_divide_at_the_same_rate_point(tmp_path):
    runs = [_run("engine", "x0.3", 3.0, 100.0, tmp_path), _run("static", "x0.3", 3.0, 50.0, tmp_path),
            _run("engine", "x0.6", 6.0, 400.0, tmp_path), _run("static", "x0.6", 6.0, 100.0, tmp_path)]
    row = next(r for r in table_rows(runs) if r[0] == "output tok/s")
    # static at x0.6 is divided by engine at x0.6 (0.25x), never by the first column (1.00x)
    assert row[1:] == ["100.0", "50.0 (0.50x)", "400.0", "100.0 (0.25x)"]
    plain = [_run("a", None, None, 10.0, tmp_path), _run("b", None, None, 20.0, tmp_path)]
    assert next(r for r in table_rows(plain) if r[0] == "output tok/s")[1:] == ["10.0", "20.0 (2.00x)"]


def test_narrow_terminal_gets_readable_tables(tmp_path):
    runs = [_run(f"backend{i}", f"rate-{i}", float(i + 1), 1000.0 * (i + 1), tmp_path) for i in range(6)]
    console = Console(width=80, record=True)
    console.print(summary_table(runs, width=80))
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80
    assert all(r.label in text for r in runs)  # every header whole, none folded
    assert "(1/" in text


def test_sweep_html_has_a_load_curve(tmp_path):
    runs = [_run(b, f"r{k}", float(k), 100.0 * k, tmp_path) for k in (1, 2, 4) for b in ("engine", "static")]
    sweep = sweep_frame(runs)
    assert sorted(sweep["rate"].unique()) == [1.0, 2.0, 4.0]
    page = write_html(runs, tmp_path / "cmp.html").read_text()
    assert "Load curve: random" in page and "alt='load curve' src='data:image/png;base64," in page


# ---- machine-aware baselines -----------------------------------------------------------------
def test_device_slug():
    assert gate.device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert gate.device_slug("NVIDIA H200") == "h200"
    assert gate.device_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert gate.device_slug("NVIDIA GeForce RTX 4090") == "rtx4090"


def test_cross_device_absolute_baseline_is_refused_and_same_device_gates(tmp_path, capsys):
    recs = [_ok(f"r{i}", 0.1 * i, 0.1 * i + 0.02, 0.1 * i + 0.3) for i in range(5)]
    run = tmp_path / "run"
    write_report(run, recs, [], [], {"backend": "engine", "model": "tiny",
                                     "workload": {"kind": "smoke"}, "labels": {}})
    baseline = tmp_path / "same.json"
    assert main(["gate", "--write-baseline", str(baseline), "--current", str(run)]) == 0
    doc = json.loads(baseline.read_text())
    assert doc["device"]["name"] == gate.run_context(run)["device"].name and doc["model"] == "tiny"
    assert all("backend" in m for m in doc["metrics"])  # one report: absolute figures
    capsys.readouterr()
    assert main(["gate", "--baseline", str(baseline), "--current", str(run)]) == 0
    other = tmp_path / "h200.json"
    other.write_text(json.dumps({**doc, "device": {"name": "NVIDIA H200", "gpu_count": 1}}))
    assert main(["gate", "--baseline", str(other), "--current", str(run)]) == 1
    out = capsys.readouterr().out.replace("\n", " ")
    assert "baseline measured on NVIDIA H200" in out and "do not carry across devices" in out
    assert "REFUSED" in out


def test_gpu_gate_baseline_is_picked_by_device_name(tmp_path):
    (tmp_path / "h100_qwen3.json").write_text("{}")
    assert gate.device_baseline("NVIDIA H100 80GB HBM3", "qwen3", tmp_path) == tmp_path / "h100_qwen3.json"
    with pytest.raises(ValueError, match=r"no baseline for this device \(NVIDIA H200\).*h200_qwen3.json.*h100"):
        gate.device_baseline("NVIDIA H200", "qwen3", tmp_path)
    # the committed H100 baseline (no "device" field) reads its device from "hardware"
    committed = Path(__file__).resolve().parents[2] / "reports" / "baselines" / "h100_qwen3.json"
    assert gate.baseline_device(committed).name == "NVIDIA H100 80GB HBM3"
