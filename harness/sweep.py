"""Sweeps: several backends x the rate points of a profile, one report folder per point.

    spec = SweepSpec(backends=["engine", "static"], workload=WorkloadSpec(kind="random", params=...),
                     profile="sweep", profile_params={"fractions": [0.3, 0.6]})
    frame = run_sweep(spec, "reports/my-sweep")

At each point every backend replays the same requests (same seed, same arrivals). The profile
receives the summary of the first backend listed (the reference), so with the "sweep" profile
the rates are fractions of the reference's offline throughput, and every backend is measured
at the same rates. Layout:

    out_dir/<workload>-<backend>-<point>/   one report per run (harness/report.py)
    out_dir/sweep.parquet                   one row per run: labels + the summary row
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from harness.profiles import RatePoint, make_profile
from harness.report import SWEEP_FILE, append_sweep_summary
from harness.run import (
    RunSettings,
    RunSpec,
    check_backend,
    free_device_memory,
    make_backend,
    model_vocab_size,
    run_once,
    workload_tokenizer,
)


@dataclass(kw_only=True)
class SweepSpec(RunSettings):
    """The backends, the rate profile and per-backend options; the rest (RunSettings: workload,
    model, engine_args, SLOs, ...) is what each of its runs gets."""

    backends: list[str]
    profile: str = "sweep"
    profile_params: dict[str, Any] = field(default_factory=dict)
    backend_args: dict[str, dict[str, Any]] = field(default_factory=dict)  # backend name -> its args
    # Keep each backend across the points (Backend.reset between runs, e.g. the engine's prefix
    # cache) instead of building a fresh one per run: saves model loads and CUDA graph capture.
    reuse_backends: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.backends:
            raise ValueError("a sweep needs at least one backend")
        for name in [*self.backends, *self.backend_args]:
            check_backend(name)
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"backends listed twice: {self.backends}")
        make_profile(self.profile, **self.profile_params)  # fail now on a bad profile, not mid-sweep

    def run_spec(self, backend: str, rate: float) -> RunSpec:
        return RunSpec(**{**self.settings(), "workload": self.workload.with_rate(rate)}, backend=backend,
                       backend_args=self.backend_args.get(backend, {}))


def run_sweep(spec: SweepSpec, out_dir: str | Path, console: Console | None = None) -> pd.DataFrame:
    """Run every (point, backend); returns sweep.parquet as a DataFrame (all rows in it)."""
    out_dir, console = Path(out_dir), console or Console(stderr=True)
    vocab, tokenizer = model_vocab_size(spec.model), workload_tokenizer(spec.workload, spec.model)
    profile = make_profile(spec.profile, **spec.profile_params)
    point = next(profile)
    kept: dict[str, Any] = {}  # backend name -> a backend reused across points
    try:
        while True:
            requests = spec.workload.with_rate(point.rate).build(vocab, tokenizer=tokenizer)
            summaries = _run_point(spec, point, requests, out_dir, console, kept)
            try:
                point = profile.send(summaries[0])  # the reference backend's summary steers the profile
            except StopIteration:
                break
    finally:
        for backend in kept.values():
            backend.close()
        if kept:
            kept.clear()
            free_device_memory()  # the next sweep's engines, or a server process, get the memory
    return pd.read_parquet(out_dir / SWEEP_FILE)


def _run_point(spec: SweepSpec, point: RatePoint, requests: list, out_dir: Path,
               console: Console, kept: dict[str, Any]) -> list[dict[str, Any]]:
    summaries = []
    for backend in spec.backends:
        name = f"{spec.workload.name}-{backend}-{point.label}"
        labels = {"workload": spec.workload.name, "backend": backend, "point": point.label,
                  "rate": point.rate, "model": spec.model, "run_dir": name}
        console.print(f"[bold]{name}[/]: {len(requests)} requests at {_rate(point.rate)}")
        run_spec = spec.run_spec(backend, point.rate)
        summary = run_once(run_spec, out_dir / name, labels, requests, backend=_reused(spec, backend, kept))
        append_sweep_summary(out_dir, {**labels, **summary})
        console.print(f"  {_one_line(summary)}")
        summaries.append(summary)
    return summaries


def _reused(spec: SweepSpec, backend: str, kept: dict[str, Any]) -> Any | None:
    """The kept backend for `backend`, reset for the next run (None: build one per run)."""
    if not spec.reuse_backends:
        return None
    if backend not in kept:
        kept[backend] = make_backend(backend, spec.model, spec.engine_args, **spec.backend_args.get(backend, {}))
    else:
        kept[backend].reset()
    return kept[backend]


def _rate(rate: float) -> str:
    return "t=0 (offline)" if math.isinf(rate) else f"{rate:.2f} req/s"


def _one_line(s: dict[str, Any]) -> str:
    def fmt(v: Any, unit: str) -> str:
        return "n/a" if v is None else f"{v:,.1f}{unit}"

    return (f"{s['num_ok']}/{s['num_requests']} ok, {fmt(s['output_throughput'], ' tok/s')}, "
            f"TTFT p50 {fmt(s.get('p50_ttft_ms'), ' ms')}, TPOT p50 {fmt(s.get('p50_tpot_ms'), ' ms')}, "
            f"KV waste {fmt(None if s['kv_waste_mean'] is None else 100 * s['kv_waste_mean'], '%')}")
