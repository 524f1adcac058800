"""Reports side by side: a terminal table of the key summary figures and an HTML page of plots.

    runs = load_runs(["reports/a", "reports/sweep-dir"])   # report folders or sweep folders
    console.print(summary_table(runs))                     # rich Table, one column per run
    html = write_html(runs, "reports/compare.html")        # harness/plots.py draws the figures

A path may be one report folder (it has summary.parquet) or a sweep folder (it has
sweep.parquet): a sweep expands to its runs in sweep order.

Ratios are taken at equal load: a run that a sweep labelled with a point (workload + point,
e.g. random@x0.5) is divided by the first run listed at that same point (the first backend's
run there); the first run at each point shows no ratio. Runs without a point label (plain
reports) are divided by the first such run. So "continuous vs static at 0.6x of offline"
reads off directly, and no cell divides a run at one rate by a run at another.

On a terminal narrower than the table, summary_table splits the runs over several tables
(each repeating the metric column) instead of folding the headers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console, Group, RenderableType
from rich.table import Table

from harness.report import FILES, SWEEP_FILE, Report, load_report

# (summary key, row title, unit): unit picks the number format.
COMPARE_METRICS: list[tuple[str, str, str]] = [
    ("num_ok", "ok / requests", "count"),
    ("num_not_sent", "not sent (--duration)", "count"),
    ("num_warmup", "warm-up excluded", "count"),
    ("num_cooldown", "cool-down excluded", "count"),
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
    ("mean_step_ms", "mean step (ms)", "ms"),
    ("gpu_util_mean_pct", "GPU util mean (%)", "rate"),
    ("joules_per_output_token", "J / output token", "j"),
    ("roofline_efficiency", "roofline efficiency", "frac"),
    ("server_queue_mean", "server queue mean", "rate"),
    ("server_queue_peak", "server queue peak", "rate"),
    ("server_kv_usage_mean", "server KV usage mean", "frac"),
    ("server_kv_usage_peak", "server KV usage peak", "frac"),
    ("server_preemptions", "server preemptions", "count"),
    ("server_mean_step_ms", "server mean step ms", "ms"),
    ("server_step_batch_mean", "server step batch mean", "rate"),
]
# Counts shown only when some run has a non-zero one (most runs have none), without ratios.
HIDDEN_WHEN_ZERO = {"num_not_sent", "num_warmup", "num_cooldown"}


@dataclass
class Run:
    label: str
    report: Report

    @property
    def summary(self) -> dict[str, Any]:
        return self.report.summary_row()

    @property
    def point(self) -> tuple[str, str] | None:
        """(workload, point) a sweep labelled this run with; None for a plain report."""
        labels = (self.report.metadata.get("config") or {}).get("labels") or {}
        if labels.get("point") is None:
            return None
        return str(labels.get("workload")), str(labels["point"])


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


def reference_index(runs: Sequence[Run]) -> list[int | None]:
    """For each run, the index of the run its ratios divide by (None: itself, no ratio): the
    first run at the same (workload, point), or for unlabelled runs the first unlabelled run."""
    first: dict[tuple[str, str] | None, int] = {}
    out: list[int | None] = []
    for i, r in enumerate(runs):
        ref = first.setdefault(r.point, i)
        out.append(None if ref == i else ref)
    return out


def table_rows(runs: Sequence[Run]) -> list[list[str]]:
    """[title, cell per run] for every metric that at least one run has."""
    summaries = [r.summary for r in runs]
    refs = reference_index(runs)
    rows = []
    for key, title, unit in COMPARE_METRICS:
        values = [s.get(key) for s in summaries]
        if all(v is None for v in values) or (key in HIDDEN_WHEN_ZERO and not any(values)):
            continue
        if key == "num_ok":
            cells = [f"{s['num_ok']} / {s['num_requests']}" for s in summaries]
        else:
            cells = [format_value(v, unit) + ("" if ref is None or key in HIDDEN_WHEN_ZERO else _ratio(v, values[ref]))
                     for v, ref in zip(values, refs)]
        rows.append([title, *cells])
    return rows


def summary_table(runs: Sequence[Run], title: str = "comparison", width: int | None = None) -> RenderableType:
    """One table, or, when it is wider than `width` (default: rich's idea of the terminal,
    80 columns when output is not a terminal), several with as many runs each as fit."""
    rows = table_rows(runs)
    width = width or Console().width
    metric_w = max(len("metric"), *(len(r[0]) for r in rows)) if rows else len("metric")
    col_w = [max(len(r.label), *(len(row[i + 1]) for row in rows)) if rows else len(r.label)
             for i, r in enumerate(runs)]
    chunks, current, used = [], [], metric_w + 4  # borders and padding: 3 per column, 1 at the end
    for i, w in enumerate(col_w):
        if current and used + w + 3 > width:
            chunks.append(current)
            current, used = [], metric_w + 4
        current.append(i)
        used += w + 3
    chunks.append(current)
    tables = []
    for n, chunk in enumerate(chunks):
        part = f" ({n + 1}/{len(chunks)})" if len(chunks) > 1 else ""
        table = Table(title=title + part, show_lines=False)
        table.add_column("metric", style="bold", no_wrap=True)
        for i in chunk:
            table.add_column(runs[i].label, justify="right", no_wrap=True)
        for row in rows:
            table.add_row(row[0], *(row[i + 1] for i in chunk))
        tables.append(table)
    return tables[0] if len(tables) == 1 else Group(*tables)


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
    path.write_text(comparison_page(runs, table_rows(runs), sweep_frame(runs)), encoding="utf-8")
    return path


def sweep_frame(runs: Sequence[Run]) -> pd.DataFrame | None:
    """One row per run that a sweep labelled with a rate (workload, backend, rate + its summary),
    for the load curves; None when no run has a rate."""
    rows = []
    for r in runs:
        labels = (r.report.metadata.get("config") or {}).get("labels") or {}
        if labels.get("rate") is not None and labels.get("backend") is not None:
            rows.append({**r.summary, "workload": labels.get("workload"), "backend": labels["backend"],
                         "point": labels.get("point"), "rate": float(labels["rate"])})
    return pd.DataFrame(rows) if rows else None
