"""Pure ASGI middlewares (no BaseHTTPMiddleware: it breaks streaming and disconnect detection).

- `ResponseCounter`: counts responses by path and status code for /metrics. A client that
  left before its response started counts as 499 (nginx's "client closed request"), not as a
  response the server gave.
- `ApiKeyAuth`: when an API key is set, /v1/* needs `Authorization: Bearer <key>` (401 else;
  the scheme is case-insensitive, RFC 7235); /health and /metrics stay open, as in vLLM, so
  probes and scrapers need no secret.
- `BodyLimit`: 413 for a body over `max_body_bytes`, judged from Content-Length before reading
  and again while reading (chunked uploads have no Content-Length); 408 and the connection
  closed for a body that has not fully arrived `timeout_s` after the request began (a client
  trickling bytes must not hold a connection and a buffer forever).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from engine.serve.errors import error_response
from engine.serve.metrics import ServerMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
CLIENT_CLOSED_REQUEST = 499


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class ResponseCounter:
    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status: int | None = None
        disconnected = False  # the client left before a response started

        async def watching_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect" and status is None:
                disconnected = True
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start" and status is None:
                status = CLIENT_CLOSED_REQUEST if disconnected else message["status"]
            await send(message)

        try:
            await self.app(scope, watching_receive, counting_send)
        finally:
            if status is None:  # no response: the client left, or the app died (a 500 to see)
                status = CLIENT_CLOSED_REQUEST if disconnected else 500
            self.metrics.count_response(scope.get("path", ""), status)


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, api_key: str, protected_prefix: str = "/v1"):
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        self.app, self.prefix = app, protected_prefix
        self.expected = api_key.encode()

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.strip().partition(" ")
        # the scheme is case-insensitive (RFC 7235); the key compares in constant time
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("latin-1"), self.expected
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith(self.prefix):
            given = _header(scope, b"authorization") or ""
            if not self._authorized(given):
                message = (
                    "missing API key: send 'Authorization: Bearer <key>'"
                    if not given
                    else "incorrect API key"
                )
                response = error_response(
                    401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                )
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int, timeout_s: float = 30.0):
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.app, self.max_body_bytes, self.timeout_s = app, max_body_bytes, timeout_s

    def _too_large(self, size: str) -> Any:
        return error_response(
            413,
            f"request body is {size} bytes; the limit is {self.max_body_bytes}",
            code="request_too_large",
        )

    def _too_slow(self, received: int) -> Any:
        # Connection: close, so the server drops the half-read request instead of waiting on it
        return error_response(
            408,
            f"the request body did not arrive within {self.timeout_s:g} s "
            f"({received} bytes received)",
            code="request_timeout",
            headers={"Connection": "close"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                response = error_response(400, f"invalid Content-Length header {declared!r}")
                return await response(scope, receive, send)
            if int(declared) > self.max_body_bytes:
                return await self._too_large(declared)(scope, receive, send)
        body, more = bytearray(), True
        deadline = time.monotonic() + self.timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                return await self._too_slow(len(body))(scope, receive, send)
            if message["type"] == "http.disconnect":
                return  # the client left while uploading: nothing to answer
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._too_large(f"more than {self.max_body_bytes}")(
                    scope, receive, send
                )
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that hands out the buffered body once, then the real channel (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
