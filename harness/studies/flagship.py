"""The flagship report: static vs continuous batching on one GPU, swept over load.

    python -m harness flagship                       # every sweep -> reports/flagship-<time>/
    python -m harness flagship --publish DIR         # the small copy for git -> reports/flagship/
    python -m harness flagship --table reports/flagship/sweep.parquet   # the README's tables

Sweeps (qwen3-0.6b preset, dummy bf16 weights, equal KV memory for every engine backend:
FLAGSHIP_KV_BLOCKS blocks of 16 tokens, SLOs below for goodput):

- ``bench``: nano-vllm's bench workload (256 requests, 133,966 output tokens), offline,
  continuous ("engine") vs "static" (each request reserves prompt + max_tokens) vs
  "static-max" (each reserves max_model_len, set to the workload's longest possible request:
  1024 + 1024 = 2048, as the PagedAttention paper's Orca (Max) reserved a 2048 context);
- ``random``: 256 requests (input 512, output 256, range ratio 0.5), offline, then Poisson
  arrivals at RANDOM_FRACTIONS of the continuous engine's offline request rate (above 1:
  past saturation, where queues grow), both backends at the same rates;
- ``random-bursty``: the same requests at 0.75 of that rate with gamma arrivals of shape 0.25;
- ``prefix`` / ``prefix-nocache``: 8 groups sharing 512-token prefixes, offline, with the
  prefix cache on (engine and static) and off (engine);
- ``bench-32``: the bench workload drawn at 32 requests, offline, engine vs static vs HF
  transformers `generate` (the whole workload would take HF minutes).

Published (`--publish`): sweep.parquet (one summary row per run, with its labels), each run's
summary.parquet under summaries/, PNG plots and table.md. The bulky per-request/per-step/
telemetry Parquet stays in the run folder.
"""

from __future__ import annotations

import base64
import inspect
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from harness.compare import format_value
from harness.metrics import Slos
from harness.report import FILES, SWEEP_FILE
from harness.sweep import SweepSpec, run_sweep
from workloads.generators import bench as bench_generator
from workloads.spec import WorkloadSpec

MODEL = "qwen3-0.6b"
FLAGSHIP_KV_BLOCKS = 2048  # 32,768 token slots: about 29 bench requests' static reservations
SLOS = Slos(ttft_ms=1000.0, tpot_ms=50.0)
RANDOM_PARAMS = {"num_prompts": 256, "input_len": 512, "output_len": 256, "range_ratio": 0.5}
RANDOM_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
BENCH_PARAMS: dict[str, Any] = {}  # the full bench workload (tests scale it down)
PREFIX_PARAMS = {"num_groups": 8, "prefix_len": 512, "suffix_len": 128, "output_len": 128, "num_prompts": 256}


def bench_max_model_len(params: dict[str, Any]) -> int:
    """The longest request the bench workload with these parameters can draw."""
    defaults = inspect.signature(bench_generator).parameters
    return sum(params.get(k, defaults[k].default) for k in ("max_input_len", "max_output_len"))


def _spec(backends: list[str], workload: WorkloadSpec, engine_args: dict[str, Any] | None = None,
          **kw: Any) -> SweepSpec:
    base = {"profile": "offline", "model": MODEL, "slos": SLOS, "reuse_backends": True,
            "engine_args": {"num_kv_blocks": FLAGSHIP_KV_BLOCKS, **(engine_args or {})}}
    return SweepSpec(backends=backends, workload=workload, **{**base, **kw})


def flagship_sweeps(hf: bool = True) -> list[SweepSpec]:
    """Every sweep but the bursty one (its rate comes from the random sweep's offline point)."""
    specs = [
        _spec(["engine", "static", "static-max"], WorkloadSpec(kind="bench", params=BENCH_PARAMS),
              engine_args={"max_model_len": bench_max_model_len(BENCH_PARAMS)}),
        _spec(["engine", "static"], WorkloadSpec(kind="random", params=RANDOM_PARAMS),
              profile="sweep", profile_params={"fractions": list(RANDOM_FRACTIONS)}),
        _spec(["engine", "static"], WorkloadSpec(kind="prefix", params=PREFIX_PARAMS)),
        _spec(["engine"], WorkloadSpec(kind="prefix", params=PREFIX_PARAMS, label="prefix-nocache"),
              engine_args={"enable_prefix_caching": False}),
    ]
    if hf:
        specs.append(_spec(["engine", "static", "hf"], WorkloadSpec(kind="bench", params={**BENCH_PARAMS, "num_seqs": 32},
                                                                    label="bench-32"),
                           backend_args={"hf": {"batch_size": 32}}))
    return specs


def bursty_sweep(offline_rate: float) -> SweepSpec:
    workload = WorkloadSpec(kind="random", params=RANDOM_PARAMS, burstiness=0.25, label="random-bursty")
    return _spec(["engine", "static"], workload, profile="fixed",
                 profile_params={"rates": [round(0.75 * offline_rate, 2)]})


def run_flagship(out_root: str | Path = "reports", hf: bool = True, console: Console | None = None,
                 **sweep_kw: Any) -> Path:
    """Run every sweep into reports/flagship-<time>/ (one sweep.parquet); returns the folder."""
    console = console or Console(stderr=True)
    out = Path(out_root) / time.strftime("flagship-%Y%m%d-%H%M%S")
    start = time.perf_counter()
    specs = flagship_sweeps(hf)
    for spec in specs[:2]:  # bench, random: the bursty rate needs random's offline point
        run_sweep(replace(spec, **sweep_kw), out, console)
    sweep = pd.read_parquet(out / SWEEP_FILE)
    ref = sweep[(sweep["workload"] == "random") & (sweep["backend"] == "engine") & (sweep["point"] == "offline")]
    specs.insert(2, bursty_sweep(float(ref["request_throughput"].iloc[0])))
    for spec in specs[2:]:
        run_sweep(replace(spec, **sweep_kw), out, console)
    console.print(f"flagship: {out} ({time.perf_counter() - start:.0f} s)")
    return out


# ---- publishing ------------------------------------------------------------------------------
# (summary key, column title, harness.compare.format_value unit)
HEADLINE = [("output_throughput", "output tok/s", "rate"), ("request_throughput", "req/s", "rate"),
            ("goodput", "goodput req/s", "rate"), ("p50_ttft_ms", "TTFT p50 ms", "ms"),
            ("p99_ttft_ms", "TTFT p99 ms", "ms"), ("p50_tpot_ms", "TPOT p50 ms", "ms"),
            ("p99_e2el_ms", "E2EL p99 ms", "ms"), ("kv_waste_internal_mean", "KV waste internal", "frac"),
            ("kv_waste_reserved_mean", "KV waste reserved", "frac"), ("kv_util_mean", "KV util", "frac"),
            ("prefix_cache_hit_rate", "prefix hits", "frac"), ("mean_batch_size", "mean batch", "rate"),
            ("num_preemptions", "preempted", "count"), ("gpu_util_mean_pct", "GPU util %", "rate"),
            ("gpu_power_mean_w", "power W", "rate"), ("joules_per_output_token", "J/token", "j"),
            ("roofline_efficiency", "roofline", "frac")]


def headline_table(sweep: pd.DataFrame) -> str:
    """Markdown: one row per run (workload, point, backend, offered rate) with the headline
    figures, in sweep order."""
    cols = ["workload", "point", "backend", "offered req/s", "ok"] + [title for _, title, _ in HEADLINE]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in sweep.iterrows():
        rate = "inf" if math.isinf(r["rate"]) else f"{r['rate']:.1f}"
        cells = [r["workload"], r["point"], r["backend"], rate, f"{r['num_ok']}/{r['num_requests']}"]
        cells += [format_value(r.get(key), unit) for key, _, unit in HEADLINE]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def ratio_lines(sweep: pd.DataFrame) -> list[str]:
    """Continuous / static output throughput at each (workload, point) that ran both, for each
    static baseline."""
    out = []
    for (workload, point), rows in sweep.groupby(["workload", "point"], sort=False):
        by = rows.set_index("backend")["output_throughput"]
        for static in ("static", "static-max"):
            if "engine" in by and static in by and by[static]:
                out.append(f"- {workload} {point}: continuous / {static} = {by['engine'] / by[static]:.2f}x")
    return out


def _save_png(b64: str | None, path: Path) -> Path | None:
    if b64 is None:
        return None
    path.write_bytes(base64.b64decode(b64))
    return path


def publish(run_dir: str | Path, dest: str | Path = "reports/flagship") -> Path:
    """Copy the small parts of a flagship run for git: sweep.parquet, every summary.parquet,
    PNG plots and table.md (tables + continuous/static ratios)."""
    from harness.compare import load_runs
    from harness.plots import kv_over_time, latency_cdfs, load_curves

    run_dir, dest = Path(run_dir), Path(dest)
    sweep = pd.read_parquet(run_dir / SWEEP_FILE)
    (dest / "summaries").mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir / SWEEP_FILE, dest / SWEEP_FILE)
    for name in sweep["run_dir"]:
        shutil.copy(run_dir / name / FILES["summary"], dest / "summaries" / f"{name}.parquet")
    bench = load_runs([run_dir / f"bench-{b}-offline" for b in ("engine", "static", "static-max")
                       if (run_dir / f"bench-{b}-offline").is_dir()])
    _save_png(kv_over_time(bench), dest / "bench_kv_over_time.png")
    _save_png(latency_cdfs(bench), dest / "bench_latency_cdfs.png")
    _save_png(load_curves(sweep, "random"), dest / "random_load_curve.png")
    text = ["# Flagship tables", "", f"Run folder: `{run_dir.name}`", "", headline_table(sweep), "", *ratio_lines(sweep)]
    (dest / "table.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    return dest
