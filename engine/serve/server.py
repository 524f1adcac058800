"""Run the app with uvicorn: `serve()` in the foreground (the CLI), `ServerThread` on a
background thread (tests and in-process benchmarks).

Both bind their own socket first and hand it to uvicorn; with port 0 the OS picks a free port,
so there is no pick-then-bind race and no hard-coded port.

Slow clients: uvicorn closes idle keep-alive connections (timeout_keep_alive) and bounds the
header size (h11_max_incomplete_event_size), but it gives a connection that trickles its
request headers unlimited time. `HeaderDeadline` (uvicorn's own HTTP protocol, subclassed)
closes a connection whose request headers are not complete `header_timeout_s` after it opened
or after its previous response; the body has its own deadline (middleware.py BodyLimit).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

LOOPBACK = "127.0.0.1"


def bind_socket(host: str = LOOPBACK, port: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it Nagle + delayed ACKs hold the first streamed chunks back ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (for a child process that binds it itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


DEFAULT_HEADER_TIMEOUT_S = 10.0


class HeaderDeadline(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol (httptools or h11) with a deadline on request headers.

    A request's headers are complete when the protocol starts its request cycle (`self.cycle`
    becomes a new object, in both implementations). The deadline is armed when the connection
    opens and after each response; when it fires, the connection is closed only if no request
    began since and none is in progress (a pipelined one may be)."""

    header_timeout_s = DEFAULT_HEADER_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        done = self.cycle  # a pipelined request may start a new cycle inside super()
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline(done)

    def _arm_header_deadline(self, armed_cycle: Any) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(
            self.header_timeout_s, self._header_deadline, armed_cycle
        )

    def _header_deadline(self, armed_cycle: Any) -> None:
        idle = armed_cycle is None or armed_cycle.response_complete
        if self.cycle is armed_cycle and idle and not self.transport.is_closing():
            self.transport.close()


def header_deadline_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    if not header_timeout_s > 0:
        raise ValueError(f"header_timeout_s must be > 0, got {header_timeout_s}")
    return type("HeaderDeadline", (HeaderDeadline,), {"header_timeout_s": header_timeout_s})


def uvicorn_config(app: Any, log_level: str) -> uvicorn.Config:
    """The app's header deadline comes from `app.state.header_timeout_s` (create_app sets it),
    so every process that serves an app (serve(), ServerThread, launcher.py) applies it."""
    state = getattr(app, "state", None)
    header_timeout_s = getattr(state, "header_timeout_s", DEFAULT_HEADER_TIMEOUT_S)
    # A short graceful-shutdown window: streams still open then are cancelled (and aborted).
    return uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,
        access_log=log_level == "debug",
        http=header_deadline_protocol(header_timeout_s),
    )


def serve(app: Any, host: str = LOOPBACK, port: int = 8000, log_level: str = "info") -> None:
    sock = bind_socket(host, port)
    try:
        uvicorn.Server(uvicorn_config(app, log_level)).run(sockets=[sock])
    finally:
        sock.close()


class ServerThread:
    """uvicorn on a daemon thread: `with ServerThread(app) as srv: httpx.get(srv.url + "/health")`."""

    def __init__(self, app: Any, host: str = LOOPBACK, port: int = 0, log_level: str = "warning"):
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, log_level))
        self.thread = threading.Thread(
            target=self.server.run,
            kwargs={"sockets": [self.sock]},
            name=f"uvicorn-{self.port}",
            daemon=True,
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                self.sock.close()
                raise RuntimeError("server thread exited during startup (see its log)")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server did not start within {timeout_s} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        self.sock.close()
        if self.thread.is_alive():
            raise RuntimeError(f"server thread did not stop within {timeout_s} s")

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
