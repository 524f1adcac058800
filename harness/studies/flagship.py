"""The flagship report: static vs continuous batching on one GPU, per model, swept over load,
with the same engine served over HTTP beside it.

    llmbench flagship --model llama-3-8b --estimate      # each sweep's estimated seconds, the pieces
    llmbench flagship --model qwen3-0.6b                 # every sweep -> reports/flagship-qwen3-0.6b-<time>/
    llmbench flagship --model llama-3-8b --only bench,prefix,prefix-nocache --out reports/fl-llama
    llmbench flagship --model llama-3-8b --only random,random-bursty --out reports/fl-llama   # appends
    llmbench flagship --publish reports/fl-llama         # -> reports/flagship/llama-3-8b/
    llmbench flagship --table reports/flagship/llama-3-8b/sweep.parquet

Per-model settings (KV blocks, request counts, the pieces, the figures the estimate uses) are in
flagship_plans.py. Every engine backend of a model gets the same KV blocks (equal KV memory);
goodput counts TTFT <= 1 s and TPOT <= 50 ms. Sweeps, by the label --only takes:

- ``bench``: nano-vllm's bench workload, offline: continuous ("engine") vs "static" (each
  request reserves prompt + max_tokens) vs "static-max" (each reserves max_model_len, set to
  the workload's longest possible request, 1024 + 1024 = 2048, as the PagedAttention paper's
  Orca (Max) reserved a 2048 context);
- ``random``: vLLM's random workload offline, then Poisson arrivals at the plan's fractions of
  the continuous engine's offline request rate (above 1: past saturation), both backends;
- ``random-bursty``: the same requests at 0.75 of that rate, gamma arrivals of shape 0.25;
- ``prefix`` / ``prefix-nocache``: 8 groups sharing 512-token prefixes, offline, the prefix
  cache on (engine and static) and off (engine);
- ``sharegpt-like``: ShareGPT's length distribution without the file (workloads/generators.py
  sharegpt_like: vLLM's reported means, lognormal lengths), offline, engine vs static vs
  static-max (max_model_len 2048, the ShareGPT filter's cap);
- ``hf``: the bench workload drawn at the plan's hf_requests, offline, engine vs static vs HF
  transformers `generate` (one batch; the whole workload would take HF many minutes);
- ``served-bench`` / ``served-random``: the "served" backend (harness/backends/served.py: this
  engine behind `python -m engine.serve`, its core in its own process, on the same GPU, the
  same model and engine args) on the bench workload offline, and on the random one offline
  and at the in-process x1 rate; rows labelled backend "served" beside the "engine" rows.

``random-bursty`` and ``served-random`` take their rate from the random sweep's offline point:
from this run, or from the folder's sweep.parquet when random ran in an earlier piece.

Pieces: ``--out DIR`` appends to DIR's sweep.parquet (a folder of one model and KV size, noted
in DIR/flagship.json with each sweep's status, seconds and estimate), so the sweeps can run in
separate device calls and be published once. A sweep already in DIR is refused unless
``--redo`` (its rows and run folders are replaced). A sweep that fails (a server that does not
start, an engine error) is reported in red, recorded as failed in flagship.json, and the piece
goes on with its next sweep and exits 1. One H200, each piece under ~8 minutes by the estimate
(`--estimate` prints these), from the repository root, the run folder carried from call to call
(and, for the served sweeps, fastapi/uvicorn/prometheus_client on PYTHONPATH):

    qwen3-0.6b (2 pieces, ~280 s and ~265 s):
      PYTHONPATH=. python3 -m harness flagship --model qwen3-0.6b --only bench,random,random-bursty --out reports/flagship-h200-qwen3-0.6b
      PYTHONPATH=. python3 -m harness flagship --model qwen3-0.6b --only prefix,prefix-nocache,sharegpt-like,hf,served-bench,served-random --out reports/flagship-h200-qwen3-0.6b
    llama-3-8b (4 pieces, ~265 s, ~325 s, ~315 s, ~170 s):
      PYTHONPATH=. python3 -m harness flagship --model llama-3-8b --only bench,prefix,prefix-nocache --out reports/flagship-h200-llama-3-8b
      PYTHONPATH=. python3 -m harness flagship --model llama-3-8b --only random,random-bursty --out reports/flagship-h200-llama-3-8b
      PYTHONPATH=. python3 -m harness flagship --model llama-3-8b --only sharegpt-like,served-bench,served-random --out reports/flagship-h200-llama-3-8b
      PYTHONPATH=. python3 -m harness flagship --model llama-3-8b --only hf --out reports/flagship-h200-llama-3-8b

Published (`--publish RUN_DIR`, flagship_publish.py): reports/flagship/<model>/ with
sweep.parquet, every run's summary.parquet, flagship.json, PNG plots and table.md. The bulky
per-request/per-step/telemetry Parquet stays in the run folder.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from harness.metrics import Slos
from harness.report import SWEEP_FILE, drop_sweep_rows
from harness.studies.flagship_plans import ModelPlan, estimate_s, offline_rate_estimate
from harness.sweep import SweepSpec, run_sweep
from workloads.generators import bench as bench_generator
from workloads.generators import sharegpt_like
from workloads.spec import WorkloadSpec

SWEEPS = ("bench", "random", "random-bursty", "prefix", "prefix-nocache", "sharegpt-like", "hf",
          "served-bench", "served-random")
RANDOM_RATE_SWEEPS = ("random-bursty", "served-random")  # their rate: random's offline point
SERVED_SWEEPS = ("served-bench", "served-random")
SLOS = Slos(ttft_ms=1000.0, tpot_ms=50.0)
BURSTY_FRACTION, BURSTINESS = 0.75, 0.25
MANIFEST = "flagship.json"


def longest_request(generator: Any, params: dict[str, Any], keys: Sequence[str]) -> int:
    """The longest request a generator can draw with these parameters (its max_model_len)."""
    defaults = inspect.signature(generator).parameters
    return sum(params.get(k, defaults[k].default) for k in keys)


def bench_max_model_len(params: dict[str, Any]) -> int:
    return longest_request(bench_generator, params, ("max_input_len", "max_output_len"))


def _spec(plan: ModelPlan, backends: list[str], workload: WorkloadSpec,
          engine_args: dict[str, Any] | None = None, **kw: Any) -> SweepSpec:
    base = {"profile": "offline", "model": plan.model, "slos": SLOS, "reuse_backends": True,
            "engine_args": {"num_kv_blocks": plan.kv_blocks, **plan.engine_args, **(engine_args or {})}}
    return SweepSpec(backends=backends, workload=workload, **{**base, **kw})


def build_sweep(plan: ModelPlan, label: str, out: Path, random_rate: float | None = None) -> SweepSpec:
    """The SweepSpec of one flagship sweep; random_rate: the random sweep's offline request rate
    (the sweeps in RANDOM_RATE_SWEEPS need it)."""
    bench = WorkloadSpec(kind="bench", params=plan.bench)
    bench_len = {"max_model_len": bench_max_model_len(plan.bench)}
    rand = WorkloadSpec(kind="random", params=plan.random)
    served = {"served": {"num_workers": plan.served_workers, "log_dir": str(out / "server-logs")}}
    if label in RANDOM_RATE_SWEEPS and not (random_rate or 0) > 0:
        raise ValueError(f"{label} needs the random sweep's offline request rate")
    match label:
        case "bench":
            return _spec(plan, ["engine", "static", "static-max"], bench, bench_len)
        case "random":
            return _spec(plan, ["engine", "static"], rand, profile="sweep",
                         profile_params={"fractions": list(plan.fractions)})
        case "random-bursty":
            return _spec(plan, ["engine", "static"], replace(rand, burstiness=BURSTINESS, label=label),
                         profile="fixed", profile_params={"rates": [round(BURSTY_FRACTION * random_rate, 2)]})
        case "prefix":
            return _spec(plan, ["engine", "static"], WorkloadSpec(kind="prefix", params=plan.prefix))
        case "prefix-nocache":
            return _spec(plan, ["engine"], WorkloadSpec(kind="prefix", params=plan.prefix, label=label),
                         {"enable_prefix_caching": False})
        case "sharegpt-like":
            longest = longest_request(sharegpt_like, plan.sharegpt, ("max_total_len",))
            return _spec(plan, ["engine", "static", "static-max"],
                         WorkloadSpec(kind="sharegpt-like", params=plan.sharegpt), {"max_model_len": longest})
        case "hf":
            n = plan.hf_requests
            workload = WorkloadSpec(kind="bench", params={**plan.bench, "num_seqs": n}, label=f"bench-{n}")
            return _spec(plan, ["engine", "static", "hf"], workload, backend_args={"hf": {"batch_size": n}})
        case "served-bench":
            return _spec(plan, ["served"], bench, bench_len, backend_args=served)
        case "served-random":  # offline, and x1 at exactly the in-process x1 rate
            return _spec(plan, ["served"], rand, profile="sweep", backend_args=served,
                         profile_params={"fractions": [1.0], "base_rate": random_rate})
    raise ValueError(f"unknown flagship sweep {label!r}; valid: {', '.join(SWEEPS)}")


# ---- the run folder ----------------------------------------------------------------------------
def read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _record(out: Path, plan: ModelPlan, label: str, entry: dict[str, Any]) -> None:
    doc = read_manifest(out) or {"model": plan.model, "kv_blocks": plan.kv_blocks, "sweeps": {}}
    doc["sweeps"][label] = entry
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def random_offline_rate(out: Path) -> float | None:
    """The continuous engine's offline request rate on the random workload, from out/sweep.parquet."""
    if not (out / SWEEP_FILE).exists():
        return None
    sweep = pd.read_parquet(out / SWEEP_FILE, columns=["workload", "backend", "point", "request_throughput"])
    ref = sweep[(sweep["workload"] == "random") & (sweep["backend"] == "engine") & (sweep["point"] == "offline")]
    rate = float(ref["request_throughput"].iloc[-1]) if len(ref) else math.nan
    return rate if rate > 0 else None


def sweep_runs(out: Path, spec: SweepSpec) -> list[str]:
    """The run folders of this sweep already in out: its rows in sweep.parquet, and folders of
    its (workload, backend) pairs that no row names (left by a run that died)."""
    names = pd.read_parquet(out / SWEEP_FILE)[["workload", "backend", "run_dir"]] if (out / SWEEP_FILE).exists() \
        else pd.DataFrame(columns=["workload", "backend", "run_dir"])
    mine = names[(names["workload"] == spec.workload.name) & names["backend"].isin(spec.backends)]
    prefixes = tuple(f"{spec.workload.name}-{b}-" for b in spec.backends)
    orphans = [p.name for p in out.glob("*") if p.is_dir() and p.name.startswith(prefixes)
               and p.name not in set(names["run_dir"])] if out.is_dir() else []
    return [*mine["run_dir"], *orphans]


def check_labels(labels: Sequence[str]) -> None:
    unknown = [x for x in labels if x not in SWEEPS]
    if unknown or not labels:
        raise ValueError(f"unknown flagship sweep(s) {unknown or list(labels)}; valid: {', '.join(SWEEPS)}")


def check_selection(plan: ModelPlan, out: Path, labels: Sequence[str], redo: bool = False) -> None:
    """Refuse, before any model loads: unknown sweeps, a folder of another model or KV size,
    a sweep needing random's rate that neither this piece nor the folder has, a sweep already
    in the folder (unless redo), served sweeps without the server's modules."""
    check_labels(labels)
    doc = read_manifest(out)
    if doc is not None and (doc["model"], doc["kv_blocks"]) != (plan.model, plan.kv_blocks):
        raise ValueError(f"{out} holds a flagship of {doc['model']} at {doc['kv_blocks']} KV blocks, not "
                         f"{plan.model} at {plan.kv_blocks}: append pieces of one model and KV size only")
    if any(x in RANDOM_RATE_SWEEPS for x in labels) and "random" not in labels and random_offline_rate(out) is None:
        raise ValueError(f"{', '.join(x for x in labels if x in RANDOM_RATE_SWEEPS)} take the random sweep's "
                         f"offline rate: run `--only random` into {out} first, or add random to --only")
    present = {x: sweep_runs(out, build_sweep(plan, x, out, 1.0)) for x in labels}  # (identity only)
    present = {x: runs for x, runs in present.items() if runs}
    if present and not redo:
        raise ValueError(f"{out} already holds {', '.join(f'{x} ({len(r)} runs)' for x, r in present.items())}: "
                         "pass --redo to run them again in place, or pick another --out")
    if any(x in SERVED_SWEEPS for x in labels):
        from harness.backends.served import missing_server_modules

        missing = missing_server_modules()
        if missing:
            raise ValueError(f"the served sweeps start `python -m engine.serve`, which needs {', '.join(missing)}: "
                             "install them (pip install -e .[serve]) or put their wheels on PYTHONPATH")


def _clear(out: Path, spec: SweepSpec) -> None:
    runs = sweep_runs(out, spec)
    drop_sweep_rows(out, runs)
    for name in runs:
        shutil.rmtree(out / name, ignore_errors=True)


# ---- running ------------------------------------------------------------------------------
def estimates(plan: ModelPlan, labels: Sequence[str], out: Path) -> dict[str, float]:
    """Each sweep's estimated seconds (flagship_plans.estimate_s); a sweep whose rate comes from
    random uses the folder's measured rate if there is one, else the estimate's."""
    from harness.run import model_vocab_size

    vocab = model_vocab_size(plan.model)
    rate = random_offline_rate(out) or offline_rate_estimate(plan, build_sweep(plan, "random", out), vocab)
    return {x: estimate_s(plan, build_sweep(plan, x, out, rate), vocab) for x in labels}


def run_flagship(plan: ModelPlan, out: str | Path, labels: Sequence[str] = SWEEPS, redo: bool = False,
                 console: Console | None = None, **settings: Any) -> list[str]:
    """Run the sweeps `labels` (in SWEEPS order) into out, appending to what is there; returns
    the labels that failed (each recorded in out/flagship.json; the others ran)."""
    out, console = Path(out), console or Console(stderr=True)
    labels = [x for x in SWEEPS if x in labels]
    check_selection(plan, out, labels, redo)
    guess = estimates(plan, labels, out)
    console.print(f"flagship {plan.model} -> {out}: {', '.join(labels)}; estimate "
                  + ", ".join(f"{x} {s:.0f} s" for x, s in guess.items()) + f"; total {sum(guess.values()):.0f} s")
    failed = []
    for label in labels:
        rate = random_offline_rate(out) if label in RANDOM_RATE_SWEEPS else None
        start, error = time.perf_counter(), None
        try:
            spec = build_sweep(plan, label, out, rate)
            if redo:
                _clear(out, spec)
            run_sweep(replace(spec, **settings), out, console)
        except Exception as e:  # recorded and reported; the piece goes on with its other sweeps
            error = f"{type(e).__name__}: {e}"
            console.print(f"[bold red]FAILED[/] {label}: {error}", highlight=False)
            failed.append(label)
        seconds = time.perf_counter() - start
        _record(out, plan, label, {"status": "failed" if error else "ok", "seconds": round(seconds, 1),
                                   "estimate_s": round(guess[label]), "error": error,
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        console.print(f"{label}: {'FAILED' if error else 'ok'} in {seconds:.0f} s (estimate {guess[label]:.0f} s)")
    return failed


def estimate_lines(plan: ModelPlan, labels: Sequence[str], out: Path) -> list[str]:
    """The estimate of each selected sweep, then the plan's pieces as device commands."""
    from harness.studies.flagship_plans import PLANS

    guess = estimates(plan, SWEEPS, out)
    lines = [f"{plan.model}, {plan.kv_blocks} KV blocks: estimated seconds on {plan.device} (flagship_plans.py)"]
    lines += [f"  {x:<15} {guess[x]:>6.0f} s" for x in SWEEPS if x in labels]
    lines.append(f"  {'total':<15} {sum(guess[x] for x in labels):>6.0f} s")
    kv = f" --kv-blocks {plan.kv_blocks}" if plan.kv_blocks != PLANS[plan.model].kv_blocks else ""
    lines.append(f"pieces (one device call each; carry {out} from one call to the next):")
    for piece in plan.pieces:
        lines.append(f"  ~{sum(guess[x] for x in piece):.0f} s: PYTHONPATH=. python3 -m harness flagship --model "
                     f"{plan.model}{kv} --only {','.join(piece)} --out {out}")
    return lines
