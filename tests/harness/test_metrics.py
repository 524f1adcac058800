"""Metrics on hand-built rows; every expectation below is worked out by hand in the comments.

Run: .venv/bin/python -m pytest tests/test_metrics.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness.metrics import (
    Slos,
    goodput,
    inter_token_latencies,
    kv_stats,
    roofline_efficiency,
    summarize,
    telemetry_stats,
)
from harness.records import RequestRecord, StepRecord, TelemetrySample
from harness.report import requests_frame, steps_frame, telemetry_frame

GIB = 1 << 30


def _requests():
    return requests_frame([
        # ttft 100 ms, e2el 500 ms, tpot (0.5-0.1)/3 = 133.3 ms, gaps 100/100/200 ms
        RequestRecord("r1", 0.0, sent_s=0.0, first_token_s=0.1, finished_s=0.5,
                      token_times_s=[0.1, 0.2, 0.3, 0.5], prompt_tokens=10, output_tokens=4, status="ok"),
        # ttft 1000 ms (sent-based 500 ms), one token: no tpot, no gaps
        RequestRecord("r2", 1.0, sent_s=1.5, first_token_s=2.0, finished_s=2.0, token_times_s=[2.0],
                      prompt_tokens=20, output_tokens=1, cached_tokens=16, status="ok"),
        # ttft 300 ms, e2el 1100 ms, tpot (1.6-0.8)/2 = 400 ms, gaps 400/400 ms
        RequestRecord("r3", 0.5, sent_s=0.5, first_token_s=0.8, finished_s=1.6, token_times_s=[0.8, 1.2, 1.6],
                      prompt_tokens=30, output_tokens=3, status="ok"),
        # error: counted, excluded from latency and throughput numerators
        RequestRecord("r4", 0.2, sent_s=0.2, finished_s=0.3, prompt_tokens=99, status="error", error="boom"),
    ])


def test_latency_percentiles_by_hand():
    s = summarize(_requests())
    # ttft [100, 1000, 300]: sorted [100, 300, 1000]; p90 at rank 1.8 -> 300 + 0.8*700 = 860
    assert s["mean_ttft_ms"] == pytest.approx(1400 / 3)
    assert s["p50_ttft_ms"] == pytest.approx(300)
    assert s["p90_ttft_ms"] == pytest.approx(860)
    assert s["p95_ttft_ms"] == pytest.approx(930)
    assert s["p99_ttft_ms"] == pytest.approx(986)
    assert s["std_ttft_ms"] == pytest.approx(math.sqrt((366.667**2 + 533.333**2 + 166.667**2) / 3), rel=1e-5)
    assert s["mean_ttft_sent_ms"] == pytest.approx(300)  # [100, 500, 300]
    assert s["mean_tpot_ms"] == pytest.approx((400 / 3 + 400) / 2)  # r2 has one token: excluded
    assert s["mean_e2el_ms"] == pytest.approx(2600 / 3) and s["p50_e2el_ms"] == pytest.approx(1000)
    # itl pooled [100, 100, 200, 400, 400]
    assert s["mean_itl_ms"] == pytest.approx(240) and s["p50_itl_ms"] == pytest.approx(200)
    np.testing.assert_allclose(np.sort(inter_token_latencies(_requests())), [0.1, 0.1, 0.2, 0.4, 0.4])


def test_counts_and_throughput_by_hand():
    s = summarize(_requests())
    assert (s["num_requests"], s["num_ok"], s["num_error"], s["num_aborted"]) == (4, 3, 1, 0)
    assert (s["total_input_tokens"], s["total_output_tokens"], s["total_cached_tokens"]) == (60, 8, 16)
    # wall: first scheduled 0.0 -> last finished 2.0
    assert s["duration_s"] == pytest.approx(2.0)
    assert s["request_throughput"] == pytest.approx(1.5)  # 3 ok / 2 s
    assert s["output_throughput"] == pytest.approx(4.0)  # 8 tokens / 2 s
    assert s["total_token_throughput"] == pytest.approx(34.0)  # (60 + 8) / 2 s


@pytest.mark.parametrize("slos, expected", [
    (Slos(ttft_ms=500), 1.0),  # r1, r3 meet it -> 2 / 2 s
    (Slos(tpot_ms=200), 1.0),  # r1 (133 ms) and r2 (single token passes) -> 2 / 2 s
    (Slos(ttft_ms=500, tpot_ms=200), 0.5),  # only r1
    (Slos(e2el_ms=1000), 1.0),  # r1 (500), r2 (exactly 1000)
    (Slos(), None),  # nothing to check: no goodput
])
def test_goodput_by_hand(slos, expected):
    got = goodput(_requests(), slos)
    assert got == (None if expected is None else pytest.approx(expected))


def test_slo_validation():
    with pytest.raises(ValueError, match="ttft_ms must be a finite number > 0 or None, got -1"):
        Slos(ttft_ms=-1)


def _steps():
    kw = dict(num_running=1, num_waiting=0, num_scheduled_seqs=2, num_prefill_tokens=0, num_decode_tokens=2,
              num_preempted=0, kv_blocks_total=10)
    return steps_frame([
        # idle step listed first: the hit rate must come from the highest step number, not row order
        StepRecord(2, 4.0, 4.5, kv_blocks_used=0, kv_slots_allocated=0, kv_tokens_stored=0,
                   kv_waste_internal_slots=0, kv_waste_reserved_slots=0, prefix_query_tokens=200,
                   prefix_hit_tokens=50, **kw),
        # waste 1 - 50/100 = 0.5 (internal 0.1, reserved 0.4), util 0.5, 1 s
        StepRecord(0, 0.0, 1.0, kv_blocks_used=5, kv_slots_allocated=100, kv_tokens_stored=50,
                   kv_waste_internal_slots=10, kv_waste_reserved_slots=40, prefix_query_tokens=0,
                   prefix_hit_tokens=0, **kw),
        # waste 1 - 180/200 = 0.1 (internal 0.1, reserved 0), util 0.8, 3 s
        StepRecord(1, 1.0, 4.0, kv_blocks_used=8, kv_slots_allocated=200, kv_tokens_stored=180,
                   kv_waste_internal_slots=20, kv_waste_reserved_slots=0, prefix_query_tokens=100,
                   prefix_hit_tokens=25, **{**kw, "num_preempted": 2}),
    ])


def test_kv_stats_by_hand():
    kv = kv_stats(_steps())
    assert kv["kv_waste_mean"] == pytest.approx((0.5 * 1 + 0.1 * 3) / 4)  # idle step has no waste
    assert kv["kv_waste_peak"] == pytest.approx(0.5)
    assert kv["kv_waste_internal_mean"] == pytest.approx(0.1)
    assert kv["kv_waste_reserved_mean"] == pytest.approx(0.4 / 4)
    assert kv["kv_waste_reserved_peak"] == pytest.approx(0.4)
    assert kv["kv_util_mean"] == pytest.approx((0.5 * 1 + 0.8 * 3 + 0 * 0.5) / 4.5)
    assert kv["kv_util_peak"] == pytest.approx(0.8)
    assert kv["prefix_cache_hit_rate"] == pytest.approx(0.25)  # 50 / 200 from step 2
    assert (kv["num_steps"], kv["num_preemptions"]) == (3, 2)
    assert kv["mean_step_ms"] == pytest.approx(1500)


def test_kv_stats_without_steps_are_none():
    kv = kv_stats(steps_frame([]))
    assert kv["kv_waste_mean"] is None and kv["prefix_cache_hit_rate"] is None and kv["num_steps"] == 0


def _telemetry():
    rows = []
    for gpu, (util, energy0, denergy) in enumerate([(50.0, 1000.0, 200.0), (30.0, 500.0, 60.0)]):
        rows += [TelemetrySample(0.0, gpu, util, 10.0, 2 * GIB, 100.0, 1500.0, energy0),
                 TelemetrySample(1.0, gpu, util + 40, 30.0, 4 * GIB, 300.0, 1700.0, energy0 + denergy)]
    return telemetry_frame(rows[::-1])  # unsorted: the energy delta must order by time


def test_telemetry_stats_by_hand():
    t = telemetry_stats(_telemetry(), output_tokens=8)
    assert t["gpu_util_mean_pct"] == pytest.approx((50 + 90 + 30 + 70) / 4)
    assert t["gpu_mem_util_mean_pct"] == pytest.approx(20)
    assert t["gpu_mem_used_mean_gib"] == pytest.approx(3) and t["gpu_mem_used_peak_gib"] == pytest.approx(4)
    assert t["gpu_power_mean_w"] == pytest.approx(200) and t["gpu_sm_clock_mean_mhz"] == pytest.approx(1600)
    assert t["gpu_energy_j"] == pytest.approx(260)  # 200 J + 60 J
    assert t["joules_per_output_token"] == pytest.approx(32.5)
    assert t["telemetry_samples"] == 4


def test_telemetry_null_or_absent_gives_none():
    null = telemetry_frame([TelemetrySample(0.0), TelemetrySample(0.1)])
    for frame in (null, telemetry_frame([]), None):
        t = telemetry_stats(frame, output_tokens=8)
        assert all(v is None for k, v in t.items() if k != "telemetry_samples")


def test_roofline():
    assert roofline_efficiency(3e9, 3e12, 0.002) == pytest.approx(0.5)  # 1 ms floor / 2 ms
    with pytest.raises(ValueError, match="measured_s must be a finite number > 0, got 0"):
        roofline_efficiency(1, 1, 0)
    s = summarize(_requests(), roofline_bytes=3e12, bandwidth_bytes_per_s=3e12)
    assert s["roofline_floor_s"] == pytest.approx(1.0)
    assert s["roofline_efficiency"] == pytest.approx(0.5)  # 1 s floor over the 2 s run


def test_summary_with_no_successful_requests():
    reqs = requests_frame([RequestRecord("x", 0.0, sent_s=0.0, finished_s=1.0, status="error", error="e")])
    s = summarize(reqs, slos=Slos(ttft_ms=1))
    assert s["num_ok"] == 0 and s["request_throughput"] == 0.0 and s["goodput"] == 0.0
    assert s["mean_ttft_ms"] is None and s["p99_itl_ms"] is None and s["mean_tpot_ms"] is None
    assert summarize(requests_frame([]))["duration_s"] is None
