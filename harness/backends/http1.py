"""A small asyncio HTTP/1.1 client for streamed responses: the openai backend's transport.

    pool = ConnectionPool("http://127.0.0.1:8000", timeout_s=600)
    resp = await pool.request("POST", "/v1/completions", body_bytes, headers, on_body)
    # on_body(data, t) was called for each network read of a 2xx body (chunked framing removed,
    # t = time.perf_counter() when the read returned); other statuses: resp.body holds the body
    await pool.close()

Why not httpx: httpx (httpcore + h11) hands the body over one HTTP chunk at a time through
several layers of Python per chunk, and a streaming server sends one chunk per SSE event: at
tens of thousands of events per second the client's CPU went to h11 (about 70% of it, profiled
against harness.mock_server). Here the connection is an asyncio Protocol: each socket read is
unframed in one pass, however many chunks it holds, and handed to ``on_body`` right in
``data_received``, with no task switch or stream buffer per read. The request's task only
wakes when the response is complete.

Scope: HTTP/1.1 with keep-alive (one request per connection at a time, idle connections reused
within the pool), Content-Length or chunked response bodies (or one that ends with the
connection), http and https (default certificate checks), a timeout for connecting and for
each wait for data (the stream may go quiet for at most timeout_s). No proxies, redirects,
compression, trailers or HTTP/2. A reused connection that the server had already closed is
retried once on a fresh one (only when no byte of a response arrived).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 1 << 16
OnBody = Callable[[bytes, float], None]


class ProtocolError(Exception):
    """The server's response is not HTTP/1.1 as this client speaks it."""


class StaleConnection(ConnectionResetError):
    """The connection closed before any byte of the response (a reused one may be retried)."""


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes = b""):
        self.status, self.headers, self.body = status, headers, body


def _unchunk(buf: bytes) -> tuple[list[bytes], bytes, bool]:
    """The complete chunks' payloads at the start of buf, the rest, and whether the last
    (zero-size) chunk and its blank line were seen. Trailers are not supported."""
    parts, pos, n = [], 0, len(buf)
    while True:
        crlf = buf.find(b"\r\n", pos)
        if crlf < 0:
            return parts, buf[pos:], False
        try:
            size = int(buf[pos:crlf].split(b";", 1)[0], 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size line {buf[pos:crlf][:40]!r}") from None
        start = crlf + 2
        if size == 0:
            if n < start + 2:
                return parts, buf[pos:], False
            if buf[start:start + 2] != b"\r\n":
                raise ProtocolError("chunked trailers are not supported")
            return parts, buf[start + 2:], True
        end = start + size
        if n < end + 2:
            return parts, buf[pos:], False
        parts.append(buf[start:end])
        pos = end + 2


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


class _Exchange:
    """One request's response as it arrives on a connection."""

    __slots__ = ("on_body", "done", "status", "headers", "mode", "left", "buf", "collected",
                 "keep_alive", "got_bytes", "last", "watch")

    def __init__(self, on_body: OnBody, done: asyncio.Future, now: float):
        self.on_body, self.done = on_body, done
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.mode, self.left, self.buf = "", 0, b""  # body framing: chunked | sized | eof
        self.collected: list[bytes] | None = None  # the body of a non-2xx response
        self.keep_alive, self.got_bytes, self.last = True, False, now
        self.watch: asyncio.TimerHandle | None = None  # the idle timer now armed


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.closed = False
        self.reused = False

    # ---- asyncio callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ex = self.exchange
        if ex is None or ex.done.done():
            return
        if ex.mode == "eof":
            self._finish(ex, keep_alive=False)
        elif not ex.got_bytes:
            self._fail(ex, StaleConnection("the server closed the connection before responding"))
        else:
            self._fail(ex, ConnectionResetError(f"the connection closed mid-response ({exc or 'EOF'})"))

    def data_received(self, data: bytes) -> None:
        t = time.perf_counter()
        ex = self.exchange
        if ex is None or ex.done.done():
            self.close()  # bytes nobody asked for: this connection is not reusable
            return
        ex.got_bytes, ex.last = True, self.loop.time()
        try:
            if ex.status is None:
                data = self._head(ex, data)
                if ex.status is None or (not data and ex.mode != "sized"):
                    return
            self._body(ex, data, t)
        except BaseException as e:  # a callback's error or a protocol error ends this exchange
            self._fail(ex, e)
            self.close()

    # ---- parsing -----------------------------------------------------------------------
    def _head(self, ex: _Exchange, data: bytes) -> bytes:
        buf = ex.buf + data if ex.buf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise ProtocolError("response headers too large")
            ex.buf = buf
            return b""
        ex.status, ex.headers = _parse_head(buf[:end])
        ex.buf = b""
        ex.keep_alive = ex.headers.get("connection", "").lower() != "close"
        if "chunked" in ex.headers.get("transfer-encoding", "").lower():
            ex.mode = "chunked"
        elif "content-length" in ex.headers:
            ex.mode, ex.left = "sized", int(ex.headers["content-length"])
        else:
            ex.mode, ex.keep_alive = "eof", False
        if not 200 <= ex.status < 300:
            ex.collected = []
        return buf[end + 4:]

    def _body(self, ex: _Exchange, data: bytes, t: float) -> None:
        if ex.mode == "chunked":
            parts, ex.buf, complete = _unchunk(ex.buf + data if ex.buf else data)
            if parts:
                self._deliver(ex, parts[0] if len(parts) == 1 else b"".join(parts), t)
        elif ex.mode == "sized":
            data = data[:ex.left]
            ex.left -= len(data)
            if data:
                self._deliver(ex, data, t)
            complete = ex.left == 0
        else:
            self._deliver(ex, data, t)
            complete = False  # the end of the connection ends the body
        if complete:
            self._finish(ex, ex.keep_alive)

    @staticmethod
    def _deliver(ex: _Exchange, data: bytes, t: float) -> None:
        if ex.collected is not None:
            ex.collected.append(data)
        else:
            ex.on_body(data, t)

    def _finish(self, ex: _Exchange, keep_alive: bool) -> None:
        body = b"".join(ex.collected) if ex.collected is not None else b""
        ex.keep_alive = keep_alive
        if not ex.done.done():
            ex.done.set_result(Response(ex.status or 0, ex.headers, body))

    @staticmethod
    def _fail(ex: _Exchange, error: BaseException) -> None:
        if not ex.done.done():
            ex.done.set_exception(error)

    # ---- use -----------------------------------------------------------------------------
    async def exchange_once(self, request: bytes, on_body: OnBody, timeout_s: float) -> tuple[Response, bool]:
        """Send one request and wait for its whole response; (response, reusable)."""
        if self.closed:
            raise StaleConnection("the connection was closed before the request")
        ex = self.exchange = _Exchange(on_body, self.loop.create_future(), self.loop.time())
        self.transport.write(request)
        ex.watch = self.loop.call_at(ex.last + timeout_s, self._check_idle, ex, timeout_s)
        try:
            resp = await ex.done
        finally:
            ex.watch.cancel()
            self.exchange = None
        return resp, ex.keep_alive and not self.closed

    def _check_idle(self, ex: _Exchange, timeout_s: float) -> None:
        """One timer per exchange that re-arms itself, rather than a timeout per read."""
        due = ex.last + timeout_s
        if self.loop.time() < due:
            ex.watch = self.loop.call_at(due, self._check_idle, ex, timeout_s)
        elif not ex.done.done():
            self._fail(ex, TimeoutError(f"no data from the server for {timeout_s:g} s"))
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class ConnectionPool:
    """Connections to one origin; any number open, idle ones reused (LIFO)."""

    def __init__(self, origin: str, timeout_s: float = 600.0):
        url = urlsplit(origin)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"need an http:// or https:// URL, got {origin!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.host_header = url.netloc.rpartition("@")[2]
        self.timeout_s = timeout_s
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl), self.timeout_s)
        return conn

    async def _acquire(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return await self._connect()

    def _request_bytes(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host_header}", f"Content-Length: {len(body)}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def request(self, method: str, path: str, body: bytes, headers: dict[str, str],
                      on_body: OnBody) -> Response:
        """Send a request and wait for the whole response; ``on_body(data, t)`` gets a 2xx
        body as it arrives (see the module docstring). Errors raise (OSError, TimeoutError,
        ProtocolError, or whatever on_body raised)."""
        request = self._request_bytes(method, path, body, headers)
        conn = await self._acquire()
        try:
            resp, reusable = await conn.exchange_once(request, on_body, self.timeout_s)
        except StaleConnection:
            conn.close()
            if not conn.reused:
                raise
            self._drop_idle()  # the others idled as long: the server may have closed them too
            conn = await self._connect()
            try:
                resp, reusable = await conn.exchange_once(request, on_body, self.timeout_s)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        if reusable:
            self._idle.append(conn)
        else:
            conn.close()
        return resp

    def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def close(self) -> None:
        self._drop_idle()
        await asyncio.sleep(0)  # let the transports run their close callbacks
