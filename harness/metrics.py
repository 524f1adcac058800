"""Metrics as pure functions of the raw rows (harness/records.py), never of live engine state.

Inputs are pandas DataFrames whose columns are the dataclass fields: ``requests`` (RequestRecord
rows), ``steps`` (StepRecord rows), ``telemetry`` (TelemetrySample rows); build them from records
with ``harness.report.requests_frame / steps_frame / telemetry_frame`` (the same conversion the
Parquet round trip does, so a summary recomputed from the files is identical).

    summarize(requests, steps=None, telemetry=None, *, slos=Slos(...), roofline_bytes=None,
              bandwidth_bytes_per_s=None, percentiles=PERCENTILES) -> dict   the one summary row
    steady_requests(requests) -> DataFrame       the rows in the steady-state window
    request_latencies(requests) -> DataFrame     per-request ttft_s, ttft_sent_s, tpot_s, e2el_s
    inter_token_latencies(requests) -> ndarray   pooled gaps, seconds
    throughput(requests), goodput(requests, slos), kv_stats(steps), telemetry_stats(telemetry, n)
    conversation_stats(requests), per_turn_stats(requests)     multi-turn chat workloads
    roofline_efficiency(bytes_moved, bandwidth_bytes_per_s, measured_s)

Undefined figures (no successful requests, no steps, no NVML) are None, never 0 or NaN.
METRIC_DEFINITIONS holds the formulas in words; the report writes it into the Parquet metadata.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

PERCENTILES: tuple[float, ...] = (50, 90, 95, 99)  # the default; --percentiles changes it per run
LATENCY_METRICS = ("ttft", "ttft_sent", "tpot", "itl", "e2el")
_GIB = float(1 << 30)

METRIC_DEFINITIONS: dict[str, str] = {
    "clock": "all *_s times are seconds on one perf_counter clock relative to the run start",
    "ok": "latency and throughput figures use requests with status == 'ok' only",
    "window": "only rows with window == 'steady' enter the summary; warm-up and cool-down rows "
              "(--warmup/--cooldown, harness/window.py) stay in requests.parquet, counted in "
              "num_warmup/num_cooldown; when some were left out, step and telemetry figures use "
              "the steps overlapping and the samples inside [first steady scheduled_s, last steady "
              "finished_s], and the prefix hit rate counts from the last step before it",
    "not_sent": "requests still unsent at the --duration deadline: status 'not_sent', counted in "
                "num_not_sent, in no latency or throughput figure",
    "ttft": "first_token_s - scheduled_s (scheduled = trace arrival time)",
    "ttft_sent": "first_token_s - sent_s (excludes time queued in the client before sending)",
    "tpot": "(e2el - ttft) / (output_tokens - 1), only for requests with output_tokens > 1",
    "itl": "every gap between consecutive token_times_s of a request, pooled over requests",
    "e2el": "finished_s - scheduled_s",
    "latency_stats": "mean, std (population, ddof=0) and the percentiles of the 'percentiles' "
                     "column (default 50,90,95,99; numpy linear interpolation) of ttft, "
                     "ttft_sent, tpot, itl, e2el, in milliseconds",
    "duration_s": "max(finished_s) - min(scheduled_s) over the steady requests (run wall time "
                  "without warm-up/cool-down)",
    "request_throughput": "num_ok / duration_s",
    "output_throughput": "sum(output_tokens of ok requests) / duration_s",
    "total_token_throughput": "sum(prompt_tokens + output_tokens of ok requests) / duration_s",
    "goodput": "ok requests with ttft <= slo_ttft_ms, tpot <= slo_tpot_ms and e2el <= slo_e2el_ms, "
               "per second of duration_s; a None SLO is not checked; a request with one output "
               "token passes the tpot SLO; goodput is None when no SLO is given",
    "kv_waste": "per step 1 - kv_tokens_stored / kv_slots_allocated (steps with allocated > 0); "
                "internal = kv_waste_internal_slots / allocated (unfilled tail of last blocks), "
                "reserved = kv_waste_reserved_slots / allocated (slots held for future tokens); "
                "mean weighted by step duration (end_s - start_s), and peak",
    "kv_util": "per step kv_blocks_used / kv_blocks_total; duration-weighted mean and peak",
    "prefix_cache_hit_rate": "prefix_hit_tokens / prefix_query_tokens of the last step "
                             "(cumulative counters)",
    "gpu": "NVML samples: mean gpu/memory utilization, mean/peak memory used (GiB, per GPU), "
           "mean power (W, per GPU), mean SM clock; None when NVML was unavailable",
    "gpu_energy_j": "sum over GPUs of last - first total-energy counter reading",
    "joules_per_output_token": "gpu_energy_j / sum(output_tokens of ok requests)",
    "conversations": "rows with a conversation_id are turns of multi-turn chats: num_conversations "
                     "(distinct ids), mean_turns_per_conversation (turn rows / conversations), "
                     "ttft_p50_ms_first_turn / _later_turns and ttft_p50_ms_turn_<k> (k < 8; ok "
                     "rows; a later turn's scheduled_s is when the previous answer finished), "
                     "mean_cached_tokens_later_turns (ok rows with turn >= 1); None without turns",
    "roofline_efficiency": "(roofline_bytes / roofline_bandwidth_bytes_per_s) / duration_s: "
                           "the bytes-must-move floor over measured time (bytes from the caller)",
}


@dataclass(frozen=True)
class Slos:
    """Service-level objectives in milliseconds; None means not checked."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms", "e2el_ms"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"SLO {name} must be a finite number > 0 or None, got {value}")

    def any(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))


def _none_if_nan(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def steady_requests(requests: pd.DataFrame) -> pd.DataFrame:
    """The rows in the steady-state window (all rows of a report written before windows)."""
    if "window" not in requests.columns:
        return requests
    return requests[requests["window"].fillna("steady") == "steady"]


def steady_window(requests: pd.DataFrame) -> tuple[float, float] | None:
    """(first steady scheduled_s, last steady finished_s) when warm-up or cool-down rows were
    left out; None when every row is steady (the whole run counts)."""
    if "window" not in requests.columns or (requests["window"].fillna("steady") == "steady").all():
        return None
    steady = steady_requests(requests)
    if steady.empty or steady["finished_s"].isna().all():
        return None
    return float(steady["scheduled_s"].min()), float(steady["finished_s"].max())


def _steps_in_window(steps: pd.DataFrame | None, window: tuple[float, float]
                     ) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """(steps overlapping the window, steps that ended before it)."""
    if steps is None or steps.empty:
        return steps, None
    lo, hi = window
    return steps[(steps["end_s"] > lo) & (steps["start_s"] < hi)], steps[steps["end_s"] <= lo]


def _prefix_hit_rate_since(steps: pd.DataFrame, before: pd.DataFrame) -> float | None:
    """Prefix hits / queries between the last step before the window and the last in it (the
    counters are cumulative over the run)."""
    last, base = steps.loc[steps["step"].idxmax()], before.loc[before["step"].idxmax()]
    queries = last["prefix_query_tokens"] - base["prefix_query_tokens"]
    return float((last["prefix_hit_tokens"] - base["prefix_hit_tokens"]) / queries) if queries > 0 else None


def ok_requests(requests: pd.DataFrame) -> pd.DataFrame:
    return requests[requests["status"] == "ok"]


def request_latencies(requests: pd.DataFrame) -> pd.DataFrame:
    """Per ok request: ttft_s, ttft_sent_s, tpot_s (NaN when output_tokens <= 1), e2el_s."""
    ok = ok_requests(requests)
    ttft = ok["first_token_s"] - ok["scheduled_s"]
    e2el = ok["finished_s"] - ok["scheduled_s"]
    n = ok["output_tokens"].astype(float)
    tpot = ((e2el - ttft) / (n - 1)).where(n > 1)
    return pd.DataFrame({"request_id": ok["request_id"], "ttft_s": ttft,
                         "ttft_sent_s": ok["first_token_s"] - ok["sent_s"], "tpot_s": tpot,
                         "e2el_s": e2el, "output_tokens": ok["output_tokens"]})


def inter_token_latencies(requests: pd.DataFrame) -> np.ndarray:
    """Every gap between consecutive token times of each ok request, pooled (seconds)."""
    gaps = [np.diff(np.asarray(t, dtype=float)) for t in ok_requests(requests)["token_times_s"]
            if t is not None and len(t) > 1]
    return np.concatenate(gaps) if gaps else np.empty(0)


def check_percentiles(percentiles: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(p) for p in percentiles)
    if not out or any(not 0 <= p <= 100 for p in out) or len(set(out)) != len(out):
        raise ValueError(f"percentiles must be distinct numbers in [0, 100], got {list(percentiles)}")
    return out


def percentile_key(p: float, name: str) -> str:
    """p99_ttft_ms, p99.9_ttft_ms: vLLM's spelling."""
    return f"p{p:g}_{name}_ms"


def format_percentiles(percentiles: Sequence[float]) -> str:
    return ",".join(f"{p:g}" for p in percentiles)


def latency_stats(name: str, values_s: np.ndarray | pd.Series,
                  percentiles: Sequence[float] = PERCENTILES) -> dict[str, float | None]:
    """mean/std/percentiles of one latency, in ms, keyed like vLLM (mean_ttft_ms, p99_ttft_ms)."""
    ms = np.asarray(values_s, dtype=float) * 1000.0
    ms = ms[np.isfinite(ms)]
    out: dict[str, float | None] = {f"mean_{name}_ms": None, f"std_{name}_ms": None}
    out.update({percentile_key(p, name): None for p in percentiles})
    if ms.size:
        out[f"mean_{name}_ms"], out[f"std_{name}_ms"] = float(ms.mean()), float(ms.std())
        for p, v in zip(percentiles, np.percentile(ms, list(percentiles)), strict=True):
            out[percentile_key(p, name)] = float(v)
    return out


def run_duration_s(requests: pd.DataFrame) -> float | None:
    """Wall time: first scheduled -> last finished, over all requests (errors took time too)."""
    if requests.empty or requests["finished_s"].isna().all():
        return None
    duration = float(requests["finished_s"].max() - requests["scheduled_s"].min())
    return duration if duration > 0 else None


def throughput(requests: pd.DataFrame) -> dict[str, float | None]:
    ok = ok_requests(requests)
    duration = run_duration_s(requests)
    out_tokens = int(ok["output_tokens"].sum())
    all_tokens = out_tokens + int(ok["prompt_tokens"].sum())
    per_s = (lambda x: x / duration) if duration else (lambda x: None)
    return {"duration_s": duration, "request_throughput": per_s(len(ok)),
            "output_throughput": per_s(out_tokens), "total_token_throughput": per_s(all_tokens)}


def goodput(requests: pd.DataFrame, slos: Slos) -> float | None:
    """Requests/s of ok requests meeting every given SLO; None when no SLO is given."""
    duration = run_duration_s(requests)
    if not slos.any() or not duration:
        return None
    lat = request_latencies(requests)
    good = pd.Series(True, index=lat.index)
    if slos.ttft_ms is not None:
        good &= lat["ttft_s"] * 1000 <= slos.ttft_ms
    if slos.tpot_ms is not None:  # no inter-token time to violate with a single token
        good &= lat["tpot_s"].isna() | (lat["tpot_s"] * 1000 <= slos.tpot_ms)
    if slos.e2el_ms is not None:
        good &= lat["e2el_s"] * 1000 <= slos.e2el_ms
    return int(good.sum()) / duration


def _weighted_mean_and_peak(values: pd.Series, weights: pd.Series) -> tuple[float | None, float | None]:
    if values.empty:
        return None, None
    w = weights.clip(lower=0).to_numpy(dtype=float)
    v = values.to_numpy(dtype=float)
    # All-zero durations (e.g. a fake clock) would divide by zero: fall back to a plain mean.
    mean = float(np.average(v, weights=w)) if w.sum() > 0 else float(v.mean())
    return mean, float(v.max())


def kv_stats(steps: pd.DataFrame | None) -> dict[str, float | int | None]:
    """KV-cache waste, utilization and prefix-cache hit rate from StepRecord rows."""
    keys = ["kv_waste", "kv_waste_internal", "kv_waste_reserved", "kv_util"]
    out: dict[str, float | int | None] = {f"{k}_{s}": None for k in keys for s in ("mean", "peak")}
    out.update(prefix_cache_hit_rate=None, num_steps=0, num_preemptions=0, mean_step_ms=None,
               mean_batch_size=None)
    if steps is None or steps.empty:
        return out
    duration = steps["end_s"] - steps["start_s"]
    alloc = steps[steps["kv_slots_allocated"] > 0]
    slots = alloc["kv_slots_allocated"].astype(float)
    fractions = {"kv_waste": 1 - alloc["kv_tokens_stored"] / slots,
                 "kv_waste_internal": alloc["kv_waste_internal_slots"] / slots,
                 "kv_waste_reserved": alloc["kv_waste_reserved_slots"] / slots}
    for key, frac in fractions.items():
        out[f"{key}_mean"], out[f"{key}_peak"] = _weighted_mean_and_peak(frac, duration[alloc.index])
    sized = steps[steps["kv_blocks_total"] > 0]
    util = sized["kv_blocks_used"] / sized["kv_blocks_total"].astype(float)
    out["kv_util_mean"], out["kv_util_peak"] = _weighted_mean_and_peak(util, duration[sized.index])
    last = steps.loc[steps["step"].idxmax()]
    if last["prefix_query_tokens"] > 0:
        out["prefix_cache_hit_rate"] = float(last["prefix_hit_tokens"] / last["prefix_query_tokens"])
    out.update(num_steps=len(steps), num_preemptions=int(steps["num_preempted"].sum()),
               mean_step_ms=float(duration.mean() * 1000),
               mean_batch_size=float(steps["num_scheduled_seqs"].mean()))
    return out


def _mean(col: pd.Series, scale: float = 1.0) -> float | None:
    col = col.dropna()
    return float(col.mean() / scale) if len(col) else None


def _energy_j(telemetry: pd.DataFrame) -> float | None:
    total, seen = 0.0, False
    for _, gpu in telemetry.dropna(subset=["energy_j"]).sort_values("t_s").groupby("gpu_index"):
        if len(gpu) >= 2:  # a delta needs two readings
            total += float(gpu["energy_j"].iloc[-1] - gpu["energy_j"].iloc[0])
            seen = True
    return total if seen else None


def telemetry_stats(telemetry: pd.DataFrame | None, output_tokens: int) -> dict[str, float | int | None]:
    """GPU summaries from TelemetrySample rows; every figure is None without NVML samples."""
    keys = ("gpu_util_mean_pct", "gpu_mem_util_mean_pct", "gpu_mem_used_mean_gib",
            "gpu_mem_used_peak_gib", "gpu_power_mean_w", "gpu_sm_clock_mean_mhz", "gpu_energy_j",
            "joules_per_output_token")
    out: dict[str, float | int | None] = dict.fromkeys(keys)
    out["telemetry_samples"] = 0 if telemetry is None else len(telemetry)
    if telemetry is None or telemetry.empty:
        return out
    mem = telemetry["mem_used_bytes"].dropna()
    out.update(gpu_util_mean_pct=_mean(telemetry["gpu_util_pct"]),
               gpu_mem_util_mean_pct=_mean(telemetry["mem_util_pct"]),
               gpu_mem_used_mean_gib=_mean(mem, _GIB),
               gpu_mem_used_peak_gib=float(mem.max() / _GIB) if len(mem) else None,
               gpu_power_mean_w=_mean(telemetry["power_w"]),
               gpu_sm_clock_mean_mhz=_mean(telemetry["sm_clock_mhz"]),
               gpu_energy_j=_energy_j(telemetry))
    if out["gpu_energy_j"] is not None and output_tokens > 0:
        out["joules_per_output_token"] = out["gpu_energy_j"] / output_tokens
    return out


def roofline_efficiency(bytes_moved: float, bandwidth_bytes_per_s: float, measured_s: float) -> float:
    """Floor time (bytes that must move / bandwidth) over the measured time; 1.0 = at the roofline."""
    for name, value in (("bytes_moved", bytes_moved), ("bandwidth_bytes_per_s", bandwidth_bytes_per_s),
                        ("measured_s", measured_s)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return (bytes_moved / bandwidth_bytes_per_s) / measured_s


def _roofline(duration: float | None, bytes_moved: float | None, bandwidth: float | None) -> dict:
    out = {"roofline_bytes": _none_if_nan(bytes_moved), "roofline_bandwidth_bytes_per_s": _none_if_nan(bandwidth),
           "roofline_floor_s": None, "roofline_efficiency": None}
    if bytes_moved is not None and bandwidth is not None:
        out["roofline_floor_s"] = float(bytes_moved) / float(bandwidth)
        if duration:
            out["roofline_efficiency"] = roofline_efficiency(bytes_moved, bandwidth, duration)
    return out


def summarize(requests: pd.DataFrame, steps: pd.DataFrame | None = None,
              telemetry: pd.DataFrame | None = None, *, slos: Slos | None = None,
              roofline_bytes: float | None = None, bandwidth_bytes_per_s: float | None = None,
              percentiles: Sequence[float] = PERCENTILES) -> dict[str, float | int | None]:
    """The one-row run summary of the steady-state rows. The SLOs, percentiles and roofline
    inputs are stored in it, so the whole row can be recomputed from requests/steps/telemetry
    Parquet plus the row itself."""
    slos = slos or Slos()
    percentiles = check_percentiles(percentiles)
    window = requests["window"].fillna("steady") if "window" in requests.columns else None
    excluded = {f"num_{w}": 0 if window is None else int((window == w).sum()) for w in ("warmup", "cooldown")}
    all_requests, requests = requests, steady_requests(requests)
    ok = ok_requests(requests)
    out_tokens = int(ok["output_tokens"].sum())
    status = requests["status"]
    row: dict[str, float | int | None] = {
        "num_requests": len(requests), "num_ok": len(ok), "num_error": int((status == "error").sum()),
        "num_aborted": int((status == "aborted").sum()), "num_not_sent": int((status == "not_sent").sum()),
        **excluded, "total_input_tokens": int(ok["prompt_tokens"].sum()),
        "total_output_tokens": out_tokens, "total_cached_tokens": int(ok["cached_tokens"].sum()),
    }
    row.update(throughput(requests))
    row.update(percentiles=format_percentiles(percentiles))
    row.update(goodput=goodput(requests, slos), slo_ttft_ms=_none_if_nan(slos.ttft_ms),
               slo_tpot_ms=_none_if_nan(slos.tpot_ms), slo_e2el_ms=_none_if_nan(slos.e2el_ms))
    lat = request_latencies(requests)
    for name in LATENCY_METRICS:
        values = inter_token_latencies(requests) if name == "itl" else lat[f"{name}_s"]
        row.update(latency_stats(name, values, percentiles))
    window, before = steady_window(all_requests), None
    if window is not None:  # engine-side figures over the same span as the request figures
        steps, before = _steps_in_window(steps, window)
        telemetry = None if telemetry is None else telemetry[telemetry["t_s"].between(*window)]
    row.update(kv_stats(steps))
    if before is not None and not before.empty and steps is not None and not steps.empty:
        row["prefix_cache_hit_rate"] = _prefix_hit_rate_since(steps, before)
    row.update(telemetry_stats(telemetry, out_tokens))
    row.update(_roofline(row["duration_s"], roofline_bytes, bandwidth_bytes_per_s))
    row.update(conversation_stats(requests))
    # One rule for undefined figures everywhere (e.g. NaN from rows with missing timestamps).
    return {k: _none_if_nan(v) if isinstance(v, float) else v for k, v in row.items()}


MAX_TURN_COLUMNS = 8  # ttft_p50_ms_turn_<k> for k below this (a sweep's columns stay few)


def _turn_rows(requests: pd.DataFrame) -> pd.DataFrame:
    if "conversation_id" not in requests.columns:  # a report written before conversations
        return requests.iloc[0:0].assign(conversation_id=None, turn=None)
    return requests[requests["conversation_id"].notna()]


def per_turn_stats(requests: pd.DataFrame) -> pd.DataFrame:
    """Per turn index of multi-turn chats: rows, ok rows, p50 TTFT (ms), mean prompt and cached
    tokens of the ok rows."""
    turns = _turn_rows(requests)
    ok = ok_requests(turns)
    ttft_ms = (ok["first_token_s"] - ok["scheduled_s"]) * 1000.0
    grouped = ok.assign(ttft_ms=ttft_ms, turn=ok["turn"].astype(int)).groupby("turn")
    table = pd.DataFrame({"num_ok": grouped.size(), "p50_ttft_ms": grouped["ttft_ms"].median(),
                          "mean_prompt_tokens": grouped["prompt_tokens"].mean(),
                          "mean_cached_tokens": grouped["cached_tokens"].mean()})
    table.insert(0, "num", turns.assign(turn=turns["turn"].astype(int)).groupby("turn").size())
    return table.rename_axis("turn").reset_index()


def conversation_stats(requests: pd.DataFrame) -> dict[str, float | int | None]:
    """The summary's multi-turn figures (METRIC_DEFINITIONS["conversations"])."""
    turns = _turn_rows(requests)
    n = int(turns["conversation_id"].nunique())
    ok = ok_requests(turns)
    ttft_ms = (ok["first_token_s"] - ok["scheduled_s"]) * 1000.0
    turn = ok["turn"].astype(int)
    later = turn >= 1

    def p50(mask: pd.Series) -> float | None:
        values = ttft_ms[mask].dropna()
        return float(values.median()) if len(values) else None

    row: dict[str, float | int | None] = {
        "num_conversations": n, "mean_turns_per_conversation": len(turns) / n if n else None,
        "ttft_p50_ms_first_turn": p50(turn == 0), "ttft_p50_ms_later_turns": p50(later),
        "mean_cached_tokens_later_turns": float(ok["cached_tokens"][later].mean()) if later.any() else None,
    }
    for k in sorted(set(turn) & set(range(MAX_TURN_COLUMNS))):
        row[f"ttft_p50_ms_turn_{k}"] = p50(turn == k)
    return row


def percentiles_from_summary(row: dict) -> tuple[float, ...]:
    """The percentiles a summary row was computed with (rows from before the column: defaults)."""
    text = row.get("percentiles")
    return tuple(float(p) for p in text.split(",")) if isinstance(text, str) and text else PERCENTILES


def slos_from_summary(row: dict) -> Slos:
    """The SLOs a summary row was computed with (to recompute it from the Parquet files)."""
    return Slos(*(_none_if_nan(row.get(f"slo_{k}_ms")) for k in ("ttft", "tpot", "e2el")))
