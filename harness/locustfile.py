"""Locust users for any OpenAI-compatible /v1/completions endpoint (streaming).

    locust -f harness/locustfile.py --headless -u 8 -r 4 --run-time 30s --host http://127.0.0.1:8000

No torch or engine imports: locust monkey-patches the standard library with gevent, and each
user is a greenlet. `OpenAIStreamingUser` (abstract) owns a `CompletionsClient` that streams
one request over geventhttpclient (locust's own fast HTTP client; one keep-alive connection per
user) and parses it with harness/sse.py, the SSE core the openai backend shares, so both
clients count tokens the same way. Timing uses time.perf_counter. It reports to locust:

- the request, name "/v1/completions" (fired as a request event): response_time = whole
  request in ms, response_length = output tokens; a failure is passed as `exception` (never
  raised into locust);
- "TTFT" (ms) and "TPOT_us" (microseconds: locust rounds to whole units, and a fast server's
  TPOT is under a millisecond), method "METRIC": time to the first token-carrying chunk, and the
  mean time per output token after the first, once per successful request. They are logged
  straight into their own stats rows, not fired as request events, so locust's "Aggregated"
  row counts HTTP requests only. Per-token gaps (ITL) are in the harness report
  (harness.loadtest), not in locust's tables: a stats entry per token would cost the client
  more than the parsing does.

Debug one user with `python harness/locustfile.py http://HOST:PORT` (locust.run_single_user).
`TraceUser` sends the prompts of a trace file (LLMBENCH_LOCUST_TRACE, default
workloads/traces/smoke.jsonl) round-robin from a per-user offset, with `wait_time` between
(LLMBENCH_LOCUST_WAIT="MIN,MAX" seconds, default "0.05,0.25"; "0" for a closed loop).

Environment: LLMBENCH_MODEL (else the first id from GET /v1/models), LLMBENCH_API_KEY or
OPENAI_API_KEY (optional), LLMBENCH_LOCUST_ROWS: a JSONL file to which every request appends
one row of raw times (epoch seconds; per chunk: ``chunk_times`` and ``chunk_tokens``) and
counts, for harness.loadtest to turn into a report. LLMBENCH_LOCUST_CPU: a file to which every
locust process appends the CPU seconds it spent during the test.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from geventhttpclient import HTTPClient
from locust import User, between, constant, events, task
from locust.env import Environment
from locust.exception import StopUser

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `locust -f harness/locustfile.py` puts only harness/ on the path
    sys.path.insert(0, str(REPO_ROOT))

from harness.sse import EventReader, StreamError, StreamState  # noqa: E402  (no torch, no engine)

DEFAULT_TRACE = REPO_ROOT / "workloads" / "traces" / "smoke.jsonl"
ROWS_ENV, TRACE_ENV, MODEL_ENV = "LLMBENCH_LOCUST_ROWS", "LLMBENCH_LOCUST_TRACE", "LLMBENCH_MODEL"
WAIT_ENV, CPU_ENV = "LLMBENCH_LOCUST_WAIT", "LLMBENCH_LOCUST_CPU"
ONCE_ENV, PROCESSES_ENV = "LLMBENCH_LOCUST_ONCE", "LLMBENCH_LOCUST_PROCESSES"
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
EVENT_END = b"\n\n"  # what ends an SSE event on the servers we drive (ours, vLLM, SGLang)


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


def parse_wait(text: str | None) -> Any:
    """LLMBENCH_LOCUST_WAIT: "MIN,MAX" seconds (uniform) or one number (constant)."""
    if not text:
        return between(0.05, 0.25)
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 0:
        raise ValueError(f"{WAIT_ENV}={text!r}: give MIN,MAX or one number of seconds >= 0")
    return constant(parts[0]) if len(parts) == 1 else between(*parts)


class CompletionsClient:
    def __init__(
        self,
        base_url: str,
        environment: Environment,
        api_key: str | None = None,
        rows_path: str | None = None,
        timeout_s: float = 300.0,
    ):
        root = base_url.rstrip("/").removesuffix("/v1")
        self.prefix = urlsplit(root).path.rstrip("/") + "/v1"  # "/v1", or "/api/v1" behind a path
        self.environment, self.rows_path, self.timeout_s = environment, rows_path, timeout_s
        # One keep-alive connection per user; a response not read to its end closes it.
        self.http = HTTPClient.from_url(root, concurrency=1, connection_timeout=timeout_s,
                                        network_timeout=timeout_s)
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def served_model(self) -> str:
        start = time.perf_counter()
        try:
            resp = self.http.get(self.prefix + "/models", headers=self.headers)
            body = resp.read()
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {body[:300]!r}")
            model, error = json.loads(body)["data"][0]["id"], None
        except Exception as e:  # reported to locust, then the user stops
            model, error = None, e
        self._fire("GET", "/v1/models", time.perf_counter() - start, 0, error)
        if model is None:
            raise StopUser()
        return model

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Stream one completion; returns (and records) its raw row. Never raises."""
        row: dict[str, Any] = {"request_id": f"locust-{uuid.uuid4().hex[:16]}"}
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        state = StreamState()
        row["scheduled"] = row["sent"] = start = time.perf_counter()
        error: Exception | None = None
        try:
            self._stream(json.dumps(body).encode(), state)
            if state.finish_reason is None:
                raise StreamError("stream ended without a finish_reason")
        except Exception as e:
            error = e
        row["finished"] = end = time.perf_counter()
        self._report(row, state, start, end, error)
        return row

    def _stream(self, body: bytes, state: StreamState) -> None:
        resp = self.http.post(self.prefix + "/completions", body, headers=self.headers)
        try:
            if resp.status_code != 200:
                raw = resp.read()
                try:
                    message = json.loads(raw)["error"]["message"]
                except Exception:
                    message = raw[:300].decode("utf-8", "replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {message}")
            reader = EventReader(state)
            # One SSE event per readline (geventhttpclient's C parser undoes the chunked framing).
            while event := resp.readline(EVENT_END):
                if reader.feed(event, time.perf_counter()):
                    resp.read()  # the end of the body, so the connection can be reused
                    return
            reader.close(time.perf_counter())
        finally:
            resp.release()

    def _report(
        self, row: dict[str, Any], state: StreamState, start: float, end: float, error: Exception | None
    ) -> None:
        row["first_token"], row["finish_reason"] = state.first_token, state.finish_reason
        row["chunk_times"], row["chunk_tokens"] = state.chunk_times, state.chunk_tokens
        row["prompt_tokens"], row["output_tokens"], row["cached_tokens"] = state.usage_counts()
        row["status"] = "error" if error else ("aborted" if state.finish_reason == "abort" else "ok")
        row["error"] = f"{type(error).__name__}: {error}" if error else None
        self._fire("POST", "/v1/completions", end - start, row["output_tokens"], error)
        if error is None and state.first_token is not None:
            stats = self.environment.stats
            stats.get("TTFT", "METRIC").log((state.first_token - start) * 1000.0, 0)
            if state.num_tokens > 1:
                tpot = (end - state.first_token) / (state.num_tokens - 1)
                stats.get("TPOT_us", "METRIC").log(tpot * 1e6, 0)  # locust rounds to whole units
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
        row["chunk_times"] = [t + EPOCH_OFFSET_S for t in row["chunk_times"]]
        # One O_APPEND write per row: whole lines even with several processes on one file.
        fd = os.open(self.rows_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row) + "\n").encode())
        finally:
            os.close(fd)


@events.test_start.add_listener
def _cpu_at_start(environment: Environment, **_: Any) -> None:
    environment.llmbench_cpu0 = time.process_time()  # kept on the environment, not in the module


@events.test_stop.add_listener
def _cpu_at_stop(environment: Environment, **_: Any) -> None:
    """LLMBENCH_LOCUST_CPU: append this process's CPU seconds during the test (every locust
    process, master and workers, adds its line), so harness.ceiling can count client CPU."""
    path, cpu0 = os.environ.get(CPU_ENV), getattr(environment, "llmbench_cpu0", None)
    if not path or cpu0 is None:
        return
    line = json.dumps({"pid": os.getpid(), "cpu_s": time.process_time() - cpu0}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
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

    def on_stop(self) -> None:
        self.client.http.close()


def once_row(environment: Environment, processes: int) -> int:
    """Replay-once mode: the trace row of the next user this process starts. Users are spread
    evenly over the worker processes, so user k of worker w takes row k * processes + w: with as
    many users as rows, every row is sent exactly once."""
    counter = getattr(environment, "llmbench_once_users", None)
    if counter is None:  # kept on the environment (one per process), not in the module
        counter = environment.llmbench_once_users = itertools.count()
    worker = getattr(environment.runner, "worker_index", 0) if environment.runner is not None else 0
    return next(counter) * processes + worker


class TraceUser(OpenAIStreamingUser):
    """Closed loop over the trace's prompts (from a random offset per user), or with
    LLMBENCH_LOCUST_ONCE=1 one request per user, trace row by trace row (run as many users as
    the trace has rows, LLMBENCH_LOCUST_PROCESSES = locust's --processes): the exact request
    set of the trace, as the openai backend replays it offline."""

    wait_time = parse_wait(os.environ.get(WAIT_ENV))

    def __init__(self, environment: Environment):
        super().__init__(environment)
        bodies = load_trace_bodies(os.environ.get(TRACE_ENV) or DEFAULT_TRACE)
        if os.environ.get(ONCE_ENV) == "1":
            row = once_row(environment, int(os.environ.get(PROCESSES_ENV) or 1))
            self._bodies = iter(bodies[row:row + 1])  # empty past the trace's end: nothing to send
        else:
            start = random.Random(uuid.uuid4().int).randrange(len(bodies))  # spread users over the trace
            self._bodies = itertools.islice(itertools.cycle(bodies), start, None)

    @task
    def complete(self) -> None:
        body = next(self._bodies, None)
        if body is None:  # replay-once: this user's request is done
            raise StopUser()
        self.client.complete({"model": self.model, **body})


if __name__ == "__main__":  # debug one user in-process: python harness/locustfile.py http://127.0.0.1:8000
    from locust import run_single_user

    if len(sys.argv) != 2:
        raise SystemExit("usage: python harness/locustfile.py http://HOST:PORT")
    TraceUser.host = sys.argv[1]
    run_single_user(TraceUser)
