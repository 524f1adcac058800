"""What a benchmark replays: a generator by name with its parameters, or a trace file, and how
its arrivals are timed. Used by harness.run / harness.sweep and the CLI; builds the requests
from workloads.generators and workloads.trace.

    WorkloadSpec(kind="bench", params={"num_seqs": 64}).build(vocab_size=512)
    WorkloadSpec(trace="my_trace.jsonl", rate=4.0)     # the trace re-timed as Poisson arrivals
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workloads.generators import GENERATORS, assign_arrivals, generate
from workloads.trace import TraceRequest, load_trace


@dataclass
class WorkloadSpec:
    """A generator (kind + params) or a trace file; rate/burstiness re-time the arrivals
    (None: the generator's default rate, or the trace's own arrival_s)."""

    kind: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    trace: str | None = None
    rate: float | None = None
    burstiness: float = 1.0
    seed: int = 0
    label: str | None = None  # the name in reports and sweep rows (default: kind or trace stem)

    def __post_init__(self) -> None:
        if (self.kind is None) == (self.trace is None):
            raise ValueError("give exactly one of a workload kind or a trace file")
        if self.kind is not None and self.kind not in GENERATORS:
            raise ValueError(f"unknown workload {self.kind!r}; valid workloads: {', '.join(GENERATORS)}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s (inf = offline), got {self.rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a finite number > 0 (1.0 = Poisson), got {self.burstiness}")

    @property
    def name(self) -> str:
        if self.label is not None:
            return self.label
        return self.kind if self.kind is not None else Path(self.trace).stem

    def build(self, vocab_size: int | None = None) -> list[TraceRequest]:
        """The requests; token-id generators get the model's vocab_size unless params set it."""
        if self.trace is not None:
            requests = load_trace(self.trace)
            return requests if self.rate is None else assign_arrivals(requests, self.rate, self.burstiness, self.seed)
        params = dict(self.params)
        accepted = inspect.signature(GENERATORS[self.kind]).parameters
        if vocab_size is not None and "vocab_size" in accepted:
            params.setdefault("vocab_size", vocab_size)
        if self.rate is not None:
            params.update(rate=self.rate, burstiness=self.burstiness)
        return generate(self.kind, **params)

    def with_rate(self, rate: float) -> WorkloadSpec:
        return dataclasses.replace(self, rate=rate)

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
