"""A background scraper of a server's Prometheus /metrics, on the run's clock.

    with MetricsScraper("http://127.0.0.1:8000", t0, interval_s=0.5) as scraper:
        ...                                   # the run
    frame = scraper.frame()                   # -> run_dir/server_metrics.parquet
    server_summary(frame, window=(t_start, t_end)) -> {"server_queue_mean": ..., ...}

Every scrape is parsed with prometheus_client's text parser; each sample becomes one row
(t_s, family, sample, labels as JSON, value), histogram buckets included, so any series can be
read back later. ``t_s`` is when the response arrived, ``time.perf_counter() - t0``, the clock
of requests.parquet. A failed scrape (server not up yet, no /metrics) adds no rows and is
counted in ``errors``; scraping never fails the run.

The summary reads a few families by their name without the server's prefix, so our server
(``llmbench_*``) and vLLM (``vllm:*``) read alike (SERVER_FAMILIES): the queue (waiting
requests), running requests and KV-cache usage as mean and peak over the steady window, and
preemptions as the counter's increase over it (None when the server does not export it), and,
from our server's own step counters, the mean step time and batch over the window
(server_mean_step_ms, server_step_batch_mean: the in-process runs' mean_step_ms and
mean_batch_size, read over HTTP).
A server exporting both prefixes (ours) is read through its ``llmbench_*`` families.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pandas as pd
import pyarrow as pa

PREFIXES = ("llmbench_", "vllm:")
# summary name -> family names (prefix removed) that mean it, first found wins
SERVER_FAMILIES: dict[str, tuple[str, ...]] = {
    "queue": ("num_requests_waiting",),
    "running": ("num_requests_running",),
    "kv_usage": ("kv_cache_usage_ratio", "kv_cache_usage_perc", "gpu_cache_usage_perc"),
    "preemptions": ("num_preemptions", "num_preemptions_total"),
    # ours alone (engine/serve/metrics.py): per-step figures from counter differences
    "steps": ("engine_steps", "engine_steps_total"),
    "step_seconds": ("engine_step_seconds", "engine_step_seconds_total"),
    "scheduled_seqs": ("engine_scheduled_seqs", "engine_scheduled_seqs_total"),
}
SERVER_METRICS_SCHEMA = pa.schema([("t_s", pa.float64()), ("family", pa.string()), ("sample", pa.string()),
                                   ("labels", pa.string()), ("value", pa.float64())])
COLUMNS = SERVER_METRICS_SCHEMA.names


def metrics_url(base_url: str) -> str:
    """http://host:port[/v1] -> http://host:port/metrics"""
    return base_url.rstrip("/").removesuffix("/v1") + "/metrics"


def parse_metrics(text: str, t_s: float) -> list[tuple[float, str, str, str, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    rows = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            rows.append((t_s, family.name, s.name, json.dumps(s.labels, sort_keys=True), float(s.value)))
    return rows


def fetch_samples(base_url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """One scrape as {sample name with its labels, as in the text: value}, histogram buckets
    left out; {} when the server has no /metrics."""
    try:
        with urllib.request.urlopen(metrics_url(base_url), timeout=timeout_s) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return {}
    out = {}
    for _, _, name, labels, value in parse_metrics(text, 0.0):
        if name.endswith(("_bucket", "_created")):
            continue
        pairs = json.loads(labels)
        out[name + ("{" + ",".join(f'{k}="{v}"' for k, v in pairs.items()) + "}" if pairs else "")] = value
    return out


def base_name(family: str) -> str:
    for prefix in PREFIXES:
        if family.startswith(prefix):
            return family[len(prefix):]
    return family


class MetricsScraper:
    """GET <server>/metrics every interval_s on a daemon thread until stopped."""

    def __init__(self, base_url: str, t0: float, interval_s: float = 0.5, timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.perf_counter):
        """clock: what t_s is measured on (minus t0): perf_counter for in-process runs, time.time
        for a load test whose rows carry epoch seconds."""
        if not (interval_s > 0 and math.isfinite(interval_s)):
            raise ValueError(f"the scrape interval must be a finite number of seconds > 0, got {interval_s}")
        self.url, self.t0, self.interval_s, self.timeout_s = metrics_url(base_url), t0, interval_s, timeout_s
        self.clock = clock
        self.rows: list[tuple[float, str, str, str, float]] = []
        self.scrapes = self.errors = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-scraper", daemon=True)

    def scrape_once(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as resp:
                text = resp.read().decode("utf-8", "replace")
            self.rows += parse_metrics(text, self.clock() - self.t0)
            self.scrapes += 1
        except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: not Prometheus text
            self.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"

    def _loop(self) -> None:
        while True:
            self.scrape_once()
            if self._stop.wait(self.interval_s):
                break

    def start(self) -> MetricsScraper:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop, then scrape once more so the run's end is always in the table."""
        self._stop.set()
        self._thread.join()
        self.scrape_once()

    def __enter__(self) -> MetricsScraper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=COLUMNS)

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "interval_s": self.interval_s, "scrapes": self.scrapes, "errors": self.errors,
                "last_error": self.last_error}


def _series(frame: pd.DataFrame, names: tuple[str, ...]) -> pd.Series | None:
    """One value per scrape time (summed over label sets) of the first family found. One family
    only: our server exports each under both prefixes (llmbench_* and vllm:*), which must not
    add up."""
    for name in names:
        for family in (*(p + name for p in PREFIXES), name):
            rows = frame[(frame["family"] == family) & ~frame["sample"].str.endswith(("_created", "_bucket"))]
            if not rows.empty:
                return rows.groupby("t_s")["value"].sum().sort_index()
    return None


def server_summary(frame: pd.DataFrame | None, window: tuple[float, float] | None = None) -> dict[str, Any]:
    """server_* figures over the window (t_start, t_end) of the run clock; None where unknown."""
    out: dict[str, Any] = {"server_scrapes": 0}
    for key in ("queue", "running", "kv_usage"):
        out.update({f"server_{key}_mean": None, f"server_{key}_peak": None})
    out.update(server_preemptions=None, server_mean_step_ms=None, server_step_batch_mean=None)
    if frame is None or frame.empty:
        return out
    if window is not None:
        frame = frame[(frame["t_s"] >= window[0]) & (frame["t_s"] <= window[1])]
    out["server_scrapes"] = int(frame["t_s"].nunique())
    for key in ("queue", "running", "kv_usage"):
        s = _series(frame, SERVER_FAMILIES[key]) if not frame.empty else None
        if s is not None:
            out[f"server_{key}_mean"], out[f"server_{key}_peak"] = float(s.mean()), float(s.max())
    increase = {key: _increase(frame, key) for key in ("preemptions", "steps", "step_seconds", "scheduled_seqs")}
    out["server_preemptions"] = increase["preemptions"]
    if increase["steps"]:  # None (not exported) or 0 (no step in the window): unknown
        for key, name, scale in (("step_seconds", "server_mean_step_ms", 1000.0),
                                 ("scheduled_seqs", "server_step_batch_mean", 1.0)):
            if increase[key] is not None:
                out[name] = increase[key] / increase["steps"] * scale
    return out


def _increase(frame: pd.DataFrame, key: str) -> float | None:
    """A counter's increase over the frame's scrapes; None when the server does not export it."""
    s = _series(frame, SERVER_FAMILIES[key]) if not frame.empty else None
    return None if s is None else float(s.iloc[-1] - s.iloc[0])
