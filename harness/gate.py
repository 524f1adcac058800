"""Regression gate: compare a run (or sweep) with a committed baseline; fail past a threshold.

The gated figures are *ratios measured in the same run*: e.g. continuous / static output
throughput at the same sweep point. Both sides ran on the same machine minutes apart, so the
machine's speed cancels out, and a baseline written on a laptop gates a CI runner. A single
report (no second backend to divide by) is gated on its absolute figures instead, which is
only meaningful against a baseline from the same machine.

Baseline JSON (reports/baselines/*.json), written by ``write_baseline`` from a sweep:

    {"threshold": 0.1, "source": "...", "metrics": [
        {"workload": "bench", "point": "offline", "metric": "output_throughput",
         "numerator": "engine", "denominator": "static", "direction": "higher", "value": 1.52},
        {"workload": "bench", "point": "offline", "metric": "kv_waste_mean", "backend": "engine",
         "direction": "lower", "value": 0.08}, ...]}

Baselines carry where they were measured: "device" ({"name": "NVIDIA H200", "gpu_count": 1}),
"model" and "engine_config" (from the first source run). The gate refuses an ABSOLUTE metric
(a "backend" entry) when the baseline's device differs from the current run's: it fails with
a message naming both devices (ratios are still gated; --ratios-only leaves absolutes out).
Keep one baseline per device: reports/baselines/<device-slug>_<model>.json (device_slug()),
which `bench --gpu-gate` picks by the current GPU's name. Baselines from before the "device"
field are read through their "hardware" block.

A metric regresses when it is worse than value * (1 -/+ threshold) in its direction (higher or
lower is better); a figure missing from the current run fails too (it cannot be checked).
Thresholds: --threshold on the command line overrides all; else a metric's own "threshold"
(write_baseline gives the near-deterministic figures tight ones, METRIC_THRESHOLDS); else the
file's "threshold"; else 0.1.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from harness.report import FILES, SWEEP_FILE, load_report, read_metadata

DIRECTIONS = ("higher", "lower")
DEFAULT_THRESHOLD = 0.1
# What write_baseline gates by default: name -> which direction is better.
# (Offline, E2EL ratios add little to throughput and swing more; timed sweeps can add them,
# e.g. --metric p99_e2el_ms:lower.)
DEFAULT_METRICS: dict[str, str] = {"output_throughput": "higher", "kv_waste_mean": "lower", "num_steps": "lower"}
# Offline, num_steps depends on scheduling only (fixed output lengths): its ratio is the same
# on any machine, so it is gated tightly. KV waste is duration-weighted, so a little timing
# noise gets in. Timed figures use the baseline's threshold.
METRIC_THRESHOLDS: dict[str, float] = {"num_steps": 0.02, "kv_waste_mean": 0.25}


@dataclass(frozen=True)
class GateMetric:
    workload: str
    point: str
    metric: str
    direction: str
    value: float
    numerator: str | None = None  # ratio metrics: backend / backend
    denominator: str | None = None
    backend: str | None = None  # absolute metrics: one backend's figure
    threshold: float | None = None  # this metric's own tolerance (None: the baseline's)

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"{self.name}: direction {self.direction!r} is not one of {DIRECTIONS}")
        if (self.backend is None) == (self.numerator is None or self.denominator is None):
            raise ValueError(f"{self.name}: give either backend, or numerator and denominator")
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value)):
            raise ValueError(f"{self.name}: value must be a finite number, got {self.value!r}")

    @property
    def name(self) -> str:
        who = self.backend if self.backend is not None else f"{self.numerator}/{self.denominator}"
        return f"{self.workload}@{self.point} {who} {self.metric}"

    def measure(self, obs: pd.DataFrame) -> float | None:
        """This metric's value in an observation table (None when it cannot be computed)."""
        if self.backend is not None:
            return _lookup(obs, self.workload, self.point, self.backend, self.metric)
        num = _lookup(obs, self.workload, self.point, self.numerator, self.metric)
        den = _lookup(obs, self.workload, self.point, self.denominator, self.metric)
        return None if num is None or not den else num / den


@dataclass(frozen=True)
class Device:
    """Where figures were measured: the accelerator (or CPU) name and how many GPUs ran."""

    name: str
    gpu_count: int = 0

    @property
    def slug(self) -> str:
        return device_slug(self.name)

    def describe(self) -> str:
        return f"{self.name}" + (f" x{self.gpu_count}" if self.gpu_count > 1 else "")


_VENDOR_WORDS = {"nvidia", "amd", "intel", "geforce", "tesla", "instinct", "radeon", "r", "tm"}


def device_slug(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA H200" -> "h200", "NVIDIA A100-SXM4-80GB" -> "a100",
    "NVIDIA GeForce RTX 4090" -> "rtx4090": the model word, for baseline file names."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in _VENDOR_WORDS]
    if not words:
        return "unknown"
    if words[0].isalpha() and len(words) > 1:  # "rtx 4090", "epyc 7763"
        return words[0] + words[1]
    return words[0]


@dataclass
class GateResult:
    metric: GateMetric
    current: float | None
    limit: float
    ok: bool
    refused: str | None = None  # why the metric was not compared (e.g. another device)

    @property
    def change(self) -> float | None:
        return None if self.current is None or not self.metric.value else self.current / self.metric.value - 1


def _lookup(obs: pd.DataFrame, workload: str, point: str, backend: str, metric: str) -> float | None:
    if metric not in obs.columns:
        return None
    rows = obs[(obs["workload"] == workload) & (obs["point"] == point) & (obs["backend"] == backend)]
    if rows.empty or pd.isna(rows[metric].iloc[-1]):
        return None
    return float(rows[metric].iloc[-1])  # the last row wins if a point was re-run


# ---- observations ----------------------------------------------------------------------
def observations(path: str | Path) -> pd.DataFrame:
    """One row per run with workload/point/backend labels: a sweep.parquet, or a report."""
    path = Path(path)
    if (path / SWEEP_FILE).exists():
        return pd.read_parquet(path / SWEEP_FILE)
    if (path / FILES["summary"]).exists():
        report = load_report(path)
        config = report.metadata.get("config", {})
        labels = config.get("labels") or {}
        workload = config.get("workload") or {}
        row = {"workload": labels.get("workload") or workload.get("kind") or Path(workload.get("trace") or "trace").stem,
               "point": labels.get("point") or "run", "backend": labels.get("backend") or config.get("backend"),
               **report.summary_row()}
        return pd.DataFrame([row])
    raise ValueError(f"{path} is neither a sweep folder ({SWEEP_FILE}) nor a report folder ({FILES['summary']})")


# ---- baselines -------------------------------------------------------------------------
def baseline_metrics(obs: pd.DataFrame, metrics: dict[str, str] | None = None,
                     reference: str = "engine", absolute: dict[str, str] | None = None) -> list[GateMetric]:
    """Ratios reference/other backend at every (workload, point) where both ran; with one
    backend only (a single report), that backend's absolute figures. `absolute` metrics are
    the reference backend's own figures wherever it ran (e.g. roofline_efficiency: measured
    time against its bytes/bandwidth floor, already a ratio)."""
    metrics = metrics or DEFAULT_METRICS
    out = []
    for (workload, point), rows in obs.groupby(["workload", "point"], sort=False):
        backends = list(dict.fromkeys(rows["backend"]))
        pairs = [(reference, b) for b in backends if b != reference] if reference in backends else []
        candidates = [GateMetric(workload, point, m, d, 1.0, backend=reference)
                      for m, d in (absolute or {}).items() if reference in backends]
        for metric, direction in metrics.items():
            candidates += ([GateMetric(workload, point, metric, direction, 1.0, numerator=n, denominator=d)
                            for n, d in pairs] if len(backends) > 1
                           else [GateMetric(workload, point, metric, direction, 1.0, backend=b) for b in backends])
        for m in candidates:
            value = m.measure(obs)
            if value is not None and math.isfinite(value) and value > 0:
                out.append(GateMetric(**{**asdict(m), "value": value}))
    if not out:
        raise ValueError(f"nothing to gate: no run has {sorted(metrics)} (reference backend {reference!r})")
    return out


def write_baseline(currents: Sequence[str | Path], out: str | Path, metrics: dict[str, str] | None = None,
                   reference: str = "engine", threshold: float = DEFAULT_THRESHOLD,
                   absolute: dict[str, str] | None = None) -> Path:
    """Baseline JSON from one or more runs of the same sweep: each value is the median over
    the runs (a metric missing from any run is left out)."""
    per_run = [baseline_metrics(observations(c), metrics, reference, absolute) for c in currents]
    by_name = [{m.name: m for m in gated} for gated in per_run]
    common = [name for name in by_name[0] if all(name in run for run in by_name)]
    merged = [replace(by_name[0][name], value=statistics.median(run[name].value for run in by_name),
                      threshold=METRIC_THRESHOLDS.get(by_name[0][name].metric)) for name in common]
    context = run_context(currents[0])
    doc = {"description": "expected figures (ratios measured within one run), medians over the source "
                          "runs; written by `python -m harness gate --write-baseline`",
           "source": [str(c) for c in currents], "hardware": _hardware(currents[0]),
           "device": asdict(context["device"]) if context["device"] else None, "model": context["model"],
           "engine_config": context["engine_config"], "threshold": threshold,
           "metrics": [{k: v for k, v in asdict(m).items() if v is not None} for m in merged]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return out


def _first_report(path: str | Path) -> Path:
    path = Path(path)
    if (path / SWEEP_FILE).exists():
        path = path / pd.read_parquet(path / SWEEP_FILE, columns=["run_dir"])["run_dir"].iloc[0]
    return path / FILES["requests"]


def _hardware(path: str | Path) -> dict[str, Any] | None:
    """Where the baseline was measured (from the first run's report metadata), for people."""
    file = _first_report(path)
    return read_metadata(file).get("hardware") if file.exists() else None


def device_from(hardware: dict[str, Any] | None, engine_config: dict[str, Any] | None = None) -> Device | None:
    """The device of a run: its GPU unless the engine ran on the CPU, else the CPU model."""
    if not hardware:
        return None
    engine_config = engine_config or {}
    on_cpu = str(engine_config.get("device_type") or engine_config.get("device") or "").startswith("cpu")
    gpus = hardware.get("gpus") or []
    if gpus and not on_cpu:
        return Device(gpus[0], int(engine_config.get("tensor_parallel_size") or 1))
    return Device(hardware.get("cpu") or "cpu", 0)


def run_context(path: str | Path) -> dict[str, Any]:
    """device, model and engine config of the first run in a report or sweep folder."""
    file = _first_report(path)
    meta = read_metadata(file) if file.exists() else {}
    config = meta.get("config") or {}
    engine_config = (config.get("backend_info") or {}).get("engine_config") or config.get("engine_args")
    return {"device": device_from(meta.get("hardware"), engine_config), "model": config.get("model"),
            "engine_config": engine_config}


def baseline_device(path: str | Path) -> Device | None:
    """The device a baseline (JSON, or a report/sweep folder) was measured on; None if unknown."""
    path = Path(path)
    if path.is_dir():
        return run_context(path)["device"]
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(doc.get("device"), dict):
        return Device(**doc["device"])
    return device_from(doc.get("hardware"))


def device_baseline(device_name: str, model_slug: str, folder: str | Path = "reports/baselines") -> Path:
    """reports/baselines/<device-slug>_<model>.json for this device; a ValueError naming the
    expected file when there is none."""
    path = Path(folder) / f"{device_slug(device_name)}_{model_slug}.json"
    if not path.exists():
        known = sorted(p.name for p in Path(folder).glob(f"*_{model_slug}.json"))
        raise ValueError(f"no baseline for this device ({device_name}): expected {path} (baselines for other "
                         f"devices: {', '.join(known) or 'none'}); write one on this device with `llmbench gate "
                         f"--write-baseline {path} --current <run>`, or name one with --gate")
    return path


def load_baseline(path: str | Path) -> tuple[list[GateMetric], float | None]:
    """(metrics, the baseline's own threshold or None). A report or sweep folder also works:
    its figures become the baseline (e.g. to gate a run against another one)."""
    path = Path(path)
    if path.is_dir():
        return baseline_metrics(observations(path)), None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        metrics = [GateMetric(**m) for m in doc["metrics"]]
    except OSError as e:
        raise ValueError(f"cannot read baseline {path}: {e.strerror}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"baseline {path} is not a gate baseline JSON: {e}") from None
    return metrics, doc.get("threshold")


# ---- the gate ----------------------------------------------------------------------------
def cross_device(baseline: Device | None, current: Device | None) -> str | None:
    """Why absolute figures cannot be compared between these devices (None: they can)."""
    if baseline is None or current is None:
        unknown = "the baseline's" if baseline is None else "this run's"
        return f"{unknown} device is unknown: absolute figures are only gated on the device they were measured on"
    if (baseline.name, baseline.gpu_count) != (current.name, current.gpu_count):
        return (f"baseline measured on {baseline.describe()}, this run on {current.describe()}: absolute "
                f"figures do not carry across devices (gate ratios only with --ratios-only, or use "
                f"reports/baselines/{current.slug}_<model>.json)")
    return None


def check(metrics: list[GateMetric], obs: pd.DataFrame, threshold: float | None = None,
          default: float = DEFAULT_THRESHOLD, devices: tuple[Device | None, Device | None] | None = None,
          ratios_only: bool = False) -> list[GateResult]:
    """threshold (the CLI's --threshold) overrides every metric's own; default applies to
    metrics without one. devices (baseline's, current run's): absolute metrics across two
    different devices are refused (a failed result with the reason); ratios_only drops them."""
    for t in (threshold, default):
        if t is not None and not 0 <= t < 1:
            raise ValueError(f"threshold must be in [0, 1), got {t}")
    refusal = cross_device(*devices) if devices is not None else None
    results = []
    for m in metrics:
        if m.backend is not None and ratios_only:
            continue
        t = next(x for x in (threshold, m.threshold, default) if x is not None)
        current = m.measure(obs)
        limit = m.value * (1 - t) if m.direction == "higher" else m.value * (1 + t)
        if m.backend is not None and refusal is not None:
            results.append(GateResult(m, current, limit, False, refused=refusal))
            continue
        ok = current is not None and (current >= limit if m.direction == "higher" else current <= limit)
        results.append(GateResult(m, current, limit, ok))
    return results
