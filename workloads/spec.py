"""What a benchmark replays: a generator by name with its parameters, a trace file, or a
dataset source (workloads/datasets.py), and how its arrivals are timed. Used by harness.run /
harness.sweep and the CLI; builds the requests from workloads.generators, workloads.trace and
workloads.datasets.

    WorkloadSpec(kind="bench", params={"num_seqs": 64}).build(vocab_size=512)
    WorkloadSpec(trace="my_trace.jsonl", rate=4.0)     # the trace re-timed as Poisson arrivals
    WorkloadSpec(dataset="sharegpt", dataset_path="sg.json", params={"num_prompts": 100})
        .build(tokenizer=tok)       # datasets are sized with the model's tokenizer: the caller
                                    # loads it (harness.run.workload_tokenizer)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workloads.datasets import DATASETS, check_params, load_dataset
from workloads.generators import GENERATORS, assign_arrivals, generate
from workloads.trace import TraceRequest, load_trace


@dataclass
class WorkloadSpec:
    """A generator (kind + params), a trace file, or a dataset (+ dataset_path, params);
    rate/burstiness re-time the arrivals (None: the generator's or dataset's default rate, or the
    trace's own arrival_s). tokenizer names the dataset's tokenizer (a directory or a preset
    name; None: the model's) for the caller that loads it."""

    kind: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    trace: str | None = None
    rate: float | None = None
    burstiness: float = 1.0
    seed: int = 0
    label: str | None = None  # the name in reports and sweep rows (default: kind, dataset or trace stem)
    dataset: str | None = None
    dataset_path: str | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.kind, self.trace, self.dataset)) != 1:
            raise ValueError("give exactly one of a workload kind, a trace file or a dataset")
        if self.dataset is not None and self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid datasets: {', '.join(DATASETS)}")
        if self.dataset is None and (self.dataset_path is not None or self.tokenizer is not None):
            raise ValueError("dataset_path and tokenizer apply to dataset workloads only")
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
        if self.dataset is not None:
            return self.dataset
        return self.kind if self.kind is not None else Path(self.trace).stem

    def check(self) -> None:
        """Cheap checks of a dataset's parameters (unknown names, bad values), before any load."""
        if self.dataset is not None:
            check_params(self.dataset, self._dataset_params())

    def _dataset_params(self) -> dict[str, Any]:
        params = dict(self.params)
        if self.dataset_path is not None:
            params["path"] = self.dataset_path
        if self.rate is not None:
            params.update(rate=self.rate, burstiness=self.burstiness)
        return params

    def build(self, vocab_size: int | None = None, tokenizer: Any = None) -> list[TraceRequest]:
        """The requests; token-id generators get the model's vocab_size unless params set it;
        a dataset needs the tokenizer object (loaded by the caller)."""
        if self.dataset is not None:
            if tokenizer is None:
                raise ValueError(f"dataset {self.dataset!r} needs a tokenizer to size its prompts")
            return load_dataset(self.dataset, tokenizer, **self._dataset_params())
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
