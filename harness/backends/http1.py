"""A small asyncio HTTP/1.1 client for streamed POSTs: the openai backend's transport.

    pool = ConnectionPool("http://127.0.0.1:8000", timeout_s=600)
    async with pool.post("/v1/completions", body_bytes, headers) as resp:
        if resp.status != 200: text = await resp.read_all()
        async for data in resp.body():      # whatever arrived, chunked framing removed
            ...
    await pool.close()

Why not httpx: httpx (httpcore + h11) hands the body over one HTTP chunk at a time, through
several layers of Python per chunk, and a streaming server sends one chunk per SSE event, so at
tens of thousands of events per second the client's CPU went to h11 (about 70% of it, profiled
against harness.mock_server). Here one socket read is unframed in one pass, however many
chunks it holds, and handed over as one bytes object.

Scope: HTTP/1.1 with keep-alive (one request per connection at a time, idle connections reused
within the pool), Content-Length or chunked request/response bodies (or a body that ends with
the connection), http and https (default certificate checks), a timeout per network wait
(connect, and each read: the stream may go quiet for at most timeout_s). No proxies, redirects,
compression or HTTP/2. A reused connection that the server had already closed is retried once
on a fresh one (only when no byte of a response arrived).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

READ_SIZE = 1 << 18


class ProtocolError(Exception):
    """The server's response is not HTTP/1.1 as this client speaks it."""


class _Conn:
    __slots__ = ("reader", "writer", "reused")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.reused = reader, writer, False

    def close(self) -> None:
        self.writer.close()


class Response:
    """Status, headers (lower-case names) and the body as an async iterator of bytes."""

    def __init__(self, conn: _Conn, status: int, headers: dict[str, str], timeout_s: float):
        self._conn, self.status, self.headers, self._timeout_s = conn, status, headers, timeout_s
        self.complete = False  # the whole body was read: the connection may serve another request
        self.keep_alive = headers.get("connection", "").lower() != "close"

    async def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives. A read that waits longer than timeout_s raises TimeoutError.
        The wait is watched by one timer per response that re-arms itself, rather than a
        timeout context per read (that cost ~15% of the client's CPU at one event per read)."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            gen = self._chunked()
        elif "content-length" in self.headers:
            gen = self._sized(int(self.headers["content-length"]))
        else:
            self.keep_alive = False
            gen = self._until_eof()
        with _IdleWatch(self._conn, self._timeout_s) as watch:
            try:
                async for data in gen:
                    watch.last = watch.loop.time()
                    yield data
            except asyncio.CancelledError:
                if watch.fired:
                    raise TimeoutError(f"no data from the server for {self._timeout_s:g} s") from None
                raise

    async def read_all(self) -> bytes:
        return b"".join([data async for data in self.body()])

    async def _sized(self, left: int) -> AsyncIterator[bytes]:
        read = self._conn.reader.read
        while left > 0:
            data = await read(READ_SIZE)
            if not data:
                raise ProtocolError(f"connection closed with {left} body bytes missing")
            left -= len(data)
            yield data
        self.complete = True

    async def _until_eof(self) -> AsyncIterator[bytes]:
        read = self._conn.reader.read
        while data := await read(READ_SIZE):
            yield data
        self.complete = True

    async def _chunked(self) -> AsyncIterator[bytes]:
        read, buf = self._conn.reader.read, b""
        while True:
            data = await read(READ_SIZE)
            if not data:
                raise ProtocolError("connection closed inside a chunked body")
            buf = buf + data if buf else data
            parts, buf, done = _unchunk(buf)
            if parts:
                yield parts[0] if len(parts) == 1 else b"".join(parts)
            if done:
                self.complete = True
                return


class _IdleWatch:
    """Cancels the current task when `last` (loop time of the last data) grows older than
    timeout_s; checks once per timeout_s at most."""

    def __init__(self, conn: _Conn, timeout_s: float):
        self.loop, self.timeout_s = asyncio.get_running_loop(), timeout_s
        self.task = asyncio.current_task()
        self.last, self.fired = self.loop.time(), False
        self._handle: asyncio.TimerHandle | None = None

    def __enter__(self) -> _IdleWatch:
        self._handle = self.loop.call_at(self.last + self.timeout_s, self._check)
        return self

    def _check(self) -> None:
        due = self.last + self.timeout_s
        if self.loop.time() >= due:
            self.fired = True
            self.task.cancel()
        else:
            self._handle = self.loop.call_at(due, self._check)

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.cancel()


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
        self._idle: list[_Conn] = []

    async def _connect(self) -> _Conn:
        if self._idle:
            conn = self._idle.pop()
            conn.reused = True
            return conn
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=READ_SIZE), self.timeout_s)
        return _Conn(reader, writer)

    def _request_bytes(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host_header}", f"Content-Length: {len(body)}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def _send(self, conn: _Conn, request: bytes) -> Response:
        conn.writer.write(request)
        try:
            head = await asyncio.wait_for(self._head(conn), self.timeout_s)
        except asyncio.IncompleteReadError as e:
            raise ConnectionResetError("the server closed the connection before responding") from e
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return Response(conn, int(parts[1]), headers, self.timeout_s)

    @staticmethod
    async def _head(conn: _Conn) -> bytes:
        await conn.writer.drain()
        return await conn.reader.readuntil(b"\r\n\r\n")

    @asynccontextmanager
    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> AsyncIterator[Response]:
        request = self._request_bytes("POST", path, body, headers)
        conn = await self._connect()
        try:
            resp = await self._send(conn, request)
        except (ConnectionError, asyncio.IncompleteReadError):
            conn.close()
            if not conn.reused:
                raise
            conn = await self._connect_fresh()  # the server had closed the idle connection
            try:
                resp = await self._send(conn, request)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        try:
            yield resp
        finally:
            if resp.complete and resp.keep_alive:
                self._idle.append(conn)
            else:
                conn.close()

    async def _connect_fresh(self) -> _Conn:
        while self._idle:  # the others idled as long: drop them too
            self._idle.pop().close()
        return await self._connect()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            try:
                await conn.writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass
