"""Any OpenAI-compatible server as a backend (our shim, vLLM, SGLang, TGI ...), over streaming HTTP.

    backend = OpenAIBackend("http://127.0.0.1:8000/v1", "tiny", api_key=None, num_workers=1)
    result = backend.run(requests, t0, ReplayOptions(timed=True, max_concurrency=64))

One asyncio task per trace request (at most `max_concurrency` in flight), each on a keep-alive
HTTP/1.1 connection of its own from harness/backends/http1.py (a small asyncio client: httpx
spent most of the client's CPU in per-chunk framing). The SSE stream is read as raw bytes and
parsed by harness/sse.py, the core the locust client shares. What is measured, all on the
client's perf_counter clock relative to t0:

- ``sent_s``: just before the HTTP request is written (after waiting for a concurrency slot);
- ``first_token_s``: arrival of the first SSE chunk that carries a token; a chat server's
  role-only first chunk (empty content) is not a token;
- ``token_times_s``: each chunk's arrival time (the time the network read that completed it
  returned), once per token in it. A chunk's token count is ``len(choice["token_ids"])`` when
  the server sends token ids (our server does, one or several per chunk; vLLM with
  ``return_token_ids``), else 1 for a chunk with non-empty text. In that case a chunk that holds
  several tokens counts once, and ``info["usage_mismatches"]`` counts the requests whose
  ``usage.completion_tokens`` disagrees with the chunks seen;
- ``finished_s``: the ``[DONE]`` event (or the end of the stream);
- ``prompt_tokens``/``output_tokens``/``cached_tokens``: from the final ``usage`` chunk
  (``stream_options.include_usage`` is always requested), else counted from chunks.

Multi-turn conversations (trace rows with conversation_id and turn, workloads/chat.py) always go
to ``/chat/completions``, whatever ``endpoint`` says: turn k is sent once turn k-1's stream has
ended (and not before its own arrival_s; its ``scheduled_s`` is that moment), with ``messages``
holding every earlier user message and, as the assistant's turns, the text the server streamed
back. Those streams are JSON-decoded in full to collect that text. A failed turn ends its
conversation: the later turns become error rows without being sent. With workers, a
conversation stays in one worker.

Failures never raise: an HTTP error, a refused connection, an in-stream error event or a
stream that ends without a finish_reason gives that request status "error" with the text.
Sampling fields outside the OpenAI API (top_k, min_tokens, ignore_eos) are sent only when the
trace sets them: vLLM and our shim accept them; OpenAI itself would refuse them.

``num_workers > 1`` splits the requests round-robin over that many client processes (started
when the backend is built, so their start-up is not in the run), each with its share of
``max_concurrency``, and merges their records back in trace order. The workers get t0 as a
wall-clock instant and map it onto their own perf_counter, so every timestamp stays on the
caller's t0 axis (to within microseconds). Client cost, measured with ``python -m
harness.ceiling`` against harness.mock_server (2026-12-01, 2-core dev VM): about 12-14 us of CPU
per SSE event when every event arrives in a read of its own (~75k one-token events per CPU
second), less when reads bring several. One event loop stamps the sockets that are ready at
once one after another, so when a server step sends to S streams together the last is stamped
about S x 13 us after the first (256 streams: ~3 ms): use workers to keep that skew, and the
load per process, small. The workers are started with "spawn" (safe beside CUDA
and threads), so a script that builds such a backend needs the ``if __name__ == "__main__":``
guard that multiprocessing asks for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from harness.backends.base import NOT_SENT, ReplayOptions, RunResult, not_sent_error
from harness.backends.http1 import ConnectionPool
from harness.records import RequestRecord
from harness.sse import DONE, EventReader, StreamError, StreamState
from workloads.chat import History, conversations
from workloads.trace import TraceRequest, with_request_ids

ENDPOINTS = {"completions": "/completions", "chat": "/chat/completions"}

__all__ = ["ENDPOINTS", "OpenAIBackend", "StreamError"]


def _api_root(base_url: str) -> str:
    """Accept "http://host:port" and "http://host:port/v1" alike."""
    url = base_url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _error_text(status: int, raw: bytes) -> str:
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = raw.decode("utf-8", "replace")[:500]
    return f"HTTP {status}: {message}"


def _epoch_offset() -> float:
    """wall clock minus perf_counter, in this process (perf_counter's origin is per process)."""
    return time.time() - time.perf_counter()


class OpenAIBackend:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        endpoint: str = "completions",
        num_workers: int = 1,
    ):
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint {endpoint!r} is not valid; choose one of {list(ENDPOINTS)}")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        num_workers = int(num_workers)
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.base_url, self.model = _api_root(base_url), model
        self.endpoint, self.timeout_s, self.num_workers = endpoint, timeout_s, num_workers
        self.url = self.base_url + ENDPOINTS[endpoint]
        self._api_key = api_key
        self._path = urlsplit(self.url).path
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._mismatches = 0
        self._pool = _start_workers(num_workers) if num_workers > 1 else None

    def run(self, requests: list[TraceRequest], t0: float, options: ReplayOptions) -> RunResult:
        requests = with_request_ids(requests)
        cpu0 = time.process_time()
        if self._pool is not None:
            records, self._mismatches, cpu_s = self._run_workers(requests, t0, options)
        else:
            records = [
                RequestRecord(
                    r.request_id, r.arrival_s if options.timed else 0.0, prefix_group=r.prefix_group,
                    conversation_id=r.conversation_id, turn=r.turn,
                )
                for r in requests
            ]
            self._mismatches = 0
            asyncio.run(self._run_all(requests, records, t0, options))
            cpu_s = time.process_time() - cpu0
        info = {
            "base_url": self.base_url,
            "model": self.model,
            "endpoint": self.endpoint,
            "timeout_s": self.timeout_s,
            "num_workers": self.num_workers,
            "usage_mismatches": self._mismatches,
            "client_cpu_s": cpu_s,  # CPU the client processes spent on this run
            "clock": "client side: times are when SSE chunks arrived at this process",
        }
        return RunResult(records, [], info)

    def reset(self) -> None:
        pass  # each run opens its own HTTP client (the server's own caches are not ours to clear)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # ---- several client processes --------------------------------------------------------
    def _worker_args(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "model": self.model, "api_key": self._api_key,
                "timeout_s": self.timeout_s, "endpoint": self.endpoint}

    def _run_workers(
        self, requests: list[TraceRequest], t0: float, options: ReplayOptions
    ) -> tuple[list[RequestRecord], int, float]:
        n = self.num_workers
        cap = options.max_concurrency
        if cap is not None:
            n = min(n, cap)  # every worker needs at least one slot
        units = _units(requests)  # a conversation's turns stay together
        shares = [[r for unit in units[i::n] for r in unit] for i in range(n)]
        caps = [None if cap is None else cap // n + (i < cap % n) for i in range(n)]
        t0_epoch = t0 + _epoch_offset()
        futures = [
            (share, self._pool.submit(_worker_run, self._worker_args(), share, t0_epoch,
                                      dataclasses.replace(options, max_concurrency=c, progress=False)))
            for share, c in zip(shares, caps) if share
        ]
        by_id: dict[str, RequestRecord] = {}
        mismatches, cpu_s = 0, 0.0
        for share, future in futures:
            try:
                records, worker_mismatches, worker_cpu_s = future.result()
            except Exception as e:  # a worker died: its requests become error rows, not lost ones
                records, worker_mismatches, worker_cpu_s = _failed(share, options, e), 0, 0.0
            by_id.update((r.request_id, r) for r in records)
            mismatches += worker_mismatches
            cpu_s += worker_cpu_s
        return [by_id[r.request_id] for r in requests], mismatches, cpu_s

    # ---- one process ---------------------------------------------------------------------
    async def _run_all(
        self,
        requests: list[TraceRequest],
        records: list[RequestRecord],
        t0: float,
        options: ReplayOptions,
    ) -> None:
        cap = options.max_concurrency
        slots: asyncio.Semaphore | None = asyncio.Semaphore(cap) if cap else None
        # One connection per request in flight (the pool opens as many as asked for): a pooled
        # wait would add client-side queueing to TTFT.
        pool = ConnectionPool(self.base_url.removesuffix("/v1"), self.timeout_s)
        bar = tqdm(
            total=len(requests),
            desc="requests",
            unit="req",
            leave=False,
            disable=None if options.progress else True,
        )

        async def one(req: TraceRequest, rec: RequestRecord) -> None:
            await self._one(pool, req, rec, t0, options, slots)
            bar.update(1)

        async def conversation(turns: list[TraceRequest]) -> None:
            history = History()
            for i, req in enumerate(turns):
                rec = by_id[req.request_id]
                if i > 0:  # due once the previous answer is in (and not before its own arrival)
                    rec.scheduled_s = max(rec.scheduled_s, time.perf_counter() - t0)
                text = await self._one(pool, req, rec, t0, options, slots, history)
                bar.update(1)
                if rec.status != "ok":
                    _write_off(turns[i + 1:], by_id, rec, time.perf_counter() - t0)
                    bar.update(len(turns) - i - 1)
                    return
                history.answer(text)

        by_id = {rec.request_id: rec for rec in records}
        convs = conversations(requests)
        plain = [one(r, rec) for r, rec in zip(requests, records) if r.conversation_id is None]
        try:
            with bar:
                await asyncio.gather(*plain, *(conversation(turns) for turns in convs.values()))
        finally:
            await pool.close()

    async def _one(
        self,
        pool: ConnectionPool,
        req: TraceRequest,
        rec: RequestRecord,
        t0: float,
        options: ReplayOptions,
        slots: asyncio.Semaphore | None,
        history: History | None = None,
    ) -> str:
        """Send one request and record it; returns the streamed text of a conversation turn."""
        if options.timed:
            due = rec.scheduled_s if options.duration_s is None else min(rec.scheduled_s, options.duration_s)
            await asyncio.sleep(max(0.0, t0 + due - time.perf_counter()))
        slot: AbstractAsyncContextManager[Any] = slots if slots is not None else nullcontext()
        async with slot:
            if options.past_deadline(time.perf_counter() - t0):  # --duration ended before its turn
                rec.status, rec.error = NOT_SENT, not_sent_error(options)
                return ""
            rec.sent_s = time.perf_counter() - t0
            state = _ChatTextState() if history is not None else StreamState()
            try:
                body, path = (self._body(req), self._path) if history is None else self._turn_body(req, history)
                await self._stream(pool, body, rec, state, t0, path)
            except Exception as e:  # never lose a request: any failure becomes its error row
                rec.status, rec.error = "error", f"{type(e).__name__}: {e}"
                _take_counts(rec, state)  # what arrived before the failure still happened
            if rec.finished_s is None:
                rec.finished_s = time.perf_counter() - t0
        return "".join(state.parts) if isinstance(state, _ChatTextState) else ""

    def _turn_body(self, req: TraceRequest, history: History) -> tuple[dict[str, Any], str]:
        """A conversation turn: the chat endpoint, with the conversation so far."""
        body = {"model": self.model, **req.sampling_kwargs(), "messages": history.ask(req.prompt),
                "stream": True, "stream_options": {"include_usage": True}}
        return body, urlsplit(self.base_url + ENDPOINTS["chat"]).path

    def _body(self, req: TraceRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            **req.sampling_kwargs(),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.endpoint == "completions":
            body["prompt"] = (
                req.prompt if req.prompt is not None else list(req.prompt_token_ids or [])
            )
        elif req.prompt is None:
            raise ValueError(
                "token-id prompts need endpoint='completions' (chat takes text messages)"
            )
        else:
            body["messages"] = [{"role": "user", "content": req.prompt}]
        return body

    async def _stream(
        self,
        pool: ConnectionPool,
        body: dict[str, Any],
        rec: RequestRecord,
        state: StreamState,
        t0: float,
        path: str | None = None,
    ) -> None:
        reader = EventReader(state, t0)
        resp = await pool.request("POST", path or self._path, json.dumps(body).encode(), self._headers,
                                  reader.feed)
        if resp.status != 200:
            rec.finished_s = time.perf_counter() - t0
            rec.status, rec.error = "error", _error_text(resp.status, resp.body)
            return
        # The body was read to its end (so the connection can be reused); finished is "[DONE]".
        reader.close(time.perf_counter())
        rec.finished_s = reader.done_at if reader.done_at is not None else time.perf_counter() - t0
        self._mismatches += _finish(rec, state)


class _ChatTextState(StreamState):
    """A StreamState that also keeps the chat text (``delta.content``) the stream carried."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []

    def on_data(self, data: bytes, t: float) -> bool:
        if data.strip() != DONE:
            try:
                event = json.loads(data)
            except ValueError:
                event = None  # StreamState raises for it
            for choice in (event.get("choices") or ()) if isinstance(event, dict) else ():
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                    self.parts.append(delta["content"])
        return super().on_data(data, t)


def _units(requests: list[TraceRequest]) -> list[list[TraceRequest]]:
    """Requests as units of work: a plain request alone, a conversation's turns together."""
    units: list[list[TraceRequest]] = []
    by_conv: dict[str, list[TraceRequest]] = {}
    for r in requests:
        if r.conversation_id is None:
            units.append([r])
        elif r.conversation_id not in by_conv:
            by_conv[r.conversation_id] = [r]
            units.append(by_conv[r.conversation_id])
        else:
            by_conv[r.conversation_id].append(r)
    return units


def _write_off(turns: list[TraceRequest], by_id: dict[str, RequestRecord], failed: RequestRecord,
               now: float) -> None:
    """The turns after a failed one: error rows, never sent."""
    for req in turns:
        rec = by_id[req.request_id]
        rec.scheduled_s = rec.sent_s = rec.finished_s = max(rec.scheduled_s, now)
        rec.status, rec.error = "error", f"not sent: turn {failed.turn} of the conversation failed"


def _take_counts(rec: RequestRecord, state: StreamState) -> int:
    """Copy the stream's counts into the record; returns the tokens counted from chunks."""
    rec.first_token_s = state.first_token
    rec.token_times_s = state.token_times()
    rec.finish_reason = state.finish_reason
    rec.prompt_tokens, rec.output_tokens, rec.cached_tokens = state.usage_counts()
    return state.num_tokens


def _finish(rec: RequestRecord, state: StreamState) -> int:
    """Status from the finished stream; returns 1 when usage disagrees with the chunks."""
    counted = _take_counts(rec, state)
    if rec.finish_reason is None:
        rec.status, rec.error = "error", "stream ended without a finish_reason"
    else:
        rec.status = "aborted" if rec.finish_reason == "abort" else "ok"
    return int(state.usage is not None and rec.output_tokens != counted)


# ---- worker processes ----------------------------------------------------------------------
def _start_workers(n: int) -> ProcessPoolExecutor:
    """n client processes, started now (spawn: safe beside CUDA and threads in the caller)."""
    pool = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"))
    # With spawn, the pool starts a process per submitted task while none is idle: n tasks
    # submitted together start all n, so none starts during a timed run.
    for future in [pool.submit(_epoch_offset) for _ in range(n)]:
        future.result()
    return pool


def _failed(requests: list[TraceRequest], options: ReplayOptions, error: Exception) -> list[RequestRecord]:
    return [RequestRecord(r.request_id, r.arrival_s if options.timed else 0.0, prefix_group=r.prefix_group,
                          conversation_id=r.conversation_id, turn=r.turn, status="error",
                          error=f"client worker failed: {type(error).__name__}: {error}")
            for r in requests]


def _worker_run(
    backend_args: dict[str, Any], requests: list[TraceRequest], t0_epoch: float, options: ReplayOptions
) -> tuple[list[RequestRecord], int, float]:
    """One worker's share: t0 arrives as a wall-clock instant, mapped onto this process's clock."""
    backend = OpenAIBackend(**backend_args)
    result = backend.run(requests, t0_epoch - _epoch_offset(), options)
    return result.requests, result.info["usage_mismatches"], result.info["client_cpu_s"]
