"""The figures of a comparison and the self-contained HTML page that embeds them (PNG, base64).

    comparison_page(runs, table_rows, sweep=None) -> str      runs: harness.compare.Run

Figures: load curves of every swept workload (throughput, TTFT and TPOT p50/p99 against the
offered rate, one colour per backend; from the runs' sweep labels); output throughput bars;
TTFT and E2EL CDFs (from requests.parquet); KV utilization and KV waste over time (from
steps.parquet); GPU utilization over time (telemetry.parquet); the server's queue, running
requests and KV usage over time (server_metrics.parquet, runs against a scraped server).
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




def load_curves(sweep: Any, workload: str) -> str | None:
    """Output throughput, TTFT and TPOT p50/p99 against offered load for the timed points of
    one workload in a sweep.parquet frame, one colour per backend."""
    rows = sweep[(sweep["workload"] == workload) & np.isfinite(sweep["rate"].astype(float))]
    if rows.empty:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    groups = list(rows.groupby("backend", sort=False))
    for color, (backend, r) in zip(_colors(len(groups)), groups):
        r = r.sort_values("rate")
        axes[0].plot(r["rate"], r["output_throughput"], "o-", color=color, label=backend)
        for ax, name in zip(axes[1:], ("ttft", "tpot")):
            for p, style in (("50", "o-"), ("99", "s--")):
                if f"p{p}_{name}_ms" in r:
                    ax.plot(r["rate"], r[f"p{p}_{name}_ms"], style, color=color, label=f"{backend} p{p}")
    axes[0].set(xlabel="offered load (requests/s)", ylabel="output tokens/s", title=f"{workload}: throughput")
    for ax, name in zip(axes[1:], ("TTFT", "TPOT")):
        ax.set(xlabel="offered load (requests/s)", ylabel=f"{name} (ms)", yscale="log", title=f"{workload}: {name}")
        ax.legend(fontsize=7)
    axes[0].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    return _png(fig)


def server_over_time(runs: Sequence[Any]) -> str | None:
    """The scraped server's queue, running requests and KV usage, one panel per run."""
    from harness.scrape import SERVER_FAMILIES, base_name

    scraped = [r for r in runs if getattr(r.report, "server_metrics", None) is not None
               and not r.report.server_metrics.empty]
    if not scraped:
        return None
    fig, axes = plt.subplots(len(scraped), 1, figsize=(11, 1.9 * len(scraped) + 0.6), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], scraped):
        m = r.report.server_metrics
        bases = m["family"].map(base_name)
        for key, color in (("queue", "tab:red"), ("running", "tab:blue")):
            rows = m[bases.isin(SERVER_FAMILIES[key])].groupby("t_s")["value"].sum()
            ax.plot(rows.index, rows.values, lw=1, color=color, drawstyle="steps-post", label=f"{key} (requests)")
        kv = m[bases.isin(SERVER_FAMILIES["kv_usage"])].groupby("t_s")["value"].sum()
        if not kv.empty:
            twin = ax.twinx()
            twin.plot(kv.index, 100 * kv.values, lw=1, color="tab:green", label="KV usage (%)")
            twin.set_ylim(-5, 105)
            twin.set_ylabel("KV %", fontsize=8)
        ax.set_ylabel(r.label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    axes[0, 0].set_title("server /metrics over time (queue and running: left axis; KV usage: right)")
    axes[-1, 0].set_xlabel("time (s, the run clock)")
    return _png(fig)


FIGURES = [  # (title, function, note when no run has the data)
    ("Output throughput", throughput_bars, "no runs"),
    ("Latency CDFs", latency_cdfs, "no successful requests in any run"),
    ("KV cache over time", kv_over_time,
     "no engine steps in these runs (only the engine and static backends record KV usage)"),
    ("GPU utilization over time", gpu_over_time,
     "no GPU telemetry: NVML was unavailable (CPU machine) or telemetry was off for these runs"),
    ("Server metrics over time", server_over_time,
     "no server was scraped (only openai-backend runs and load tests scrape /metrics)"),
]


def _table_html(rows: list[list[str]], labels: list[str]) -> str:
    head = "".join(f"<th>{html.escape(x)}</th>" for x in ["metric", *labels])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def comparison_page(runs: Sequence[Any], table_rows: list[list[str]], sweep: Any | None = None) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>llmbench comparison</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             ".note{color:#666;font-style:italic}</style></head><body>",
             "<h1>llmbench comparison</h1>",
             "<p>" + "<br>".join(html.escape(f"{r.label}: {r.report.run_dir}") for r in runs) + "</p>",
             "<h2>Summary</h2>", _table_html(table_rows, [r.label for r in runs])]
    if sweep is not None:
        for workload in dict.fromkeys(sweep["workload"]):
            png = load_curves(sweep, workload)
            parts.append(f"<h2>Load curve: {html.escape(str(workload))}</h2>")
            parts.append(f"<img alt='load curve' src='data:image/png;base64,{png}'>" if png else
                         "<p class='note'>Not plotted: only offline points (no offered rate) in this workload.</p>")
    for title, draw, note in FIGURES:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        png = draw(runs)
        parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>" if png
                     else f"<p class='note'>Not plotted: {html.escape(note)}.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
