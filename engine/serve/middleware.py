"""Pure ASGI middlewares (no BaseHTTPMiddleware: it breaks streaming and disconnect detection).

- `ResponseCounter`: counts responses by path and status code for /metrics.
- `ApiKeyAuth`: when an API key is set, /v1/* needs `Authorization: Bearer <key>` (401 else);
  /health and /metrics stay open, as in vLLM, so probes and scrapers need no secret.
- `BodyLimit`: 413 for a body over `max_body_bytes`, judged from Content-Length before reading
  and again while reading (chunked uploads have no Content-Length).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from engine.serve.errors import error_response
from engine.serve.metrics import ServerMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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
        status = 500  # if the app dies before starting a response, that is what the client sees

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.count_response(scope.get("path", ""), status)


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, api_key: str, protected_prefix: str = "/v1"):
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        self.app, self.prefix = app, protected_prefix
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith(self.prefix):
            given = (_header(scope, b"authorization") or "").encode("latin-1")
            if not hmac.compare_digest(given, self.expected):  # constant time: no timing oracle
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
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.app, self.max_body_bytes = app, max_body_bytes

    def _too_large(self, size: str) -> Any:
        return error_response(
            413,
            f"request body is {size} bytes; the limit is {self.max_body_bytes}",
            code="request_too_large",
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
        while more:
            message = await receive()
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
