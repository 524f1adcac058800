"""The small protocol every backend implements (engine, static, static-max, hf, openai)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from harness.records import RequestRecord, StepRecord
from workloads.trace import TraceRequest

# The in-process engine's backends: the engine settings each name stands for (set by the
# backend, so --engine-arg may not override them).
ENGINE_BACKENDS: dict[str, dict[str, str]] = {
    "engine": {"scheduling_policy": "continuous"},
    "static": {"scheduling_policy": "static", "static_reservation": "max_tokens"},
    "static-max": {"scheduling_policy": "static", "static_reservation": "max_model_len"},
}


@dataclass
class ReplayOptions:
    timed: bool = True  # honour arrival_s; False = offline (everything at t=0)
    max_concurrency: int | None = None  # cap on requests in flight (None: no cap)
    progress: bool = True  # show a progress bar
    # Time-bounded run: no request is sent after this many seconds from t0; those left are
    # recorded with status "not_sent" (NOT_SENT_ERROR), never dropped. In-flight ones finish.
    duration_s: float | None = None

    def past_deadline(self, now_s: float) -> bool:
        return self.duration_s is not None and now_s >= self.duration_s


NOT_SENT = "not_sent"


def not_sent_error(options: ReplayOptions) -> str:
    return f"not sent: the run's duration of {options.duration_s:g} s ended first"


@dataclass
class RunResult:
    requests: list[RequestRecord]  # one per trace request, in trace order, failures included
    steps: list[StepRecord] = field(default_factory=list)  # engine-side steps, if the backend has them
    info: dict[str, Any] = field(default_factory=dict)  # backend facts for the report config


class Backend(Protocol):
    name: str

    def run(self, requests: list[TraceRequest], t0: float, options: ReplayOptions) -> RunResult:
        """Replay `requests`; every timestamp is `time.perf_counter() - t0`. Never raises for a
        single request's failure: that request's row gets status "error" and the error text."""
        ...

    def reset(self) -> None:
        """Ready for another run on the same backend (a sweep reusing it across its points):
        drop state an earlier run could leak into the next, e.g. an engine's prefix cache."""
        ...

    def close(self) -> None: ...
