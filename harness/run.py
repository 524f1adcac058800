"""One benchmark run: build a backend by name, build the workload, replay, write the report.

    spec = RunSpec(backend="engine", model="tiny", workload=WorkloadSpec(kind="smoke"))  # workloads.spec
    summary = run_once(spec, "reports/smoke-engine")         # the summary row (a dict)

Backends by name (BACKENDS): engine (continuous batching), static (the static-batching
baseline on the same engine), hf (transformers generate), openai (any OpenAI-compatible
endpoint; backend_args base_url=..., the model name is sent as is), served (this engine behind
its own server, started for the run with the same model and engine_args, through the openai
backend: harness/backends/served.py). Each run gets a fresh backend: no prefix cache or
allocator state leaks from one run into the next.

The report config (Parquet metadata) holds the backend, model, the engine's config fields,
the workload spec, replay options, telemetry status and any labels the caller adds (a sweep
adds its point).

Measurement settings (RunSettings): ``warmup``/``cooldown`` (harness/window.py: flagged in
requests.parquet, left out of the summary), ``duration_s`` (nothing is sent after it; the
requests left get status "not_sent", in-flight ones finish), ``percentiles`` (the summary's
pNN columns) and, for the openai backend, ``scrape_interval_s`` (the server's /metrics into
server_metrics.parquet, harness/scrape.py).
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.backends.base import ENGINE_BACKENDS, Backend, ReplayOptions
from harness.metrics import PERCENTILES, Slos, check_percentiles, steady_window
from harness.replay import ReplayResult, replay
from harness.report import requests_frame, steps_frame, write_report
from harness.window import Bound, flag_window
from workloads.spec import WorkloadSpec
from workloads.trace import TraceRequest


# ---- backends ------------------------------------------------------------------------------
def _engine_backend(name: str) -> Callable[..., Backend]:
    def build(model: str, engine_args: dict, **kw: Any) -> Backend:
        from harness.backends.engine import EngineBackend

        return EngineBackend(model, name, **engine_args, **kw)

    return build


def _hf(model: str, engine_args: dict, **kw: Any) -> Backend:
    from harness.backends.hf import HFBackend

    return HFBackend(model, **kw)  # engine_args do not apply to transformers


def _openai(model: str, engine_args: dict, **kw: Any) -> Backend:
    from harness.backends.openai import OpenAIBackend  # imported lazily: another module's deps

    return OpenAIBackend(model=model, **kw)


def _served(model: str, engine_args: dict, **kw: Any) -> Backend:
    from harness.backends.served import ServedBackend

    return ServedBackend(model, engine_args, **kw)


BACKENDS: dict[str, Callable[..., Backend]] = {
    **{name: _engine_backend(name) for name in ENGINE_BACKENDS}, "hf": _hf, "openai": _openai, "served": _served}
# Backends that run this engine (in process, or behind its own server): they take engine_args.
ENGINE_ARG_BACKENDS = (*ENGINE_BACKENDS, "served")


def check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")


class BackendConfigError(ValueError):
    """A backend refused its configuration (raised while building it, before any request)."""


def make_backend(name: str, model: str = "tiny", engine_args: dict | None = None, **backend_args: Any) -> Backend:
    """A backend by name; unknown names raise ValueError listing the valid ones."""
    check_backend(name)
    try:
        return BACKENDS[name](model, dict(engine_args or {}), **backend_args)
    except (ValueError, TypeError) as e:
        raise BackendConfigError(f"backend {name!r}: {e}") from e


def backend_options(name: str, args: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """The options in ``args`` that backend ``name``'s constructor takes, checked before any
    model is loaded. strict: an option it does not take is a ValueError (else dropped: a sweep
    hands one set of options to several backends)."""
    check_backend(name)
    if name in ENGINE_BACKENDS:
        from harness.backends.engine import EngineBackend as cls
    elif name == "hf":
        from harness.backends.hf import HFBackend as cls
    elif name == "served":
        from harness.backends.served import ServedBackend as cls
    else:
        try:
            from harness.backends.openai import OpenAIBackend as cls
        except ImportError as e:
            raise ValueError(f"the openai backend is unavailable: {e}") from None
    params = {k: v for k, v in inspect.signature(cls).parameters.items() if k not in ("model", "name", "engine_args")}
    missing = [k for k, v in params.items() if v.default is v.empty and v.kind is v.POSITIONAL_OR_KEYWORD
               and k not in args]
    if missing:
        raise ValueError(f"backend {name!r} needs " + ", ".join(f"--backend-arg {k}=..." for k in missing))
    if name not in ENGINE_BACKENDS and any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(args)  # it takes anything: let the constructor judge
    valid = [k for k, v in params.items() if v.kind is not v.VAR_KEYWORD]
    unknown = sorted(set(args) - set(valid))
    if unknown and strict:
        raise ValueError(f"unknown --backend-arg {unknown} for backend {name!r}; valid: {', '.join(valid)}")
    return {k: v for k, v in args.items() if k in valid}


def model_vocab_size(model: str) -> int | None:
    """The vocabulary of a preset or checkpoint dir (None for another served model name: the
    generators' defaults then apply)."""
    from engine.config import EngineConfig

    try:
        return EngineConfig(model=model).model_config.vocab_size
    except ValueError:
        return None


def workload_tokenizer(workload: WorkloadSpec, model: str) -> Any:
    """The tokenizer a dataset workload sizes its prompts with (None for other workloads):
    workload.tokenizer, else the model's; a preset name gives the presets' byte tokenizer."""
    if workload.dataset is None:
        return None
    from engine.config import PRESETS
    from engine.tokenizer import build_byte_tokenizer

    name = workload.tokenizer or model
    if name in PRESETS:
        return build_byte_tokenizer()
    if not Path(name).is_dir():
        raise ValueError(f"tokenizer {name!r} is neither a preset ({', '.join(PRESETS)}) nor a local "
                         "directory: pass --tokenizer DIR")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def build_workload(workload: WorkloadSpec, model: str) -> list[TraceRequest]:
    """The workload's requests for this model (its vocabulary, or its tokenizer for datasets)."""
    return workload.build(model_vocab_size(model), tokenizer=workload_tokenizer(workload, model))


# ---- one run -------------------------------------------------------------------------------
@dataclass(kw_only=True)
class RunSettings:
    """What every run of a spec shares (a RunSpec is one run; a SweepSpec runs several backends
    at several rates with the same settings)."""

    workload: WorkloadSpec
    model: str = "tiny"
    max_concurrency: int | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    slos: Slos = field(default_factory=Slos)
    telemetry: bool = True
    bandwidth_bytes_per_s: float | None = None  # for the roofline; None: no roofline figure
    progress: bool = True
    warmup: Bound = field(default_factory=Bound)  # left out of the summary, flagged in the Parquet
    cooldown: Bound = field(default_factory=Bound)
    duration_s: float | None = None  # time-bounded run: nothing is sent after this
    percentiles: tuple[float, ...] = PERCENTILES
    scrape_interval_s: float | None = 0.5  # openai backend: the server's /metrics period; None: off

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.duration_s is not None and not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            raise ValueError(f"duration must be a finite number of seconds > 0, got {self.duration_s}")
        if self.scrape_interval_s is not None and not self.scrape_interval_s > 0:
            raise ValueError(f"the scrape interval must be > 0 s, got {self.scrape_interval_s}")
        self.percentiles = check_percentiles(self.percentiles)

    def settings(self) -> dict[str, Any]:
        """The RunSettings fields of this spec, by name (not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(RunSettings)}


@dataclass(kw_only=True)
class RunSpec(RunSettings):
    backend: str
    backend_args: dict[str, Any] = field(default_factory=dict)  # e.g. hf batch_size, openai base_url

    def __post_init__(self) -> None:
        super().__post_init__()
        check_backend(self.backend)

    def gpu_indices(self) -> list[int]:
        """NVML indices to sample: one per tensor-parallel rank of this engine (in process or served)."""
        tp = self.engine_args.get("tensor_parallel_size", 1) if self.backend in ENGINE_ARG_BACKENDS else 1
        return list(range(tp))


def run_once(spec: RunSpec, out_dir: str | Path, labels: dict[str, Any] | None = None,
             requests: list[TraceRequest] | None = None, backend: Backend | None = None) -> dict[str, Any]:
    """Build the backend, replay the workload (or the given requests), write the report into
    out_dir, close the backend; returns the summary row. A `backend` passed in is used as is
    and left open (a sweep reusing one backend across its points)."""
    if requests is None:
        requests = build_workload(spec.workload, spec.model)
    owned = backend is None
    if owned:
        backend = make_backend(spec.backend, spec.model, spec.engine_args, **spec.backend_args)
    try:
        rate = spec.workload.rate
        options = ReplayOptions(timed=rate is None or math.isfinite(rate), max_concurrency=spec.max_concurrency,
                                progress=spec.progress, duration_s=spec.duration_s)
        scraper = _scraper(spec, backend)
        result = replay(backend, requests, options, telemetry=spec.telemetry, gpu_indices=spec.gpu_indices(),
                        scraper=scraper)
        flag_window(result.run.requests, spec.warmup, spec.cooldown)
        roofline = _roofline_bytes(backend, result, spec.bandwidth_bytes_per_s)
    finally:
        if owned:
            backend.close()
    del backend  # the last reference here: its device memory can go before the next run builds one
    if owned:
        free_device_memory()
    config = {"backend": spec.backend, "model": spec.model, "workload": spec.workload.describe(),
              "options": dataclasses.asdict(options), "engine_args": spec.engine_args,
              "backend_args": spec.backend_args, "backend_info": result.run.info,
              "telemetry": result.telemetry_status, "labels": labels or {},
              "window": {"warmup": spec.warmup.describe(), "cooldown": spec.cooldown.describe()},
              "server_metrics": scraper.status() if scraper is not None else None}
    report = write_report(out_dir, result.run.requests, result.run.steps, result.telemetry, config,
                          slos=spec.slos, roofline_bytes=roofline,
                          bandwidth_bytes_per_s=spec.bandwidth_bytes_per_s if roofline else None,
                          percentiles=spec.percentiles,
                          server_metrics=scraper.frame() if scraper is not None else None)
    return report.summary_row()


def _scraper(spec: RunSpec, backend: Backend):
    """A /metrics scraper of the server an openai or served run talks to (None: another
    backend, or off)."""
    url = spec.backend_args.get("base_url") if spec.backend == "openai" else getattr(backend, "base_url", None)
    if spec.backend not in ("openai", "served") or spec.scrape_interval_s is None or url is None:
        return None
    from harness.scrape import MetricsScraper

    return MetricsScraper(url, 0.0, spec.scrape_interval_s)


def free_device_memory() -> None:
    """Return what the caching allocator holds to the device (a server process on the same GPU
    may need it next)."""
    gc.collect()
    torch = sys.modules.get("torch")  # never import torch just for this (openai runs)
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _roofline_bytes(backend: Backend, result: ReplayResult, bandwidth: float | None) -> float | None:
    """Bytes the run had to move, for backends that report steps (engine, static)."""
    llm_engine = getattr(backend, "engine", None)
    if bandwidth is None or llm_engine is None or not result.run.steps:
        return None
    from harness.roofline import bytes_moved, weight_bytes

    cfg = llm_engine.config  # as it ran: device and dtype resolved
    weights = weight_bytes(cfg.model_config, cfg.torch_dtype.itemsize)
    steps = steps_frame(result.run.steps)
    window = steady_window(requests_frame(result.run.requests))
    if window is not None:  # the bytes of the steps the summary's duration covers
        steps = steps[(steps["end_s"] > window[0]) & (steps["start_s"] < window[1])]
    return bytes_moved(steps, weights, cfg.kv_bytes_per_token) if not steps.empty else None


def auto_bandwidth(engine_args: dict[str, Any]) -> float | None:
    """Measured copy bandwidth of the engine's device(s) on CUDA, times the tensor-parallel
    ranks; None on CPU (no roofline: the tiny model there is bound by host overhead)."""
    import torch

    device = engine_args.get("device", "auto")
    if device == "cpu" or not torch.cuda.is_available():
        return None
    from harness.roofline import measure_copy_bandwidth

    per_device = measure_copy_bandwidth("cuda" if device == "auto" else device)
    return per_device * engine_args.get("tensor_parallel_size", 1)
