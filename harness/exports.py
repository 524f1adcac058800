"""Exports beside the Parquet files, for tools that do not read our reports.

    run_dir/result.json   shaped like `vllm bench serve --save-result` (its key names)
    run_dir/summary.csv   the summary row; sweep_dir/sweep.csv: one row per run of a sweep

result.json keys (vLLM's names; all from the steady-state rows, warm-up/cool-down excluded):
duration, completed, failed, total_input_tokens, total_output_tokens, request_throughput,
request_goodput, output_throughput, total_token_throughput, then for ttft, tpot, itl, e2el:
mean_X_ms, median_X_ms, std_X_ms and pP_X_ms for each summary percentile; per request, in
trace order: input_lens, output_lens, ttfts (seconds), itls (seconds, one list per request),
start_times (sent_s on the run clock; null when never sent), errors ("" when ok). As in vLLM, a failed request has ttft 0.0, no itls and output_len 0.
Our ttft is first token - scheduled arrival (harness/metrics.py), so client-side queueing
under --max-concurrency counts; vLLM's is measured from the send.
Provenance keys vLLM also writes: date, backend, model_id, request_rate, burstiness,
max_concurrency, num_prompts (when the run config has them).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.metrics import (
    inter_token_latencies,
    percentiles_from_summary,
    request_latencies,
    steady_requests,
)

RESULT_JSON = "result.json"
SUMMARY_CSV = "summary.csv"
SWEEP_CSV = "sweep.csv"
# our summary key -> vLLM's
RENAMED = {"duration_s": "duration", "num_ok": "completed", "num_error": "failed", "goodput": "request_goodput"}
COPIED = ("total_input_tokens", "total_output_tokens", "request_throughput", "output_throughput",
          "total_token_throughput")
LATENCIES = ("ttft", "tpot", "itl", "e2el")


def _median_ms(values_s: Any) -> float | None:
    v = np.asarray(values_s, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.median(v) * 1000) if v.size else None


def vllm_result(summary: Mapping[str, Any], requests: pd.DataFrame,
                config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `vllm bench serve --save-result` document of one run."""
    config = config or {}
    out: dict[str, Any] = {"date": time.strftime("%Y%m%d-%H%M%S")}
    workload = config.get("workload") or {}
    options = config.get("options") or {}
    provenance = {"backend": config.get("backend"), "model_id": config.get("model"),
                  "request_rate": workload.get("rate"), "burstiness": workload.get("burstiness"),
                  "max_concurrency": options.get("max_concurrency")}
    out.update({k: v for k, v in provenance.items() if v is not None})
    if isinstance(out.get("request_rate"), float) and math.isinf(out["request_rate"]):
        out["request_rate"] = "inf"  # JSON has no infinity; vLLM writes the string too
    steady = steady_requests(requests)
    out["num_prompts"] = len(steady)
    out.update({vllm: summary.get(ours) for ours, vllm in RENAMED.items()})
    out.update({k: summary.get(k) for k in COPIED})
    lat = request_latencies(steady)
    medians = {"ttft": _median_ms(lat["ttft_s"]), "tpot": _median_ms(lat["tpot_s"]),
               "itl": _median_ms(inter_token_latencies(steady)), "e2el": _median_ms(lat["e2el_s"])}
    for name in LATENCIES:
        out[f"mean_{name}_ms"] = summary.get(f"mean_{name}_ms")
        out[f"median_{name}_ms"] = medians[name]
        out[f"std_{name}_ms"] = summary.get(f"std_{name}_ms")
        for p in percentiles_from_summary(summary):
            out[f"p{p:g}_{name}_ms"] = summary.get(f"p{p:g}_{name}_ms")
    out.update(_per_request(steady))
    return out


def _per_request(steady: pd.DataFrame) -> dict[str, list]:
    cols: dict[str, list] = {"input_lens": [], "output_lens": [], "ttfts": [], "itls": [], "start_times": [],
                             "errors": []}
    for row in steady.itertuples(index=False):
        ok = row.status == "ok"
        times = [] if row.token_times_s is None else list(row.token_times_s)
        cols["input_lens"].append(int(row.prompt_tokens))
        cols["output_lens"].append(int(row.output_tokens) if ok else 0)
        cols["ttfts"].append(float(row.first_token_s - row.scheduled_s) if ok else 0.0)
        cols["itls"].append([float(b - a) for a, b in zip(times, times[1:])] if ok else [])
        cols["start_times"].append(None if pd.isna(row.sent_s) else float(row.sent_s))
        cols["errors"].append("" if ok else (row.error or row.status))
    return cols


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_vllm_json(path: str | Path, summary: Mapping[str, Any], requests: pd.DataFrame,
                    config: Mapping[str, Any] | None = None) -> Path:
    doc = {k: _plain(v) if not isinstance(v, list) else v for k, v in vllm_result(summary, requests, config).items()}
    path = Path(path)
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path


def write_csv(path: str | Path, rows: list[Mapping[str, Any]]) -> Path:
    """Rows as CSV; the header is the union of their keys, in first-seen order."""
    header = list(dict.fromkeys(k for row in rows for k in row))
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if _plain(row.get(k)) is None else _plain(row.get(k)) for k in header})
    return path
