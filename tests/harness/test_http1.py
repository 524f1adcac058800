"""harness/backends/http1.py: the openai backend's small HTTP/1.1 client."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.backends.http1 import ConnectionPool, ProtocolError, _unchunk


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


@given(st.lists(st.binary(min_size=1, max_size=30), max_size=8), st.lists(st.integers(1, 25), max_size=40))
def test_unchunk_any_split(parts, cuts):
    wire, got, buf, done, pos = chunked(*parts), [], b"", False, 0
    for c in [*cuts, len(chunked(*parts))]:
        buf += wire[pos:pos + c]
        pos += c
        out, buf, done = _unchunk(buf)
        got += out
        if done:
            break
    assert done and b"".join(got) == b"".join(parts) and buf == b""


def test_unchunk_rejects_garbage():
    with pytest.raises(ProtocolError):
        _unchunk(b"zz\r\nabc\r\n")


async def _serve(responses: list[bytes], close_after_first: bool):
    """A server answering each request on a connection with the next canned response."""
    seen: list[bytes] = []
    connections = []

    async def handle(reader, writer):
        connections.append(writer)
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
            seen.append(head + await reader.readexactly(length))
            writer.write(responses[min(len(seen), len(responses)) - 1])
            await writer.drain()
            if close_after_first:
                break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen, connections


def test_pool_reuses_connections_and_retries_a_stale_one():
    ok = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"data: a\n\n", b"data: b\n\n")
    bad = b"HTTP/1.1 429 Too Many\r\nContent-Length: 5\r\n\r\nslow!"

    async def scenario(close_after_first: bool):
        server, url, seen, connections = await _serve([ok, bad], close_after_first)
        pool = ConnectionPool(url, timeout_s=5)
        got = []
        resp = await pool.request("POST", "/v1/x", b'{"a":1}', {"Content-Type": "application/json"},
                                  lambda data, t: got.append(data))
        assert resp.status == 200 and b"".join(got) == b"data: a\n\ndata: b\n\n" and resp.body == b""
        await asyncio.sleep(0.05)  # let a closing server's FIN arrive
        resp = await pool.request("POST", "/v1/x", b"{}", {}, lambda data, t: got.append(data))
        await pool.close()
        server.close()
        return resp.status, resp.body, seen, len(connections)

    status, text, seen, n_conn = asyncio.run(scenario(close_after_first=False))
    assert (status, text, len(seen), n_conn) == (429, b"slow!", 2, 1)  # one keep-alive connection
    assert seen[0].startswith(b"POST /v1/x HTTP/1.1\r\n") and seen[0].endswith(b'\r\n\r\n{"a":1}')
    # the server closed the idle connection: the second request goes out again on a new one
    status, text, seen, n_conn = asyncio.run(scenario(close_after_first=True))
    assert (status, text, len(seen), n_conn) == (429, b"slow!", 2, 2)


def test_pool_refused_and_bad_url():
    async def refused():
        pool = ConnectionPool("http://127.0.0.1:9", timeout_s=2)
        await pool.request("POST", "/", b"", {}, lambda data, t: None)

    with pytest.raises(OSError):
        asyncio.run(refused())
    with pytest.raises(ValueError):
        ConnectionPool("ftp://x")


def test_a_callback_error_ends_the_request_and_drops_the_connection():
    ok = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"data: a\n\n", b"data: b\n\n")

    def boom(data, t):
        raise RuntimeError("bad event")

    async def scenario():
        server, url, seen, connections = await _serve([ok], close_after_first=False)
        pool = ConnectionPool(url, timeout_s=5)
        try:
            with pytest.raises(RuntimeError, match="bad event"):
                await pool.request("POST", "/", b"", {}, boom)
            got = []
            resp = await pool.request("POST", "/", b"", {}, lambda data, t: got.append(data))
            assert resp.status == 200 and b"".join(got) == b"data: a\n\ndata: b\n\n"
        finally:
            await pool.close()
            server.close()
        return len(connections)

    assert asyncio.run(scenario()) == 2  # the failed exchange's connection was not reused


def test_a_quiet_stream_times_out():
    async def scenario():
        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(5)  # then nothing more
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        pool = ConnectionPool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", timeout_s=0.3)
        try:
            await pool.request("POST", "/", b"", {}, lambda data, t: None)
        finally:
            server.close()
            await pool.close()

    with pytest.raises(TimeoutError, match="no data"):
        asyncio.run(scenario())
