"""Server metrics for Prometheus, under vLLM's names and under our own.

Every family is exported twice: as `vllm:*` with a `model_name` label (what vLLM serves, so
Grafana dashboards, GuideLLM and other tools built for vLLM read this server unchanged) and as
the project's original unlabelled `llmbench_*` (harness/scrape.py and older reports read
those). Both come from the same numbers, so they always agree:

    vllm:num_requests_running / _waiting          llmbench_num_requests_running / _waiting
    vllm:kv_cache_usage_perc (0..1, vLLM's name)  llmbench_kv_cache_usage_ratio
    vllm:num_preemptions_total                    llmbench_num_preemptions_total
    vllm:prompt_tokens_total, generation_tokens_total, request_success_total{finished_reason}
    vllm:time_to_first_token_seconds              histograms, server side: from the request
    vllm:e2e_request_latency_seconds              being parsed to its first token / its end
    vllm:time_per_output_token_seconds            per request: (e2e - ttft) / (tokens - 1)
    vllm:inter_token_latency_seconds              per token: the gap between two arrivals of
                                                  a request's tokens at the API layer, shared
                                                  evenly by the tokens that arrived together

Ours alone (no vLLM equivalent): llmbench_engine_steps_total, _step_seconds_total,
_scheduled_seqs_total and _scheduled_tokens_total, so a client reads a served engine's mean step
time and batch from two scrapes, as the in-process runs read them from their step records.

The text is written by prometheus_client's exposition from a collector of this app's own
`CollectorRegistry` (several apps live in one test process: never the global registry). The
numbers themselves are plain counters on this object: handlers update them on the server's
event loop, one thread, so they need no lock; the engine gauges come from the `EngineSnapshot`
the engine publishes after its steps. With several API server processes each counts its own
requests and responses; the engine gauges are the one engine's.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from engine.serve.engine_client import EngineSnapshot

PREFIX = "llmbench_"
VLLM_PREFIX = "vllm:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# per-token times are much shorter than request latencies (a decode step of a small model on
# a GPU is a few ms)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                   0.75, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last is +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.total += value * times
        self.count += times

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            running += n
            out.append((bound, running))
        return out


@dataclass
class ServerMetrics:
    model_name: str = ""  # the vllm:* families' model_name label: the served model name
    known_paths: frozenset[str] = frozenset()  # other paths count as "other": bounded label values
    responses: Counter[tuple[str, int]] = field(default_factory=Counter)  # (path, status) -> n
    finished: Counter[str] = field(default_factory=Counter)  # finish_reason -> n
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft_s: Histogram = field(default_factory=Histogram)
    e2e_s: Histogram = field(default_factory=Histogram)
    tpot_s: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS_S))
    itl_s: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS_S))
    registry: CollectorRegistry = field(init=False)

    def __post_init__(self) -> None:
        self._collector = _Collector(self)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self._collector)

    def count_response(self, path: str, status: int) -> None:
        self.responses[(path if path in self.known_paths else "other", status)] += 1

    def observe_tokens(self, gap_s: float, num_tokens: int) -> None:
        """`num_tokens` tokens of one request arrived `gap_s` after its previous ones."""
        if num_tokens > 0:
            self.itl_s.observe(gap_s / num_tokens, num_tokens)

    def observe_request(self, prompt_tokens: int, output_tokens: int, finish_reason: str | None,
                        ttft_s: float | None, e2e_s: float) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += output_tokens
        self.finished[finish_reason or "none"] += 1
        if ttft_s is not None:
            self.ttft_s.observe(ttft_s)
            if output_tokens > 1:
                self.tpot_s.observe((e2e_s - ttft_s) / (output_tokens - 1))
        self.e2e_s.observe(e2e_s)

    def render(self, snap: EngineSnapshot, num_unstarted: int) -> str:
        self._collector.view = (snap, num_unstarted)
        return generate_latest(self.registry).decode("utf-8")

    def families(self, snap: EngineSnapshot, num_unstarted: int) -> Iterator[Metric]:
        yield from self._vllm_families(snap)
        yield from self._own_families(snap, num_unstarted)

    def _vllm_families(self, snap: EngineSnapshot) -> Iterator[Metric]:
        label = [self.model_name]

        def one(kind: type[Metric], name: str, help_: str, value: float) -> Metric:
            family = kind(VLLM_PREFIX + name, help_, labels=["model_name"])
            family.add_metric(label, value)
            return family

        yield one(GaugeMetricFamily, "num_requests_running", "Requests in the engine's running batch.",
                  snap.num_running)
        yield one(GaugeMetricFamily, "num_requests_waiting", "Requests in the engine scheduler's waiting queue.",
                  snap.num_waiting)
        yield one(GaugeMetricFamily, "kv_cache_usage_perc", "KV-cache usage: blocks used / total (0..1).",
                  snap.kv_usage)
        yield one(CounterMetricFamily, "num_preemptions", "Sequences preempted (recomputed later).",
                  snap.num_preemptions)
        yield one(CounterMetricFamily, "prompt_tokens", "Prompt tokens of finished requests.", self.prompt_tokens)
        yield one(CounterMetricFamily, "generation_tokens", "Tokens generated (all requests, aborted ones too).",
                  self.generation_tokens)
        success = CounterMetricFamily(VLLM_PREFIX + "request_success", "Finished requests by finish reason.",
                                      labels=["model_name", "finished_reason"])
        for reason, n in sorted(self.finished.items()):
            success.add_metric([self.model_name, reason], n)
        yield success
        for name, hist, help_ in self._histograms():
            family = HistogramMetricFamily(VLLM_PREFIX + name, help_, labels=["model_name"])
            family.add_metric(label, hist.cumulative(), hist.total)
            yield family

    def _own_families(self, snap: EngineSnapshot, num_unstarted: int) -> Iterator[Metric]:
        gauges = [
            ("num_requests_running", "Requests in the engine's running batch.", snap.num_running),
            ("num_requests_waiting", "Requests in the engine scheduler's waiting queue.", snap.num_waiting),
            ("num_requests_unstarted", "Accepted requests with no token yet (what max_waiting limits).",
             num_unstarted),
            ("kv_blocks_used", "KV cache blocks in use.", snap.kv_blocks_used),
            ("kv_blocks_total", "Usable KV cache blocks.", snap.kv_blocks_total),
            ("kv_cache_usage_ratio", "KV blocks used / total (0..1).", snap.kv_usage),
        ]
        for name, help_, value in gauges:
            yield GaugeMetricFamily(PREFIX + name, help_, value=value)
        counters = [
            ("engine_steps_total", "Engine steps run.", snap.num_steps),
            ("engine_step_seconds_total", "Wall time of the engine steps, summed (per step: over the "
             "steps counter).", snap.step_seconds),
            ("engine_scheduled_seqs_total", "Sequences in each step's batch, summed (mean batch: over the "
             "steps counter).", snap.scheduled_seqs),
            ("engine_scheduled_tokens_total", "Prefill + decode tokens of each step, summed.", snap.scheduled_tokens),
            ("num_preemptions_total", "Sequences preempted (recomputed later).", snap.num_preemptions),
            ("prompt_tokens_total", "Prompt tokens of finished requests.", self.prompt_tokens),
            ("generation_tokens_total", "Tokens generated (all requests, aborted ones too).",
             self.generation_tokens),
        ]
        for name, help_, value in counters:
            yield CounterMetricFamily(PREFIX + name, help_, value=value)
        finished = CounterMetricFamily(PREFIX + "request_finished", "Generation requests by finish reason.",
                                       labels=["finish_reason"])
        for reason, n in sorted(self.finished.items()):
            finished.add_metric([reason], n)
        yield finished
        responses = CounterMetricFamily(PREFIX + "http_responses", "HTTP responses by path and status code.",
                                        labels=["path", "code"])
        for (path, code), n in sorted(self.responses.items()):
            responses.add_metric([path, str(code)], n)
        yield responses
        for name, hist, help_ in self._histograms():
            family = HistogramMetricFamily(PREFIX + name, help_)
            family.add_metric([], hist.cumulative(), hist.total)
            yield family

    def _histograms(self) -> list[tuple[str, Histogram, str]]:
        return [
            ("time_to_first_token_seconds", self.ttft_s, "Server-side TTFT: parsed -> first token."),
            ("e2e_request_latency_seconds", self.e2e_s, "Server-side latency: parsed -> finished."),
            ("time_per_output_token_seconds", self.tpot_s,
             "Per request: (e2e - TTFT) / (output tokens - 1), requests of 2+ tokens."),
            ("inter_token_latency_seconds", self.itl_s,
             "Per token after the first: gap between arrivals of a request's tokens at the API layer."),
        ]


class _Collector:
    """What the registry collects: the metrics' families for the latest engine view."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.view: tuple[EngineSnapshot, int] = (EngineSnapshot(), 0)

    def collect(self) -> Iterator[Metric]:
        return self.metrics.families(*self.view)
