"""A model-free OpenAI-compatible streaming endpoint, fast enough never to be the bottleneck.

    python -m harness.mock_server --port 8100 --tokens-per-chunk 4 --chunks 256 --processes 2

Serves POST /v1/completions and /v1/chat/completions (streamed: SSE in our server's chunk format,
with ``token_ids`` per choice, a final chunk with finish_reason "length", a usage chunk when
``stream_options.include_usage`` and ``data: [DONE]``; unstreamed: one JSON body), GET /v1/models
and GET /health. A request's output length is its ``max_tokens`` (default ``--chunks`` x
``--tokens-per-chunk``), sent ``--tokens-per-chunk`` tokens per SSE event. With
``--interval-ms 0`` a stream yields to the event loop between events, so concurrent streams
interleave one event each per round, like a server's steps; a positive interval paces them.

Implementation: raw asyncio streams and a hand-written HTTP/1.1 subset (keep-alive, Content-Length
bodies, chunked responses) with every event's bytes built once per process. ``--impl starlette``
serves the same thing through uvicorn + Starlette, for comparison (harness.ceiling measures both).
``--processes N`` starts N server processes on one port (SO_REUSEPORT; Linux spreads connections
over them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import signal
import sys
from dataclasses import dataclass
from typing import Any

LOOPBACK = "127.0.0.1"
MODEL = "mock"
_TEXT_PER_TOKEN = " tok"


@dataclass(frozen=True)
class MockConfig:
    tokens_per_chunk: int = 1
    chunks: int = 128
    interval_s: float = 0.0
    model: str = MODEL

    def __post_init__(self) -> None:
        if self.tokens_per_chunk < 1 or self.chunks < 1 or self.interval_s < 0:
            raise ValueError("--tokens-per-chunk and --chunks must be >= 1, --interval-ms >= 0")


# ---- bodies --------------------------------------------------------------------------------
def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _choice(kind: str, n: int, finish: str | None, first: bool) -> dict[str, Any]:
    ids, text = list(range(1000, 1000 + n)), _TEXT_PER_TOKEN * n
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "token_ids": ids, "logprobs": None}
    if kind == "completion":
        choice["text"] = text
    else:
        choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
    return choice


def _envelope(kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    return {"id": f"{kind}-mock", "object": obj, "created": 0, "model": MODEL, "choices": choices, **extra}


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": 0}}


def sse_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


class EventCache:
    """Every SSE event's bytes, built once: the body of a stream is a lookup per event."""

    def __init__(self, config: MockConfig):
        self.config = config
        self._events: dict[tuple[str, int, str | None, bool], bytes] = {}

    def chunk(self, kind: str, n: int, finish: str | None, first: bool) -> bytes:
        key = (kind, n, finish, first and kind == "chat")
        event = self._events.get(key)
        if event is None:
            event = self._events[key] = sse_event(_dumps(_envelope(kind, [_choice(kind, n, finish, first)])))
        return event

    def events(self, kind: str, max_tokens: int, prompt_tokens: int, include_usage: bool) -> list[bytes]:
        k = self.config.tokens_per_chunk
        sizes = [k] * (max_tokens // k) + ([max_tokens % k] if max_tokens % k else [])
        out = [self.chunk(kind, n, "length" if i == len(sizes) - 1 else None, i == 0)
               for i, n in enumerate(sizes)]
        if include_usage:
            out.append(sse_event(_dumps(_envelope(kind, [], usage=_usage(prompt_tokens, max_tokens)))))
        out.append(sse_event(b"[DONE]"))
        return out


def parse_request(body: bytes, config: MockConfig) -> tuple[int, int, bool, bool]:
    """(max_tokens, prompt_tokens, stream, include_usage) of a request body."""
    req = json.loads(body or b"{}")
    max_tokens = int(req.get("max_tokens") or config.chunks * config.tokens_per_chunk)
    prompt = req.get("prompt", req.get("messages", ""))
    prompt_tokens = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
    usage = bool((req.get("stream_options") or {}).get("include_usage"))
    return max(1, max_tokens), prompt_tokens, bool(req.get("stream")), usage


def full_body(kind: str, max_tokens: int, prompt_tokens: int) -> bytes:
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None,
                              "token_ids": list(range(1000, 1000 + max_tokens))}
    text = _TEXT_PER_TOKEN * max_tokens
    if kind == "completion":
        choice["text"] = text
    else:
        choice["message"] = {"role": "assistant", "content": text}
    return _dumps({**_envelope(kind, [choice]), "usage": _usage(prompt_tokens, max_tokens)})


MODELS_BODY = _dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "mock"}]})
ROUTES = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}


# ---- raw asyncio HTTP/1.1 ------------------------------------------------------------------
def _head(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _plain(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    return _head(status, {"content-type": content_type, "content-length": str(len(body))}) + body


SSE_HEAD = _head("200 OK", {"content-type": "text/event-stream", "cache-control": "no-cache",
                            "transfer-encoding": "chunked"})


def _framed(event: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(event), event)


class RawServer:
    def __init__(self, config: MockConfig):
        self.config, self.cache = config, EventCache(config)
        self._framed: dict[bytes, bytes] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass  # the client went away or sent something we do not speak
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection should close."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await reader.readexactly(int(headers.get("content-length") or 0))
        if method == "GET" and path == "/health":
            writer.write(_plain("200 OK", b"{}"))
        elif method == "GET" and path == "/v1/models":
            writer.write(_plain("200 OK", MODELS_BODY))
        elif method == "POST" and path in ROUTES:
            await self._generate(ROUTES[path], body, writer)
        else:
            writer.write(_plain("404 Not Found", b'{"error":{"message":"not found"}}'))
        await writer.drain()
        return headers.get("connection", "").lower() != "close"

    async def _generate(self, kind: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        max_tokens, prompt_tokens, stream, include_usage = parse_request(body, self.config)
        if not stream:
            writer.write(_plain("200 OK", full_body(kind, max_tokens, prompt_tokens)))
            return
        writer.write(SSE_HEAD)
        interval = self.config.interval_s
        for event in self.cache.events(kind, max_tokens, prompt_tokens, include_usage):
            framed = self._framed.get(event)
            if framed is None:
                framed = self._framed[event] = _framed(event)
            writer.write(framed)
            await writer.drain()
            await asyncio.sleep(interval)  # 0: one event per stream per loop round
        writer.write(b"0\r\n\r\n")


async def _serve_raw(config: MockConfig, host: str, port: int) -> None:
    server = await asyncio.start_server(RawServer(config).handle, host, port, reuse_port=True, backlog=4096)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


# ---- uvicorn + starlette (for comparison) --------------------------------------------------
def starlette_app(config: MockConfig) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    cache = EventCache(config)

    async def generate(request: Request) -> Response:
        kind = ROUTES[request.url.path]
        max_tokens, prompt_tokens, stream, include_usage = parse_request(await request.body(), config)
        if not stream:
            return Response(full_body(kind, max_tokens, prompt_tokens), media_type="application/json")

        async def events():
            for event in cache.events(kind, max_tokens, prompt_tokens, include_usage):
                yield event
                await asyncio.sleep(config.interval_s)

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        return Response(MODELS_BODY, media_type="application/json")

    async def health(request: Request) -> Response:
        return JSONResponse({})

    routes = [Route(p, generate, methods=["POST"]) for p in ROUTES]
    routes += [Route("/v1/models", models), Route("/health", health)]
    return Starlette(routes=routes)


def _serve_starlette(config: MockConfig, host: str, port: int) -> None:
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(starlette_app(config), log_level="warning", access_log=False,
                                           lifespan="off"))
    server.run(sockets=[sock])


# ---- processes -----------------------------------------------------------------------------
def serve(config: MockConfig, host: str, port: int, impl: str = "asyncio") -> None:
    """Serve on host:port in this process until SIGTERM / SIGINT."""
    if impl == "asyncio":
        asyncio.run(_serve_raw(config, host, port))
    else:
        _serve_starlette(config, host, port)


def serve_processes(config: MockConfig, host: str, port: int, processes: int, impl: str) -> int:
    """N server processes on one port; returns when they have all exited (SIGTERM stops them)."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=serve, args=(config, host, port, impl), name=f"mock-{i}") for i in range(processes)]
    for p in procs:
        p.start()

    def stop(*_: Any) -> None:
        for p in procs:
            if p.is_alive():
                p.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for p in procs:
        p.join()
    # A server stopped by our SIGTERM exits with -SIGTERM: that is a clean stop too.
    return 0 if all(p.exitcode in (0, -signal.SIGTERM) for p in procs) else 1


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--host", default=LOOPBACK)
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--tokens-per-chunk", type=int, default=1, help="tokens per SSE event (default 1)")
    p.add_argument("--chunks", type=int, default=128,
                   help="events per stream when the request sets no max_tokens (default 128)")
    p.add_argument("--interval-ms", type=float, default=0.0, help="pause between a stream's events")
    p.add_argument("--processes", type=int, default=1, help="server processes on the port (SO_REUSEPORT)")
    p.add_argument("--impl", choices=["asyncio", "starlette"], default="asyncio")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="llmbench mock-server",
                                                 description=__doc__.split("\n")[0]))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = MockConfig(args.tokens_per_chunk, args.chunks, args.interval_ms / 1000.0)
    except ValueError as e:
        parser.error(str(e))
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    if args.processes == 1:
        serve(config, args.host, args.port, args.impl)
        return 0
    return serve_processes(config, args.host, args.port, args.processes, args.impl)


if __name__ == "__main__":
    sys.exit(main())
