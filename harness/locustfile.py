"""Locust users for any OpenAI-compatible /v1/completions endpoint (streaming).

    locust -f harness/locustfile.py --headless -u 8 -r 4 --run-time 30s --host http://127.0.0.1:8000

No torch or engine imports: locust monkey-patches the standard library with gevent, and each
user is a greenlet. `OpenAIStreamingUser` (abstract) owns a `CompletionsClient` that streams
one request, timing it with time.perf_counter, and fires `environment.events.request` for:

- the request, name "/v1/completions": response_time = whole request in ms, response_length =
  output tokens; a failure is passed as `exception` (never raised into locust);
- "TTFT" and "ITL" (request_type "METRIC"): time to the first token-carrying chunk, and every
  gap between consecutive tokens, in ms, so locust's tables and charts show their percentiles.

Debug one user with `python harness/locustfile.py http://HOST:PORT` (locust.run_single_user).
`TraceUser` sends the prompts of a trace file (LLMBENCH_LOCUST_TRACE, default
workloads/traces/smoke.jsonl) round-robin from a per-user offset, with `wait_time` between.

Environment: LLMBENCH_MODEL (else the first id from GET /v1/models), LLMBENCH_API_KEY or
OPENAI_API_KEY (optional), LLMBENCH_LOCUST_ROWS: a JSONL file to which every request appends
one row of raw times (epoch seconds) and counts, for harness.loadtest to turn into a report.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import requests
from locust import User, between, task
from locust.env import Environment
from locust.exception import StopUser

DEFAULT_TRACE = Path(__file__).resolve().parent.parent / "workloads" / "traces" / "smoke.jsonl"
ROWS_ENV, TRACE_ENV, MODEL_ENV = "LLMBENCH_LOCUST_ROWS", "LLMBENCH_LOCUST_TRACE", "LLMBENCH_MODEL"
REQUEST_FIELDS = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "min_tokens",
    "ignore_eos",
    "stop",
)
# Immutable per process: maps perf_counter readings onto wall time, so rows from several
# processes (distributed workers) share one time axis.
EPOCH_OFFSET_S = time.time() - time.perf_counter()


def load_trace_bodies(path: str | Path) -> list[dict[str, Any]]:
    """Request bodies (without "model") from a JSONL trace; arrival times are ignored (closed loop)."""
    bodies = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        body = {k: row[k] for k in REQUEST_FIELDS if row.get(k) is not None}
        body["prompt"] = row["prompt"] if row.get("prompt") is not None else row["prompt_token_ids"]
        bodies.append(body)
    if not bodies:
        raise ValueError(f"{path}: the trace has no requests")
    return bodies


def _tokens_in(choice: dict[str, Any]) -> int:
    ids = choice.get("token_ids")  # our shim (and vLLM's return_token_ids) say exactly
    return len(ids) if isinstance(ids, list) else int(bool(choice.get("text")))


class CompletionsClient:
    def __init__(
        self,
        base_url: str,
        environment: Environment,
        api_key: str | None = None,
        rows_path: str | None = None,
        timeout_s: float = 300.0,
    ):
        self.base_url = base_url.rstrip("/").removesuffix("/v1") + "/v1"
        self.environment, self.rows_path, self.timeout_s = environment, rows_path, timeout_s
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def served_model(self) -> str:
        start = time.perf_counter()
        try:
            resp = self.session.get(self.base_url + "/models", timeout=self.timeout_s)
            resp.raise_for_status()
            model, error = resp.json()["data"][0]["id"], None
        except Exception as e:  # reported to locust, then the user stops
            model, error = None, e
        self._fire("GET", "/v1/models", time.perf_counter() - start, 0, error)
        if model is None:
            raise StopUser()
        return model

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Stream one completion; returns (and records) its raw row. Never raises."""
        row: dict[str, Any] = {
            "request_id": f"locust-{uuid.uuid4().hex[:16]}",
            "token_times": [],
            "first_token": None,
            "finish_reason": None,
            "usage": None,
        }
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        row["scheduled"] = row["sent"] = start = time.perf_counter()
        error: Exception | None = None
        try:
            self._stream(body, row)
            if row["finish_reason"] is None:
                raise RuntimeError("stream ended without a finish_reason")
        except Exception as e:
            error = e
        row["finished"] = end = time.perf_counter()
        self._report(row, start, end, error)
        return row

    def _stream(self, body: dict[str, Any], row: dict[str, Any]) -> None:
        with self.session.post(
            self.base_url + "/completions", json=body, stream=True, timeout=self.timeout_s
        ) as resp:
            if resp.status_code != 200:
                try:
                    message = resp.json()["error"]["message"]
                except Exception:
                    message = resp.text[:300]
                raise RuntimeError(f"HTTP {resp.status_code}: {message}")
            # chunk_size=None: hand over data as it arrives, so each SSE event gets its own time
            for line in resp.iter_lines(chunk_size=None, decode_unicode=False):
                t = time.perf_counter()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                self._event(json.loads(data), row, t)

    @staticmethod
    def _event(event: dict[str, Any], row: dict[str, Any], t: float) -> None:
        if "error" in event:
            raise RuntimeError(f"error event in stream: {event['error']}")
        row["usage"] = event.get("usage") or row["usage"]
        for choice in event.get("choices") or []:
            n = _tokens_in(choice)
            if n and row["first_token"] is None:
                row["first_token"] = t
            row["token_times"].extend([t] * n)
            row["finish_reason"] = choice.get("finish_reason") or row["finish_reason"]

    def _report(
        self, row: dict[str, Any], start: float, end: float, error: Exception | None
    ) -> None:
        usage = row.pop("usage") or {}
        row["output_tokens"] = int(usage.get("completion_tokens") or len(row["token_times"]))
        row["prompt_tokens"] = int(usage.get("prompt_tokens") or 0)
        row["cached_tokens"] = int(
            (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        )
        row["status"] = (
            "error" if error else ("aborted" if row["finish_reason"] == "abort" else "ok")
        )
        row["error"] = f"{type(error).__name__}: {error}" if error else None
        self._fire("POST", "/v1/completions", end - start, row["output_tokens"], error)
        if error is None and row["first_token"] is not None:
            self._fire("METRIC", "TTFT", row["first_token"] - start, 0, None)
            times = row["token_times"]
            for a, b in itertools.pairwise(times):
                self._fire("METRIC", "ITL", b - a, 0, None)
        self._append_row(row)

    def _fire(
        self, kind: str, name: str, seconds: float, length: int, error: Exception | None
    ) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=seconds * 1000.0,
            response_length=length,
            exception=error,
            context={},
        )

    def _append_row(self, row: dict[str, Any]) -> None:
        if not self.rows_path:
            return
        for key in ("scheduled", "sent", "first_token", "finished"):
            row[key] = None if row[key] is None else row[key] + EPOCH_OFFSET_S
        row["token_times"] = [t + EPOCH_OFFSET_S for t in row["token_times"]]
        # One O_APPEND write per row: whole lines even with several processes on one file.
        fd = os.open(self.rows_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row) + "\n").encode())
        finally:
            os.close(fd)


class OpenAIStreamingUser(User):
    """Owns a CompletionsClient; subclasses add tasks and a wait_time."""

    abstract = True

    def __init__(self, environment: Environment):
        super().__init__(environment)
        if not self.host:
            raise ValueError(
                "no server: pass --host http://HOST:PORT (the server's root, or its /v1)"
            )
        api_key = os.environ.get("LLMBENCH_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.client = CompletionsClient(self.host, environment, api_key, os.environ.get(ROWS_ENV))
        self.model = os.environ.get(MODEL_ENV)

    def on_start(self) -> None:
        if not self.model:
            self.model = self.client.served_model()


class TraceUser(OpenAIStreamingUser):
    wait_time = between(0.05, 0.25)

    def __init__(self, environment: Environment):
        super().__init__(environment)
        bodies = load_trace_bodies(os.environ.get(TRACE_ENV) or DEFAULT_TRACE)
        start = random.Random(uuid.uuid4().int).randrange(
            len(bodies)
        )  # spread users over the trace
        self._bodies = itertools.islice(itertools.cycle(bodies), start, None)

    @task
    def complete(self) -> None:
        self.client.complete({"model": self.model, **next(self._bodies)})


if __name__ == "__main__":  # debug one user in-process: python harness/locustfile.py http://127.0.0.1:8000
    import sys

    from locust import run_single_user

    if len(sys.argv) != 2:
        raise SystemExit("usage: python harness/locustfile.py http://HOST:PORT")
    TraceUser.host = sys.argv[1]
    run_single_user(TraceUser)
