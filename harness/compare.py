"""Reports side by side: a terminal table of the key summary figures and an HTML page of plots.

    runs = load_runs(["reports/a", "reports/sweep-dir"])   # report folders or sweep folders
    console.print(summary_table(runs))                     # rich Table, one column per run
    html = write_html(runs, "reports/compare.html")        # harness/plots.py draws the figures

A path may be one report folder (it has summary.parquet) or a sweep folder (it has
sweep.parquet): a sweep expands to its runs in sweep order. Each cell after the first column
also shows the ratio to the first run, so "continuous vs static" reads off directly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from harness.report import FILES, SWEEP_FILE, Report, load_report

# (summary key, row title, unit): unit picks the number format.
COMPARE_METRICS: list[tuple[str, str, str]] = [
    ("num_ok", "ok / requests", "count"),
    ("duration_s", "duration (s)", "s"),
    ("output_throughput", "output tok/s", "rate"),
    ("total_token_throughput", "total tok/s", "rate"),
    ("request_throughput", "requests/s", "rate"),
    ("goodput", "goodput (req/s)", "rate"),
    ("p50_ttft_ms", "TTFT p50 (ms)", "ms"),
    ("p99_ttft_ms", "TTFT p99 (ms)", "ms"),
    ("p50_tpot_ms", "TPOT p50 (ms)", "ms"),
    ("p99_tpot_ms", "TPOT p99 (ms)", "ms"),
    ("p50_itl_ms", "ITL p50 (ms)", "ms"),
    ("p99_itl_ms", "ITL p99 (ms)", "ms"),
    ("p50_e2el_ms", "E2EL p50 (ms)", "ms"),
    ("p99_e2el_ms", "E2EL p99 (ms)", "ms"),
    ("kv_waste_mean", "KV waste mean", "frac"),
    ("kv_waste_internal_mean", "KV waste internal mean", "frac"),
    ("kv_waste_internal_peak", "KV waste internal peak", "frac"),
    ("kv_waste_reserved_mean", "KV waste reserved mean", "frac"),
    ("kv_waste_reserved_peak", "KV waste reserved peak", "frac"),
    ("kv_util_mean", "KV utilization mean", "frac"),
    ("kv_util_peak", "KV utilization peak", "frac"),
    ("prefix_cache_hit_rate", "prefix cache hit rate", "frac"),
    ("num_preemptions", "preemptions", "count"),
    ("mean_batch_size", "mean batch size", "rate"),
    ("gpu_util_mean_pct", "GPU util mean (%)", "rate"),
    ("joules_per_output_token", "J / output token", "j"),
    ("roofline_efficiency", "roofline efficiency", "frac"),
]


@dataclass
class Run:
    label: str
    report: Report

    @property
    def summary(self) -> dict[str, Any]:
        return self.report.summary_row()


def find_reports(paths: Sequence[str | Path]) -> list[Path]:
    """Report folders named by ``paths`` (sweep folders expand to their runs)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / FILES["summary"]).exists():
            found.append(p)
        elif (p / SWEEP_FILE).exists():
            rows = pd.read_parquet(p / SWEEP_FILE, columns=["run_dir"])["run_dir"]
            found += [p / d for d in rows if (p / d / FILES["summary"]).exists()]
        else:
            raise ValueError(f"{p} is neither a report folder ({FILES['summary']}) nor a sweep folder ({SWEEP_FILE})")
    return found


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    dirs = find_reports(paths)
    if not dirs:
        raise ValueError(f"no reports found in {', '.join(map(str, paths))}")
    names = [d.name for d in dirs]
    # Same folder name twice (two sweeps): prefix the parent so columns stay distinguishable.
    labels = [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in dirs]
    return [Run(label, load_report(d)) for label, d in zip(short_labels(labels), dirs)]


def short_labels(labels: list[str]) -> list[str]:
    """Drop the dash-separated parts every label shares at its start and end, so
    bench-engine-offline / bench-static-offline become engine / static."""
    parts = [label.split("-") for label in labels]
    if len(parts) < 2:
        return labels
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    short = ["-".join(p[head:len(p) - tail]) for p in parts]
    return short if len(set(short)) == len(short) else labels


def format_value(value: Any, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "frac":
        return f"{100 * value:.1f}%"
    if unit == "count":
        return f"{int(value):,}"
    if unit == "j":
        return f"{value:.3g}"
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.3g}"


def _ratio(value: Any, first: Any) -> str:
    if value is None or first is None or isinstance(value, str) or first <= 0 or value < 0:
        return ""  # a ratio of negative or zero figures reads as nonsense
    return f" ({value / first:.2f}x)"


def table_rows(runs: Sequence[Run]) -> list[list[str]]:
    """[title, cell per run] for every metric that at least one run has."""
    summaries = [r.summary for r in runs]
    rows = []
    for key, title, unit in COMPARE_METRICS:
        values = [s.get(key) for s in summaries]
        if all(v is None for v in values):
            continue
        if key == "num_ok":
            cells = [f"{s['num_ok']} / {s['num_requests']}" for s in summaries]
        else:
            cells = [format_value(v, unit) + (_ratio(v, values[0]) if i else "") for i, v in enumerate(values)]
        rows.append([title, *cells])
    return rows


def summary_table(runs: Sequence[Run], title: str = "comparison") -> Table:
    table = Table(title=title, show_lines=False)
    table.add_column("metric", style="bold")
    for r in runs:
        table.add_column(r.label, justify="right", overflow="fold")
    for row in table_rows(runs):
        table.add_row(*row)
    return table


def default_html_path(runs: Sequence[Run]) -> Path:
    """compare-<first>-vs-<last>.html in the folder the reports share."""
    common = Path(os.path.commonpath([r.report.run_dir.resolve() for r in runs]))
    folder = common.parent if (common / FILES["summary"]).exists() else common
    name = runs[0].label if len(runs) == 1 else f"{runs[0].label}-vs-{runs[-1].label}"
    return folder / f"compare-{name.replace('/', '_')}.html"


def write_html(runs: Sequence[Run], path: str | Path | None = None) -> Path:
    from harness.plots import comparison_page  # matplotlib only when a page is asked for

    path = Path(path) if path is not None else default_html_path(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(comparison_page(runs, table_rows(runs)), encoding="utf-8")
    return path
