"""The CLI's commands: each validates an argparse namespace into one object in its constructor
(bad input raises ValueError: UsageError, TraceError, a spec's own check) and does the work in
``execute(console) -> exit status``. harness/cli.py builds the parser and calls them.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine.config import parse_value
from engine.config_args import UsageError, engine_kwargs, parse_pairs
from harness.backends.base import ENGINE_BACKENDS
from harness.metrics import Slos, check_percentiles
from harness.run import BACKENDS, ENGINE_ARG_BACKENDS, RunSpec
from harness.window import parse_bound
from workloads.chat import conversations
from workloads.spec import WorkloadSpec
from workloads.trace import load_trace

__all__ = ["COMMANDS", "UsageError", "parse_list", "parse_pairs", "parse_value"]


# ---- parsing helpers (K=V pairs: engine/config_args.py) ----------------------------------
def parse_list(text: str, flag: str, kind: Callable[[str], Any] = str) -> list[Any]:
    try:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} expects a comma-separated list, got {text!r}") from None
    if not items:
        raise UsageError(f"{flag} is empty")
    return items


# ---- validation: argparse namespace -> spec objects --------------------------------------
def workload_spec(ns: argparse.Namespace) -> WorkloadSpec:
    params = parse_pairs(ns.param, "--param")
    if ns.trace is not None:
        if params:
            raise UsageError("--param applies to generated workloads, not to --trace")
        # Fail now, with the file's row and field (or a conversation's turns), not after loading a model.
        conversations(load_trace(ns.trace))
    if ns.dataset is None and (ns.dataset_path is not None or ns.dataset_tokenizer is not None):
        raise UsageError("--dataset-path and --dataset-tokenizer go with --dataset")
    if ns.dataset is not None:
        # The engine's own --tokenizer (a directory) sizes the prompts too unless one is named.
        tokenizer = ns.dataset_tokenizer or getattr(ns, "tokenizer", None)
        spec = WorkloadSpec(dataset=ns.dataset, dataset_path=ns.dataset_path, tokenizer=tokenizer,
                            params=params, rate=ns.rate, burstiness=ns.burstiness, seed=ns.seed)
        spec.check()  # unknown or bad dataset parameters fail here, before any file is read
        return spec
    kind = None if ns.trace is not None else (ns.workload or "smoke")
    spec = WorkloadSpec(kind=kind, params=params, trace=ns.trace, rate=ns.rate, burstiness=ns.burstiness,
                        seed=ns.seed)
    if kind is not None:
        spec.build(vocab_size=None)  # unknown or bad generator parameters fail here (cheap)
    return spec


def engine_args(ns: argparse.Namespace, backends: Sequence[str], model: str) -> dict[str, Any]:
    args = engine_kwargs(ns)  # the engine flags and --engine-arg pairs
    if any(b in ENGINE_ARG_BACKENDS for b in backends):
        check_engine_args(args, model)
    return args


def check_engine_args(args: dict[str, Any], model: str) -> None:
    """Build the EngineConfig once (cheap: no model), so a bad field fails before any run."""
    from engine.config import EngineConfig

    unknown = sorted(set(args) - EngineConfig.field_names())
    if unknown:
        raise UsageError(f"unknown --engine-arg {unknown}; valid: {', '.join(sorted(EngineConfig.field_names()))}")
    fixed = sorted(set(args) & {k for settings in ENGINE_BACKENDS.values() for k in settings})
    if fixed:
        raise UsageError(f"--engine-arg {', '.join(fixed)} is set by the backend: choose --backend "
                         f"among {', '.join(ENGINE_BACKENDS)}")
    EngineConfig(model=model, **args)


def bandwidth(ns: argparse.Namespace, backends: Sequence[str], args: dict[str, Any]) -> float | None:
    """Bytes/s for the roofline figure (only the in-process engine reports the steps it needs)."""
    text = str(ns.bandwidth_gbps).lower()
    if text == "off" or not any(b in ENGINE_BACKENDS for b in backends):
        return None
    if text == "auto":
        from harness.run import auto_bandwidth

        return auto_bandwidth(args)
    value = parse_value(text)
    if not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise UsageError(f"--bandwidth-gbps must be a number > 0, 'auto' or 'off', got {ns.bandwidth_gbps!r}")
    return float(value) * 1e9


def parse_seconds(text: str, flag: str) -> float:
    """"90", "90s", "1.5m", "1h" -> seconds (> 0)."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([smh]?)", text.strip().lower())
    value = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)] if m else 0.0
    if not value > 0:
        raise UsageError(f"{flag} expects a duration > 0 such as 60, 60s or 2m, got {text!r}")
    return value


def measurement_spec(ns: argparse.Namespace) -> dict[str, Any]:
    """The steady-state window, deadline, percentiles and scrape period of run/sweep."""
    try:
        window = {"warmup": parse_bound(ns.warmup), "cooldown": parse_bound(ns.cooldown)}
    except ValueError as e:
        raise UsageError(f"--warmup/--cooldown: {e}") from None
    percentiles = parse_list(ns.percentiles, "--percentiles", float)
    try:
        check_percentiles(percentiles)
    except ValueError as e:
        raise UsageError(f"--percentiles: {e}") from None
    scrape = None if str(ns.scrape_interval).lower() == "off" else parse_seconds(ns.scrape_interval, "--scrape-interval")
    return {**window, "percentiles": tuple(percentiles), "scrape_interval_s": scrape,
            "duration_s": parse_seconds(ns.duration, "--duration") if ns.duration else None}


def common_spec(ns: argparse.Namespace, backends: Sequence[str]) -> dict[str, Any]:
    if ns.max_concurrency is not None and ns.max_concurrency < 1:
        raise UsageError(f"--max-concurrency must be >= 1, got {ns.max_concurrency}")
    if ns.threads is not None and ns.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {ns.threads}")
    args = engine_args(ns, backends, ns.model)
    return {"model": ns.model, "max_concurrency": ns.max_concurrency, "engine_args": args,
            "slos": Slos(ns.slo_ttft_ms, ns.slo_tpot_ms, ns.slo_e2el_ms), "telemetry": not ns.no_telemetry,
            "bandwidth_bytes_per_s": bandwidth(ns, backends, args), "progress": not ns.no_progress,
            **measurement_spec(ns)}


def _fresh_dir(out: str | None, default: str) -> Path:
    path = Path(out) if out else Path("reports") / time.strftime(f"{default}-%Y%m%d-%H%M%S")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--out {path} already exists and is not empty; pick a new folder")
    return path


def _metric_directions(specs: Sequence[str]) -> dict[str, str] | None:
    out = {}
    for spec in specs:
        name, _, direction = spec.partition(":")
        if direction not in ("higher", "lower") or not name:
            raise UsageError(f"--metric expects NAME:higher or NAME:lower, got {spec!r}")
        out[name] = direction
    return out or None


# ---- commands: one validated object each, with one entry point ---------------------------
class RunCommand:
    def __init__(self, ns: argparse.Namespace):
        from harness.run import backend_options

        workload = workload_spec(ns)
        backend_args = backend_options(ns.backend, parse_pairs(ns.backend_arg, "--backend-arg"))
        self.spec = RunSpec(backend=ns.backend, workload=workload, backend_args=backend_args,
                            **common_spec(ns, [ns.backend]))
        self.out = _fresh_dir(ns.out, f"{workload.name}-{ns.backend}")
        self.threads = ns.threads

    def execute(self, console) -> int:
        from harness.compare import load_runs, summary_table
        from harness.run import run_once

        _set_threads(self.threads)
        run_once(self.spec, self.out)
        console.print(summary_table(load_runs([self.out]), title=str(self.out), width=console.width))
        console.print(f"report: {self.out}")
        return 0


class SweepCommand:
    def __init__(self, ns: argparse.Namespace):
        from harness.run import backend_options
        from harness.sweep import SweepSpec

        backends = parse_list(ns.backends, "--backends")
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise UsageError(f"unknown backend(s) {unknown}; valid backends: {', '.join(BACKENDS)}")
        given = parse_pairs(ns.backend_arg, "--backend-arg")
        backend_args = {b: backend_options(b, given, strict=len(backends) == 1) for b in backends}
        taken = set().union(*backend_args.values())
        if set(given) - taken:
            raise UsageError(f"--backend-arg {sorted(set(given) - taken)} is taken by none of {backends}")
        params: dict[str, Any] = {}
        if ns.profile == "fixed":
            if not ns.rates:
                raise UsageError("--profile fixed needs --rates, e.g. --rates 1,2,4")
            params["rates"] = parse_list(ns.rates, "--rates", float)
        elif ns.fractions:
            params["fractions"] = parse_list(ns.fractions, "--fractions", float)
        self.spec = SweepSpec(backends=backends, workload=workload_spec(ns), profile=ns.profile,
                              profile_params=params, backend_args=backend_args,
                              **common_spec(ns, backends))
        self.out = _fresh_dir(ns.out, "sweep")
        self.threads = ns.threads

    def execute(self, console) -> int:
        from harness.compare import load_runs, summary_table, write_html
        from harness.sweep import run_sweep

        _set_threads(self.threads)
        run_sweep(self.spec, self.out)
        runs = load_runs([self.out])
        console.print(summary_table(runs, title=str(self.out), width=console.width))
        console.print(f"sweep: {self.out / 'sweep.parquet'}\nHTML:  {write_html(runs, self.out / 'compare.html')}")
        return 0


class CompareCommand:
    def __init__(self, ns: argparse.Namespace):
        from harness.compare import load_runs

        self.runs = load_runs(ns.reports)
        self.html = ns.html

    def execute(self, console) -> int:
        from harness.compare import summary_table, write_html

        console.print(summary_table(self.runs, width=console.width))
        console.print(f"HTML: {write_html(self.runs, self.html)}")
        return 0


class GateCommand:
    def __init__(self, ns: argparse.Namespace):
        from harness import gate

        self.current, self.write_to = ns.current, ns.write_baseline
        if len(self.current) > 1 and not self.write_to:
            raise UsageError("gate checks one --current run; several are for --write-baseline")
        self.observations = [gate.observations(c) for c in self.current]
        self.metrics_spec, self.reference = _metric_directions(ns.metric), ns.reference
        self.absolute = _metric_directions(ns.absolute)
        self.baseline, own_threshold = gate.load_baseline(ns.baseline) if ns.baseline else ([], None)
        self.devices = (gate.baseline_device(ns.baseline), gate.run_context(self.current[0])["device"]) \
            if ns.baseline else None
        self.ratios_only = ns.ratios_only
        self.threshold = ns.threshold  # None: each metric's own, then the baseline's
        self.default = own_threshold if own_threshold is not None else gate.DEFAULT_THRESHOLD
        for t in (self.threshold, self.default):
            if t is not None and not 0 <= t < 1:
                raise UsageError(f"threshold must be in [0, 1), got {t}")

    def execute(self, console) -> int:
        from harness import gate

        if self.write_to:
            path = gate.write_baseline(self.current, self.write_to, self.metrics_spec, self.reference,
                                       self.threshold if self.threshold is not None else gate.DEFAULT_THRESHOLD,
                                       self.absolute or None)
            console.print(f"baseline written: {path}")
            return 0
        results = gate.check(self.baseline, self.observations[0], self.threshold, self.default,
                             devices=self.devices, ratios_only=self.ratios_only)
        return _report_gate(console, results)


class BenchCommand:
    def __init__(self, ns: argparse.Namespace):
        from harness.bench import CI_PLAN, GPU_GATE_PLAN, default_plan, with_overrides

        if ns.ci and ns.gpu_gate:
            raise UsageError("--ci and --gpu-gate are two different plans: give one")
        plan = CI_PLAN if ns.ci else GPU_GATE_PLAN if ns.gpu_gate else default_plan()
        self.prefix = "ci" if ns.ci else "gpu-gate" if ns.gpu_gate else "bench"
        extra = engine_kwargs(ns)
        self.plan = with_overrides(plan, model=ns.model, threads=ns.threads,
                                   engine_args={**plan.engine_args, **extra}, hf=False if ns.no_hf else None)
        if self.plan.threads is not None and self.plan.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.plan.threads}")
        check_engine_args(self.plan.engine_args, self.plan.model)
        self.out_root, self.telemetry, self.progress = ns.out_root, not ns.no_telemetry, not ns.no_progress
        self.gate = ns.gate or (_gpu_gate_baseline() if ns.gpu_gate else None)
        if self.gate:
            from harness import gate

            self.baseline, own = gate.load_baseline(self.gate)  # a bad file fails now, not after the run
            self.default_threshold = own if own is not None else gate.DEFAULT_THRESHOLD

    def execute(self, console) -> int:
        from harness.bench import run_bench
        from harness.run import auto_bandwidth

        _set_threads(self.plan.threads)
        out = run_bench(self.plan, self.out_root, console, self.prefix, telemetry=self.telemetry,
                        progress=self.progress, bandwidth=auto_bandwidth(self.plan.engine_args))
        if not self.gate:
            return 0
        from harness import gate

        results = gate.check(self.baseline, gate.observations(out), None, self.default_threshold,
                             devices=(gate.baseline_device(self.gate), gate.run_context(out)["device"]))
        return _report_gate(console, results)


def _gpu_gate_baseline() -> str:
    """reports/baselines/<this GPU's slug>_qwen3.json (the GPU gate's model is qwen3-0.6b)."""
    import torch

    from harness import gate

    if not torch.cuda.is_available():
        raise UsageError("--gpu-gate needs a CUDA device (or name a baseline with --gate)")
    try:
        return str(gate.device_baseline(torch.cuda.get_device_name(0), "qwen3"))
    except ValueError as e:
        raise UsageError(str(e)) from None


class FlagshipCommand:
    """Validates everything before a model loads: the plan, the sweeps, the folder they append to."""

    def __init__(self, ns: argparse.Namespace):
        from dataclasses import replace

        from harness.studies import flagship
        from harness.studies.flagship_plans import PLANS

        self.ns = ns
        if ns.publish and ns.table:
            raise UsageError("--publish and --table are separate steps: give one")
        for path in (ns.publish, ns.table):
            if path and not Path(path).exists():
                raise UsageError(f"{path} does not exist")
        if ns.publish or ns.table:
            return
        if ns.model not in PLANS:
            raise UsageError(f"no flagship plan for {ns.model!r}; plans: {', '.join(PLANS)}")
        self.plan = PLANS[ns.model]
        if ns.kv_blocks is not None:
            if ns.kv_blocks < 2:
                raise UsageError(f"--kv-blocks must be >= 2, got {ns.kv_blocks}")
            self.plan = replace(self.plan, kv_blocks=ns.kv_blocks)
        self.labels = parse_list(ns.only, "--only") if ns.only else \
            [x for x in flagship.SWEEPS if not (ns.no_hf and x == "hf")]
        self.out = Path(ns.out) if ns.out else \
            Path(ns.out_root) / time.strftime(f"flagship-{self.plan.model}-%Y%m%d-%H%M%S")
        flagship.check_labels(self.labels)
        if not ns.estimate:
            flagship.check_selection(self.plan, self.out, self.labels, ns.redo)  # ValueError: exit 2

    def execute(self, console) -> int:
        from harness.studies import flagship, flagship_publish

        ns = self.ns
        if ns.table:
            import pandas as pd

            sweep = pd.read_parquet(ns.table)
            console.print(flagship_publish.headline_table(sweep), markup=False, soft_wrap=True)
            console.print("\n".join(flagship_publish.ratio_lines(sweep)), markup=False)
            return 0
        if ns.publish:
            console.print(f"published: {flagship_publish.publish(ns.publish, ns.dest)}")
            return 0
        if ns.estimate:
            console.print("\n".join(flagship.estimate_lines(self.plan, self.labels, self.out)), markup=False,
                          soft_wrap=True)
            return 0
        from harness.run import auto_bandwidth

        failed = flagship.run_flagship(self.plan, self.out, self.labels, ns.redo, console,
                                       telemetry=not ns.no_telemetry, progress=not ns.no_progress,
                                       bandwidth_bytes_per_s=auto_bandwidth(self.plan.engine_args))
        return _report_flagship(console, self.out, failed)


def _report_flagship(console, out: Path, failed: list[str]) -> int:
    """The accounting of the whole folder; 1 if a sweep failed or any request was not ok."""
    import pandas as pd

    from harness.report import SWEEP_FILE
    from harness.studies.flagship_publish import accounting_lines

    sweep = pd.read_parquet(out / SWEEP_FILE) if (out / SWEEP_FILE).exists() else None
    console.print("\n".join(accounting_lines(sweep)) if sweep is not None else "no run finished", markup=False)
    if failed:
        console.print(f"[bold red]failed sweeps[/]: {', '.join(failed)} (see {out / 'flagship.json'})")
    console.print(f"flagship folder: {out}")
    not_ok = sweep is not None and bool((sweep["num_ok"] != sweep["num_requests"]).any())
    return 1 if failed or not_ok else 0


COMMANDS = {"run": RunCommand, "sweep": SweepCommand, "compare": CompareCommand, "gate": GateCommand,
            "bench": BenchCommand, "flagship": FlagshipCommand}


def _report_gate(console, results) -> int:
    console.print(_gate_table(results))
    failed = [r for r in results if not r.ok]
    for reason in dict.fromkeys(r.refused for r in results if r.refused):
        console.print(f"[red]refused[/]: {reason}", markup=True, highlight=False)
    console.print(f"gate {'FAILED' if failed else 'passed'}: {len(results) - len(failed)}/{len(results)} ok")
    return 1 if failed else 0


def _gate_table(results):
    from rich.table import Table

    table = Table(title="gate")
    for col in ("metric", "better", "baseline", "current", "change", "allowed", "result"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for r in results:
        cur = "missing" if r.current is None else f"{r.current:.4g}"
        change = "" if r.change is None else f"{r.change:+.1%}"
        table.add_row(r.metric.name, r.metric.direction, f"{r.metric.value:.4g}", cur, change,
                      f"{r.limit / r.metric.value - 1:+.0%}" if r.metric.value else "",
                      "[green]ok[/]" if r.ok else "[red]REFUSED[/]" if r.refused else "[red]REGRESSED[/]")
    return table


def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


