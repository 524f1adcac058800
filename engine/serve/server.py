"""Run the app with uvicorn: `serve()` in the foreground (the CLI), `ServerThread` on a
background thread (tests and in-process benchmarks).

Both bind their own socket first and hand it to uvicorn; with port 0 the OS picks a free port,
so there is no pick-then-bind race and no hard-coded port.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

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


def uvicorn_config(app: Any, log_level: str) -> uvicorn.Config:
    # A short graceful-shutdown window: streams still open then are cancelled (and aborted).
    return uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,
        access_log=log_level == "debug",
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
