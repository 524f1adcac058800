"""Server metrics in the Prometheus text exposition format (written by hand: a few counters,
gauges and histograms do not need prometheus_client).

Counters and histograms are updated by handlers on the server's event loop, one thread, so they
need no lock; the engine gauges come from the `EngineSnapshot` the engine publishes after its
steps (from the core process, in its per-step message). With several API server processes each
counts its own requests and responses; the engine gauges are the one engine's.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from engine.serve.engine_client import EngineSnapshot

PREFIX = "llmbench_"
LATENCY_BUCKETS_S = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last is +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return out + [f"{name}_sum {self.total!r}", f"{name}_count {self.count}"]


@dataclass
class ServerMetrics:
    known_paths: frozenset[str] = frozenset()  # other paths count as "other": bounded label values
    responses: Counter[tuple[str, int]] = field(default_factory=Counter)  # (path, status) -> n
    finished: Counter[str] = field(default_factory=Counter)  # finish_reason -> n
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft_s: Histogram = field(default_factory=Histogram)
    e2e_s: Histogram = field(default_factory=Histogram)

    def count_response(self, path: str, status: int) -> None:
        self.responses[(path if path in self.known_paths else "other", status)] += 1

    def observe_request(self, prompt_tokens: int, output_tokens: int, finish_reason: str | None,
                        ttft_s: float | None, e2e_s: float) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += output_tokens
        self.finished[finish_reason or "none"] += 1
        if ttft_s is not None:
            self.ttft_s.observe(ttft_s)
        self.e2e_s.observe(e2e_s)

    def render(self, snap: EngineSnapshot, num_unstarted: int) -> str:
        # (name, type, help, value): one unlabelled sample each
        scalars: list[tuple[str, str, str, object]] = [
            ("num_requests_running", "gauge", "Requests in the engine's running batch.", snap.num_running),
            ("num_requests_waiting", "gauge", "Requests in the engine scheduler's waiting queue.", snap.num_waiting),
            ("num_requests_unstarted", "gauge", "Accepted requests with no token yet (what max_waiting limits).",
             num_unstarted),
            ("kv_blocks_used", "gauge", "KV cache blocks in use.", snap.kv_blocks_used),
            ("kv_blocks_total", "gauge", "Usable KV cache blocks.", snap.kv_blocks_total),
            ("kv_cache_usage_ratio", "gauge", "KV blocks used / total (0..1).", repr(snap.kv_usage)),
            ("engine_steps_total", "counter", "Engine steps run.", snap.num_steps),
            ("num_preemptions_total", "counter", "Sequences preempted (recomputed later).", snap.num_preemptions),
            ("prompt_tokens_total", "counter", "Prompt tokens of requests the engine accepted.", self.prompt_tokens),
            ("generation_tokens_total", "counter", "Tokens generated (all requests, aborted ones too).",
             self.generation_tokens),
        ]
        lines: list[str] = []
        for name, kind, help_, value in scalars:
            lines += _header(name, kind, help_) + [f"{PREFIX}{name} {value}"]
        lines += _header("request_finished_total", "counter", "Generation requests by finish reason.")
        lines += [f'{PREFIX}request_finished_total{{finish_reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
        lines += _header("http_responses_total", "counter", "HTTP responses by path and status code.")
        lines += [f'{PREFIX}http_responses_total{{path="{_escape(p)}",code="{c}"}} {n}'
                  for (p, c), n in sorted(self.responses.items())]
        for name, hist, help_ in (("time_to_first_token_seconds", self.ttft_s, "Server-side TTFT: parsed -> first token."),
                                  ("e2e_request_latency_seconds", self.e2e_s, "Server-side latency: parsed -> finished.")):
            lines += _header(name, "histogram", help_) + hist.lines(PREFIX + name)
        return "\n".join(lines) + "\n"


def _header(name: str, kind: str, help_: str) -> list[str]:
    return [f"# HELP {PREFIX}{name} {help_}", f"# TYPE {PREFIX}{name} {kind}"]


def _escape(label: str) -> str:
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
