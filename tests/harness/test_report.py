"""Run reports: Parquet round trip, schema metadata, recomputable summary, sweep summary.

Run: .venv/bin/python -m pytest tests/test_report.py -q
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from harness.metrics import METRIC_DEFINITIONS, Slos, slos_from_summary, summarize
from harness.records import RequestRecord, StepRecord, TelemetrySample
from harness.report import (
    FILES,
    METADATA_KEY,
    append_sweep_summary,
    load_report,
    requests_frame,
    write_report,
)

CONFIG = {"backend": "continuous", "model": "tiny", "rate": float("inf"), "trace": "smoke.jsonl"}


def _records():
    requests = [
        RequestRecord(f"r{i}", 0.1 * i, sent_s=0.1 * i, first_token_s=0.1 * i + 0.05, finished_s=0.1 * i + 0.3,
                      token_times_s=[0.1 * i + 0.05 + 0.05 * k for k in range(6)], prompt_tokens=10 + i,
                      output_tokens=6, cached_tokens=i, status="ok", finish_reason="length",
                      prefix_group=None if i % 2 else "g0")
        for i in range(5)
    ] + [RequestRecord("bad", 0.2, sent_s=0.2, finished_s=0.2, status="error", error="prompt too long")]
    steps = [StepRecord(k, 0.05 * k, 0.05 * (k + 1), num_running=5, num_waiting=0, num_scheduled_seqs=5,
                        num_prefill_tokens=0, num_decode_tokens=5, num_preempted=0, kv_blocks_used=4 + k,
                        kv_blocks_total=64, kv_slots_allocated=64 + 16 * k, kv_tokens_stored=50 + 10 * k,
                        kv_waste_internal_slots=8, kv_waste_reserved_slots=6, prefix_query_tokens=100 * k,
                        prefix_hit_tokens=30 * k) for k in range(8)]
    telemetry = [TelemetrySample(0.1 * k, 0, 80.0, 40.0, 1e9 + k, 250.0, 1980.0, 5000.0 + 30 * k) for k in range(9)]
    return requests, steps, telemetry


def _write(tmp_path, **kw):
    requests, steps, telemetry = _records()
    return write_report(tmp_path / "run", requests, steps, telemetry, CONFIG,
                        slos=Slos(ttft_ms=400, tpot_ms=60), **kw)


def test_summary_recomputes_from_parquet_files(tmp_path):
    report = _write(tmp_path, roofline_bytes=1e9, bandwidth_bytes_per_s=2e9)
    in_memory = summarize(requests_frame(_records()[0]), report.steps, report.telemetry,
                          slos=Slos(ttft_ms=400, tpot_ms=60), roofline_bytes=1e9, bandwidth_bytes_per_s=2e9)
    # Straight from the files, not through load_report.
    run = tmp_path / "run"
    stored = load_report(run).summary_row()
    files = {name: pq.read_table(run / f).to_pandas() for name, f in FILES.items()}
    recomputed = summarize(files["requests"], files["steps"], files["telemetry"], slos=slos_from_summary(stored),
                           roofline_bytes=stored["roofline_bytes"],
                           bandwidth_bytes_per_s=stored["roofline_bandwidth_bytes_per_s"])
    assert recomputed == in_memory == stored == report.summary_row()
    assert load_report(run).recompute_summary() == stored
    assert stored["goodput"] is not None and stored["gpu_energy_j"] == pytest.approx(240)


def test_round_trip_preserves_rows(tmp_path):
    _write(tmp_path)
    report = load_report(tmp_path / "run")
    requests, steps, telemetry = _records()
    assert list(report.requests["request_id"]) == [r.request_id for r in requests]
    assert [list(t) for t in report.requests["token_times_s"]] == [r.token_times_s for r in requests]
    assert report.requests["prefix_group"].isna().tolist() == [r.prefix_group is None for r in requests]
    assert len(report.steps) == 8 and len(report.telemetry) == 9
    assert report.summary_row()["num_ok"] == 5 and isinstance(report.summary_row()["num_ok"], int)


def test_schema_metadata_in_every_file(tmp_path):
    _write(tmp_path)
    for f in FILES.values():
        meta = json.loads(pq.read_schema(tmp_path / "run" / f).metadata[METADATA_KEY])
        assert meta["definitions"] == METRIC_DEFINITIONS
        assert meta["config"]["backend"] == "continuous" and meta["config"]["rate"] == float("inf")
        assert "git_sha" in meta and "git_dirty" in meta
        assert meta["versions"]["python"] and meta["versions"]["pyarrow"]
        assert {"torch", "transformers", "triton", "llmbench"} <= set(meta["versions"])
        assert meta["hardware"]["cpu"] and "gpus" in meta["hardware"]
    assert load_report(tmp_path / "run").metadata["config"]["model"] == "tiny"


def test_empty_steps_and_telemetry_keep_columns(tmp_path):
    requests, _, _ = _records()
    write_report(tmp_path / "run", requests, [], [], CONFIG)
    report = load_report(tmp_path / "run")
    assert len(report.steps) == 0 and "kv_slots_allocated" in report.steps.columns
    assert len(report.telemetry) == 0 and list(report.telemetry.columns)[:2] == ["t_s", "gpu_index"]
    row = report.summary_row()
    assert row["kv_waste_mean"] is None and row["gpu_energy_j"] is None and row["num_steps"] == 0
    assert report.recompute_summary() == row


def test_dataframe_input_equals_records_input(tmp_path):
    requests, steps, telemetry = _records()
    a = write_report(tmp_path / "a", requests, steps, telemetry, CONFIG)
    b = write_report(tmp_path / "b", a.requests, a.steps, a.telemetry, CONFIG)
    assert a.summary_row() == b.summary_row()


def test_refuses_to_overwrite(tmp_path):
    _write(tmp_path)
    with pytest.raises(FileExistsError, match="already holds a report"):
        _write(tmp_path)
    _write(tmp_path, overwrite=True)


def test_load_incomplete_report(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="missing requests.parquet"):
        load_report(tmp_path / "run")


def test_sweep_summary_appends(tmp_path):
    row = _write(tmp_path).summary_row()
    append_sweep_summary(tmp_path / "sweep", {"backend": "static", "rate": 1.0, **row})
    sweep = append_sweep_summary(tmp_path / "sweep", {"backend": "continuous", "rate": 2.0, "note": "x", **row})
    assert list(sweep["backend"]) == ["static", "continuous"]
    assert sweep["note"].isna().tolist() == [True, False]
    stored = pq.read_table(tmp_path / "sweep" / "sweep.parquet")
    assert stored.num_rows == 2 and str(stored.schema.field("num_ok").type) == "int64"
    assert str(stored.schema.field("mean_ttft_ms").type) == "double"
    assert METADATA_KEY in stored.schema.metadata
