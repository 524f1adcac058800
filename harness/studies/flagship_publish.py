"""The flagship's committed copy and its tables (harness/studies/flagship.py runs the sweeps).

    publish("reports/flagship-h200-llama-3-8b")     # -> reports/flagship/llama-3-8b/
    headline_table(sweep) / ratio_lines(sweep) / accounting_lines(sweep)

table.md: where it ran (device, model, KV blocks, run folder), each planned sweep's status
(ok, failed with its error, or not run) from flagship.json, the accounting (every run's ok /
error / aborted requests, and which runs lack NVML columns), one headline row per run with
in-process and served rows of a workload and point side by side, and the ratios: continuous
/ static, continuous / static-max, served / in-process.
"""

from __future__ import annotations

import base64
import math
import shutil
from pathlib import Path

import pandas as pd

from harness.compare import format_value
from harness.report import FILES, SWEEP_FILE

# (summary key, column title, harness.compare.format_value unit)
HEADLINE = [("output_throughput", "output tok/s", "rate"), ("request_throughput", "req/s", "rate"),
            ("goodput", "goodput req/s", "rate"), ("p50_ttft_ms", "TTFT p50 ms", "ms"),
            ("p99_ttft_ms", "TTFT p99 ms", "ms"), ("p50_tpot_ms", "TPOT p50 ms", "ms"),
            ("p99_e2el_ms", "E2EL p99 ms", "ms"), ("kv_waste_internal_mean", "KV waste internal", "frac"),
            ("kv_waste_reserved_mean", "KV waste reserved", "frac"), ("kv_util_mean", "KV util", "frac"),
            ("prefix_cache_hit_rate", "prefix hits", "frac"), ("mean_batch_size", "mean batch", "rate"),
            ("mean_step_ms", "step ms", "ms"), ("num_preemptions", "preempted", "count"), ("gpu_util_mean_pct", "GPU util %", "rate"),
            ("gpu_power_mean_w", "power W", "rate"), ("joules_per_output_token", "J/token", "j"),
            ("roofline_efficiency", "roofline", "frac")]
BACKEND_ORDER = ("engine", "served", "static", "static-max", "hf")  # served beside continuous
# A served run has no engine steps: these come from the server's /metrics (harness/scrape.py).
# Each: the first of its columns with a value (runs before the step counters have only the gauge).
SERVER_FIGURES = {"kv_util_mean": ("server_kv_usage_mean",),
                  "mean_batch_size": ("server_step_batch_mean", "server_running_mean"),
                  "mean_step_ms": ("server_mean_step_ms",), "num_preemptions": ("server_preemptions",)}
GPU_COLUMNS = ("gpu_util_mean_pct", "gpu_power_mean_w", "joules_per_output_token")


def ordered(sweep: pd.DataFrame) -> pd.DataFrame:
    """Rows grouped by workload (in order of first appearance: pieces append served rows long
    after their in-process ones), then offline first and rates ascending, then BACKEND_ORDER."""
    first = {w: i for i, w in enumerate(dict.fromkeys(sweep["workload"]))}
    rank = {b: i for i, b in enumerate(BACKEND_ORDER)}
    key = [(first[w], -1.0 if math.isinf(r) else r, rank.get(b, len(rank)))
           for w, r, b in zip(sweep["workload"], sweep["rate"].astype(float), sweep["backend"])]
    return sweep.iloc[sorted(range(len(sweep)), key=key.__getitem__)]


def _count(row: pd.Series, key: str) -> int:
    value = row.get(key)
    return 0 if value is None or pd.isna(value) else int(value)


def headline_table(sweep: pd.DataFrame) -> str:
    """Markdown: one row per run (workload, point, backend, offered rate, requests ok / error /
    aborted of all) with the headline figures."""
    cols = ["workload", "point", "backend", "offered req/s", "ok / err / abort of n"] + [t for _, t, _ in HEADLINE]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in ordered(sweep).iterrows():
        rate = "inf" if math.isinf(r["rate"]) else f"{r['rate']:.1f}"
        counts = f"{_count(r, 'num_ok')} / {_count(r, 'num_error')} / {_count(r, 'num_aborted')} of {r['num_requests']}"
        cells = [r["workload"], r["point"], r["backend"], rate, counts]
        cells += [_cell(r, key, unit) for key, _, unit in HEADLINE]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if (sweep["backend"] == "served").any():
        lines += ["", "† served rows: the server's own figure, from its /metrics scraped every 0.5 s "
                  "(the mean batch and step time from its step counters, else running requests for the batch; KV-cache "
                  "usage, preemptions)"]
    return "\n".join(lines)


def _cell(row: pd.Series, key: str, unit: str) -> str:
    if row["backend"] == "served" and key in SERVER_FIGURES:  # no engine steps on the client side
        value = next((row.get(c) for c in SERVER_FIGURES[key] if pd.notna(row.get(c))), None)
        return format_value(value, unit) + "†"
    return format_value(row.get(key), unit)


def ratio_lines(sweep: pd.DataFrame) -> list[str]:
    """Output-throughput ratios at each (workload, point): continuous / each static baseline,
    and served / in-process (continuous)."""
    out = []
    for (workload, point), rows in ordered(sweep).groupby(["workload", "point"], sort=False):
        by = rows.set_index("backend")["output_throughput"]
        for num, den, what in (("engine", "static", "continuous / static"),
                               ("engine", "static-max", "continuous / static-max"),
                               ("served", "engine", "served / in-process")):
            if num in by and den in by and by[den]:
                out.append(f"- {workload} {point}: {what} = {by[num] / by[den]:.2f}x")
    return out


def accounting_lines(sweep: pd.DataFrame) -> list[str]:
    """Every run accounted for: requests by status over all runs, runs with any request not ok,
    runs without the NVML columns."""
    totals = {k: int(sweep[k].fillna(0).sum()) for k in ("num_requests", "num_ok", "num_error", "num_aborted",
                                                          "num_not_sent") if k in sweep}
    lines = [f"- {len(sweep)} runs, {totals.get('num_requests', 0):,} requests: {totals.get('num_ok', 0):,} ok, "
             f"{totals.get('num_error', 0)} errors, {totals.get('num_aborted', 0)} aborted, "
             f"{totals.get('num_not_sent', 0)} not sent"]
    bad = sweep[sweep["num_ok"] != sweep["num_requests"]]["run_dir"].tolist()
    if bad:
        lines.append(f"- runs with requests not ok: {', '.join(bad)}")
    gpu = [c for c in GPU_COLUMNS if c in sweep]
    blank = sweep[sweep[gpu].isna().any(axis=1)]["run_dir"].tolist() if gpu else list(sweep["run_dir"])
    lines.append(f"- NVML columns ({', '.join(GPU_COLUMNS)}) missing in: {', '.join(blank)}" if blank
                 else "- NVML columns filled in every run")
    return lines


def status_lines(manifest: dict | None, planned: list[str]) -> list[str]:
    """Each planned sweep: ok (seconds, estimate), failed (the error), or not run."""
    sweeps = (manifest or {}).get("sweeps", {})
    lines = []
    for label in planned:
        s = sweeps.get(label)
        if s is None:
            lines.append(f"- {label}: NOT RUN")
        elif s["status"] != "ok":
            lines.append(f"- {label}: FAILED ({s['error']})")
        else:
            lines.append(f"- {label}: ok, {s['seconds']:.0f} s (estimate {s['estimate_s']} s)")
    return lines


def _save_png(b64: str | None, path: Path) -> None:
    if b64 is not None:
        path.write_bytes(base64.b64decode(b64))


def _copy_summary(src: Path, dst: Path) -> None:
    if src.exists():
        shutil.copy(src, dst)
    elif not dst.exists():
        raise FileNotFoundError(f"{src}: no such run, and no published summary at {dst}")


def _plots(run_dir: Path, sweep: pd.DataFrame, dest: Path) -> None:
    from harness.compare import load_runs
    from harness.plots import kv_over_time, latency_cdfs, load_curves

    for workload in ("bench", "sharegpt-like"):
        names = ordered(sweep[sweep["workload"] == workload])["run_dir"]
        if len(names) and all((run_dir / name).is_dir() for name in names):
            runs = load_runs([run_dir / name for name in names])
            _save_png(kv_over_time(runs), dest / f"{workload}_kv_over_time.png")
            _save_png(latency_cdfs(runs), dest / f"{workload}_latency_cdfs.png")
    _save_png(load_curves(sweep, "random"), dest / "random_load_curve.png")


def publish(run_dir: str | Path, dest: str | Path | None = None) -> Path:
    """Copy the small parts of a flagship run folder for git (default: reports/flagship/<model>/):
    sweep.parquet, every summary.parquet, flagship.json, PNG plots and table.md.

    A run folder started from a published copy (its sweep.parquet and flagship.json, new pieces
    run into it on another machine) holds only the new runs: the summaries of the others are
    those already in dest, and a workload's plots are redrawn only when all its runs are here."""
    from harness.gate import run_context
    from harness.studies.flagship import MANIFEST, SWEEPS, read_manifest

    run_dir = Path(run_dir)
    sweep = pd.read_parquet(run_dir / SWEEP_FILE)
    manifest = read_manifest(run_dir)
    model = manifest["model"] if manifest else str(sweep["model"].iloc[0])
    dest = Path(dest) if dest is not None else Path("reports/flagship") / model
    (dest / "summaries").mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir / SWEEP_FILE, dest / SWEEP_FILE)
    if manifest:
        shutil.copy(run_dir / MANIFEST, dest / MANIFEST)
    for name in sweep["run_dir"]:
        _copy_summary(run_dir / name / FILES["summary"], dest / "summaries" / f"{name}.parquet")
    _plots(run_dir, sweep, dest)
    device = next((run_context(run_dir / name)["device"] for name in sweep["run_dir"] if (run_dir / name).is_dir()),
                  None)
    kv = manifest["kv_blocks"] if manifest else "?"
    text = [f"# Flagship: {model}", "",
            f"Device: {device.name if device else 'unknown'}; model `{model}`; {kv} KV blocks for every engine "
            f"backend; run folder `{run_dir.name}`.", "", "Sweeps:", "", *status_lines(manifest, list(SWEEPS)), "",
            "Accounting:", "", *accounting_lines(sweep), "", headline_table(sweep), "", "Ratios (output tok/s):", "",
            *ratio_lines(sweep)]
    (dest / "table.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    return dest
