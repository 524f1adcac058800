"""One generation request through the EngineClient, answered as SSE chunks or one JSON body.

Token deltas from the engine become text here (output_processor.py: detokenization, stop
strings; a stop string aborts the request in the engine). A stream sends one chunk per engine
step with all of that step's tokens (more if it fell behind: the RequestStream merges what
queued up), or, with stream_interval K > 1 (vLLM's rule), the first token at once (TTFT is not
delayed), then a chunk whenever K tokens are pending, and the last one.

A client that disconnects gets its request aborted (engine.abort_request, so its KV blocks are
freed at once): a watcher task waits for the ASGI `http.disconnect` message, for streaming and
non-streaming requests alike, and the streaming response also aborts from its `finally`
and from a background task, which runs even if the body iterator was never started.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from transformers import PreTrainedTokenizerBase

from engine.outputs import RequestDelta
from engine.sampling_params import SamplingParams
from engine.serve.engine_client import (
    EngineClient,
    EngineFailed,
    EngineOverloaded,
    RequestRejected,
    RequestStream,
)
from engine.serve.errors import APIError, error_body
from engine.serve.metrics import ServerMetrics
from engine.serve.output_processor import OutputProcessor
from engine.serve.responses import SSE_DONE, ResponseFormat, sse


@dataclass
class ServerState:
    model_name: str
    tokenizer: PreTrainedTokenizerBase  # detokenizes, on the event loop
    encoder: PreTrainedTokenizerBase  # its own copy: tokenizes, on the tokenizer thread only
    max_model_len: int
    vocab_size: int
    metrics: ServerMetrics
    engine_kind: str = "core-process"
    stream_interval: int = 1
    tokenizer_name: str = ""  # /v1/models: a directory or hub name, or "byte-level (preset)"
    engine: EngineClient | None = None  # set while the app is running (lifespan)
    tokenizer_pool: ThreadPoolExecutor | None = None  # one thread, set while running

    def running_engine(self) -> EngineClient:
        if self.engine is None:
            raise APIError(
                503,
                "the engine is not running (server starting or stopping)",
                code="engine_unavailable",
            )
        return self.engine


@dataclass
class GenerationRequest:
    fmt: ResponseFormat
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    t_start: float = field(default_factory=time.perf_counter)


@dataclass
class _Progress:
    t_start: float
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    first_token_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    metrics: ServerMetrics | None = None  # observes inter-token latency as tokens arrive
    last_arrival_s: float | None = None

    def add(self, delta: RequestDelta) -> None:
        n = len(delta.new_token_ids)
        if n:
            now = time.perf_counter() - self.t_start
            if self.first_token_s is None:
                self.first_token_s = now
            elif self.metrics is not None and self.last_arrival_s is not None:
                self.metrics.observe_tokens(now - self.last_arrival_s, n)
            self.last_arrival_s = now
        self.token_ids += delta.new_token_ids
        self.text.append(delta.new_text)
        self.prompt_tokens, self.cached_tokens = delta.num_prompt_tokens, delta.num_cached_tokens
        if delta.finished:
            self.finish_reason = delta.finish_reason

    def record(self, metrics: ServerMetrics) -> None:
        metrics.observe_request(
            self.prompt_tokens,
            len(self.token_ids),
            self.finish_reason or "error",
            self.first_token_s,
            time.perf_counter() - self.t_start,
        )


async def generate(state: ServerState, gen: GenerationRequest, request: Request) -> Response:
    stream = await _open(state.running_engine(), gen)
    if gen.stream:
        return StreamingResponse(
            _sse_events(state, gen, stream, request),
            media_type="text/event-stream",
            headers={
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "X-Stream-Interval": str(state.stream_interval),
            },
            background=BackgroundTask(stream.abort),
        )
    return await _collect(state, gen, stream, request)


async def _open(engine: EngineClient, gen: GenerationRequest) -> RequestStream:
    try:
        return await engine.add_request(gen.fmt.request_id, gen.prompt_token_ids, gen.params)
    except EngineOverloaded as e:
        raise APIError(
            429, str(e), code="server_overloaded", headers={"Retry-After": "1"}
        ) from None
    except RequestRejected as e:
        raise APIError(400, str(e), code="invalid_request") from None
    except EngineFailed as e:
        raise APIError(503, str(e), code="engine_unavailable") from None


@asynccontextmanager
async def _abort_on_disconnect(request: Request, stream: RequestStream) -> AsyncIterator[None]:
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        stream.abort()

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()


def _close(stream: RequestStream, progress: _Progress, metrics: ServerMetrics) -> None:
    """Abort the request if it is still running (client gone, or cancelled) and count it."""
    if not stream.finished:
        stream.abort()
        progress.finish_reason = progress.finish_reason or "abort"
    progress.record(metrics)


@dataclass
class _Pending:
    """Tokens not yet sent (stream_interval > 1 holds them back)."""

    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def add(self, delta: RequestDelta) -> None:
        self.token_ids += delta.new_token_ids
        self.text.append(delta.new_text)

    def take(self) -> tuple[str, list[int]]:
        out = "".join(self.text), self.token_ids
        self.token_ids, self.text = [], []
        return out


async def _text_deltas(
    gen: GenerationRequest, stream: RequestStream, state: ServerState
) -> AsyncIterator[RequestDelta]:
    """The stream's token deltas as text deltas; ends at the finishing delta. A stop string
    ends it here: the engine is told to abort (its later tokens are dropped)."""
    out = OutputProcessor(state.tokenizer, gen.params)
    async for token_delta in stream:
        delta = out.process(token_delta)
        if out.stopped:
            stream.abort()
        yield delta
        if delta.finished:
            return


async def _sse_events(
    state: ServerState, gen: GenerationRequest, stream: RequestStream, request: Request
) -> AsyncIterator[bytes]:
    progress = _Progress(
        gen.t_start, prompt_tokens=len(gen.prompt_token_ids), metrics=state.metrics
    )
    pending, interval, sent_any = _Pending(), state.stream_interval, False
    try:
        async with _abort_on_disconnect(request, stream):
            async for delta in _text_deltas(gen, stream, state):
                progress.add(delta)
                pending.add(delta)
                if delta.finished and delta.finish_reason == "abort":
                    break  # the client left: nobody to send the rest to
                n = len(pending.token_ids)
                if delta.finished or (n and (not sent_any or n >= interval)):
                    text, ids = pending.take()
                    sent_any = True
                    reason = delta.finish_reason if delta.finished else None
                    yield sse(gen.fmt.chunk(text, ids, reason))
        if progress.finish_reason == "abort":
            return
        if gen.include_usage:
            yield sse(
                gen.fmt.usage_chunk(
                    progress.prompt_tokens, len(progress.token_ids), progress.cached_tokens
                )
            )
    except EngineFailed as e:  # headers are sent: report in-band, as OpenAI and vLLM do
        yield sse(error_body(500, str(e), code="engine_failed"))
    finally:
        _close(stream, progress, state.metrics)
    yield SSE_DONE


async def _collect(
    state: ServerState, gen: GenerationRequest, stream: RequestStream, request: Request
) -> JSONResponse:
    progress = _Progress(
        gen.t_start, prompt_tokens=len(gen.prompt_token_ids), metrics=state.metrics
    )
    try:
        async with _abort_on_disconnect(request, stream):
            async for delta in _text_deltas(gen, stream, state):
                progress.add(delta)
    except EngineFailed as e:
        raise APIError(500, str(e), code="engine_failed") from None
    finally:
        _close(stream, progress, state.metrics)
    if progress.finish_reason == "abort":
        raise APIError(503, "request aborted before it finished", code="aborted")
    body = gen.fmt.full(
        "".join(progress.text),
        progress.token_ids,
        progress.finish_reason,
        progress.prompt_tokens,
        progress.cached_tokens,
    )
    return JSONResponse(body)
