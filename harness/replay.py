"""Replay one trace against one backend, with GPU telemetry sampled on the same clock.

    result = replay(backend, requests, ReplayOptions(timed=True), telemetry=True)
    result.run.requests / .run.steps / .run.info     what the backend recorded
    result.telemetry, result.telemetry_status         NVML samples (empty without NVML) and why

t0 is taken here, just before the backend starts; every timestamp of the run (requests, steps,
telemetry) is ``time.perf_counter() - t0``. Requests without an id get "req-00000"-style ids.
The result holds exactly one record per trace request, in trace order: a backend that loses
one is a bug, and the row is filled in as an error (and a warning is raised) rather than
silently dropped from the report; a record left "pending" becomes an error too.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from harness.backends.base import Backend, ReplayOptions, RunResult
from harness.records import RequestRecord, TelemetrySample
from harness.telemetry import TelemetrySampler
from workloads.trace import TraceRequest, with_request_ids


@dataclass
class ReplayResult:
    run: RunResult
    telemetry: list[TelemetrySample] = field(default_factory=list)
    telemetry_status: dict[str, Any] = field(default_factory=dict)


def replay(backend: Backend, requests: Sequence[TraceRequest], options: ReplayOptions | None = None,
           telemetry: bool = True, gpu_indices: Sequence[int] = (0,), interval_s: float = 0.1,
           scraper: Any | None = None) -> ReplayResult:
    """Run ``requests`` through ``backend``; telemetry=False skips NVML entirely. A scraper
    (harness/scrape.py MetricsScraper) gets t0 and runs for the length of the backend's run."""
    options = options or ReplayOptions()
    if options.max_concurrency is not None and options.max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1 or None, got {options.max_concurrency}")
    if not requests:
        raise ValueError("the workload has no requests")
    requests = with_request_ids(requests)
    t0 = time.perf_counter()
    sampler = TelemetrySampler(gpu_indices, interval_s, t0) if telemetry else None
    if scraper is not None:
        scraper.t0 = t0
    with sampler if sampler is not None else nullcontext(), scraper if scraper is not None else nullcontext():
        run = backend.run(requests, t0, options)
    run.requests = _complete(run.requests, requests, options)
    status = sampler.status() if sampler is not None else {"nvml_available": None, "disabled": True}
    return ReplayResult(run, sampler.samples if sampler is not None else [], status)


def _complete(records: list[RequestRecord], requests: list[TraceRequest],
              options: ReplayOptions) -> list[RequestRecord]:
    """One record per request, in trace order; missing ones become errors."""
    by_id = {r.request_id: r for r in records}
    missing = [r.request_id for r in requests if r.request_id not in by_id]
    if missing:
        warnings.warn(f"backend returned no record for {len(missing)} request(s), e.g. {missing[:3]}", stacklevel=3)
    out = []
    for req in requests:
        rec = by_id.get(req.request_id)
        if rec is None:
            rec = RequestRecord(req.request_id, req.arrival_s if options.timed else 0.0, status="error",
                                error="backend returned no record for this request", prefix_group=req.prefix_group)
        elif rec.status == "pending":  # the backend returned without finishing it (not_sent stays)
            rec.status, rec.error = "error", rec.error or "request did not finish before the run ended"
        out.append(rec)
    return out
