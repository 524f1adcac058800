"""The figures of a comparison and the self-contained HTML page that embeds them (PNG, base64).

    comparison_page(runs, table_rows) -> str      runs: harness.compare.Run

Figures: output throughput bars; TTFT and E2EL CDFs (from requests.parquet); KV utilization
and KV waste over time (from steps.parquet); GPU utilization over time (telemetry.parquet).
A figure with no data in any run (no steps for HF/OpenAI, no NVML on a CPU machine) is
replaced by a note saying so, never by an empty or made-up plot.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from harness.metrics import request_latencies  # noqa: E402


def _colors(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def throughput_bars(runs: Sequence[Any]) -> str:
    labels = [r.label for r in runs]
    values = [r.summary.get("output_throughput") or 0.0 for r in runs]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * len(runs)))
    ax.barh(labels, values, color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("output tokens/s")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
    return _png(fig)


def latency_cdfs(runs: Sequence[Any]) -> str | None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    drawn = False
    for r, color in zip(runs, _colors(len(runs))):
        lat = request_latencies(r.report.requests)
        for ax, col in zip(axes, ("ttft_s", "e2el_s")):
            ms = np.sort(lat[col].dropna().to_numpy(dtype=float) * 1000)
            if ms.size:
                ax.step(ms, np.arange(1, ms.size + 1) / ms.size, where="post", label=r.label, color=color)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, name in zip(axes, ("TTFT", "E2EL")):
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of requests", title=f"{name} CDF")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    return _png(fig)


def kv_over_time(runs: Sequence[Any]) -> str | None:
    """One panel per run (overlaid step series are unreadable): utilization and waste, in %."""
    with_steps = [r for r in runs if not r.report.steps.empty]
    if not with_steps:
        return None
    fig, axes = plt.subplots(len(with_steps), 1, figsize=(11, 1.9 * len(with_steps) + 0.6), sharex=True,
                             squeeze=False)
    for ax, r in zip(axes[:, 0], with_steps):
        s = r.report.steps
        util = s["kv_blocks_used"] / s["kv_blocks_total"].where(s["kv_blocks_total"] > 0)
        waste = 1 - s["kv_tokens_stored"] / s["kv_slots_allocated"].where(s["kv_slots_allocated"] > 0)
        ax.plot(s["end_s"], 100 * util, lw=1, drawstyle="steps-post", color="tab:blue", label="blocks in use (% of capacity)")
        ax.plot(s["end_s"], 100 * waste, lw=0.8, color="tab:red", label="waste (% of allocated slots)")
        ax.set_ylabel(r.label, fontsize=8)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[0, 0].set_title("KV cache: utilization and waste per engine step")
    axes[-1, 0].set_xlabel("time (s)")
    return _png(fig)


def gpu_over_time(runs: Sequence[Any]) -> str | None:
    series = [(r, r.report.telemetry.dropna(subset=["gpu_util_pct"])) for r in runs]
    series = [(r, t) for r, t in series if not t.empty]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(11, 3.5))
    for r, t in series:
        for gpu, rows in t.groupby("gpu_index"):
            ax.plot(rows["t_s"], rows["gpu_util_pct"], lw=1, label=f"{r.label} gpu{int(gpu)}")
    ax.set(xlabel="time (s)", ylabel="utilization.gpu (%)", title="GPU utilization", ylim=(0, 105))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


FIGURES = [  # (title, function, note when no run has the data)
    ("Output throughput", throughput_bars, "no runs"),
    ("Latency CDFs", latency_cdfs, "no successful requests in any run"),
    ("KV cache over time", kv_over_time,
     "no engine steps in these runs (only the engine and static backends record KV usage)"),
    ("GPU utilization over time", gpu_over_time,
     "no GPU telemetry: NVML was unavailable (CPU machine) or telemetry was off for these runs"),
]


def load_curves(sweep: Any, workload: str) -> str | None:
    """Output throughput and TTFT p50/p99 against offered load for the timed points of one
    workload in a sweep.parquet frame, one colour per backend."""
    rows = sweep[(sweep["workload"] == workload) & np.isfinite(sweep["rate"])]
    if rows.empty:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    groups = list(rows.groupby("backend", sort=False))
    for color, (backend, r) in zip(_colors(len(groups)), groups):
        r = r.sort_values("rate")
        ax1.plot(r["rate"], r["output_throughput"], "o-", color=color, label=backend)
        ax2.plot(r["rate"], r["p50_ttft_ms"], "o-", color=color, label=f"{backend} p50")
        ax2.plot(r["rate"], r["p99_ttft_ms"], "s--", color=color, label=f"{backend} p99")
    ax1.set(xlabel="offered load (requests/s)", ylabel="output tokens/s", title=f"{workload}: throughput")
    ax2.set(xlabel="offered load (requests/s)", ylabel="TTFT (ms)", yscale="log", title=f"{workload}: TTFT")
    ax1.legend()
    ax2.legend(fontsize=8)
    return _png(fig)


def _table_html(rows: list[list[str]], labels: list[str]) -> str:
    head = "".join(f"<th>{html.escape(x)}</th>" for x in ["metric", *labels])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def comparison_page(runs: Sequence[Any], table_rows: list[list[str]]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>llmbench comparison</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             ".note{color:#666;font-style:italic}</style></head><body>",
             "<h1>llmbench comparison</h1>",
             "<p>" + "<br>".join(html.escape(f"{r.label}: {r.report.run_dir}") for r in runs) + "</p>",
             "<h2>Summary</h2>", _table_html(table_rows, [r.label for r in runs])]
    for title, draw, note in FIGURES:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        png = draw(runs)
        parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>" if png
                     else f"<p class='note'>Not plotted: {html.escape(note)}.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
