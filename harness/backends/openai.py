"""Any OpenAI-compatible server as a backend (our shim, vLLM, SGLang, TGI ...), over streaming HTTP.

    backend = OpenAIBackend("http://127.0.0.1:8000/v1", "tiny", api_key=None)
    result = backend.run(requests, t0, ReplayOptions(timed=True, max_concurrency=64))

One asyncio task per trace request (httpx.AsyncClient; at most `max_concurrency` in flight).
What is measured, all on the client's perf_counter clock relative to t0:

- ``sent_s``: just before the HTTP request is written (after waiting for a concurrency slot);
- ``first_token_s``: arrival of the first SSE chunk that carries a token; a chat server's
  role-only first chunk (empty content) is not a token;
- ``token_times_s``: each chunk's arrival time, once per token in it. A chunk's token count is
  ``len(choice["token_ids"])`` when the server sends token ids (our shim always does, one token
  per chunk; vLLM with ``return_token_ids``), else 1 for a chunk with non-empty text. In that
  case a chunk that holds several tokens counts once, and ``info["usage_mismatches"]`` counts
  the requests whose ``usage.completion_tokens`` disagrees with the chunks seen;
- ``finished_s``: the ``[DONE]`` line (or the end of the stream);
- ``prompt_tokens``/``output_tokens``/``cached_tokens``: from the final ``usage`` chunk
  (``stream_options.include_usage`` is always requested), else counted from chunks.

Failures never raise: an HTTP error, a refused connection, an in-stream error event or a
stream that ends without a finish_reason gives that request status "error" with the text.
Sampling fields outside the OpenAI API (top_k, min_tokens, ignore_eos) are sent only when the
trace sets them: vLLM and our shim accept them; OpenAI itself would refuse them.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any

import httpx
from tqdm.auto import tqdm

from harness.backends.base import ReplayOptions, RunResult
from harness.records import RequestRecord
from workloads.trace import TraceRequest, with_request_ids

ENDPOINTS = {"completions": "/completions", "chat": "/chat/completions"}


class StreamError(Exception):
    """The server reported an error inside a 200 stream, or the stream was malformed."""


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


def _tokens_in(choice: dict[str, Any]) -> int:
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
    return 1 if text else 0


class OpenAIBackend:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        endpoint: str = "completions",
    ):
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint {endpoint!r} is not valid; choose one of {list(ENDPOINTS)}")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.base_url, self.model = _api_root(base_url), model
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self.url = self.base_url + ENDPOINTS[endpoint]
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._mismatches = 0

    def run(self, requests: list[TraceRequest], t0: float, options: ReplayOptions) -> RunResult:
        requests = with_request_ids(requests)
        records = [
            RequestRecord(
                r.request_id, r.arrival_s if options.timed else 0.0, prefix_group=r.prefix_group
            )
            for r in requests
        ]
        self._mismatches = 0
        asyncio.run(self._run_all(requests, records, t0, options))
        info = {
            "base_url": self.base_url,
            "model": self.model,
            "endpoint": self.endpoint,
            "timeout_s": self.timeout_s,
            "usage_mismatches": self._mismatches,
            "clock": "client side: times are when SSE chunks arrived at this process",
        }
        return RunResult(records, [], info)

    def reset(self) -> None:
        pass  # each run opens its own HTTP client (the server's own caches are not ours to clear)

    def close(self) -> None:
        pass  # each run opens and closes its own HTTP client

    async def _run_all(
        self,
        requests: list[TraceRequest],
        records: list[RequestRecord],
        t0: float,
        options: ReplayOptions,
    ) -> None:
        cap = options.max_concurrency
        slots: asyncio.Semaphore | None = asyncio.Semaphore(cap) if cap else None
        # One connection per request in flight: a pooled wait would add client-side queueing to TTFT.
        limits = httpx.Limits(max_connections=cap, max_keepalive_connections=cap)
        bar = tqdm(
            total=len(requests),
            desc="requests",
            unit="req",
            leave=False,
            disable=None if options.progress else True,
        )
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout_s), limits=limits, headers=self._headers
        ) as client:

            async def one(req: TraceRequest, rec: RequestRecord) -> None:
                await self._one(client, req, rec, t0, options.timed, slots)
                bar.update(1)

            with bar:
                await asyncio.gather(*(one(r, rec) for r, rec in zip(requests, records)))

    async def _one(
        self,
        client: httpx.AsyncClient,
        req: TraceRequest,
        rec: RequestRecord,
        t0: float,
        timed: bool,
        slots: asyncio.Semaphore | None,
    ) -> None:
        if timed:
            await asyncio.sleep(max(0.0, t0 + rec.scheduled_s - time.perf_counter()))
        slot: AbstractAsyncContextManager[Any] = slots if slots is not None else nullcontext()
        async with slot:
            rec.sent_s = time.perf_counter() - t0
            try:
                await self._stream(client, self._body(req), rec, t0)
            except Exception as e:  # never lose a request: any failure becomes its error row
                rec.status, rec.error = "error", f"{type(e).__name__}: {e}"
            if rec.finished_s is None:
                rec.finished_s = time.perf_counter() - t0

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
        self, client: httpx.AsyncClient, body: dict[str, Any], rec: RequestRecord, t0: float
    ) -> None:
        async with client.stream("POST", self.url, json=body) as resp:
            if resp.status_code != 200:
                rec.finished_s = time.perf_counter() - t0
                rec.status, rec.error = "error", _error_text(resp.status_code, await resp.aread())
                return
            usage = await self._read_events(resp, rec, t0)
        rec.finished_s = time.perf_counter() - t0
        self._finish(rec, usage)

    async def _read_events(
        self, resp: httpx.Response, rec: RequestRecord, t0: float
    ) -> dict[str, Any] | None:
        usage = None
        async for line in resp.aiter_lines():
            t = time.perf_counter() - t0
            if not line.startswith("data:"):
                continue  # blank separators, comments (": ping"), event names
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                err = event["error"]
                raise StreamError(f"error event in stream: {err.get('message', err) if isinstance(err, dict) else err}")
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                n = _tokens_in(choice)
                if n and rec.first_token_s is None:
                    rec.first_token_s = t
                rec.token_times_s.extend([t] * n)
                rec.finish_reason = choice.get("finish_reason") or rec.finish_reason
        return usage

    def _finish(self, rec: RequestRecord, usage: dict[str, Any] | None) -> None:
        counted = len(rec.token_times_s)
        rec.output_tokens = counted
        if usage:
            rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            rec.output_tokens = int(usage.get("completion_tokens") or counted)
            rec.cached_tokens = int(
                (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            )
            self._mismatches += rec.output_tokens != counted
        if rec.finish_reason is None:
            rec.status, rec.error = "error", "stream ended without a finish_reason"
        else:
            rec.status = "aborted" if rec.finish_reason == "abort" else "ok"
