"""`--api-server-count N` (N > 1): one engine core process, N API server processes, one port.

    supervisor (this process): binds the port, spawns the core, then N API servers, and waits
      ├── llmbench-engine-core   the step loop; one connection per API server (engine_core.py)
      └── llmbench-api-{i}       uvicorn + FastAPI on the inherited listening socket, CoreClient

The listening socket is bound once here and inherited by every API process (each accepts on
the same socket; the kernel hands each connection to one of them), which works wherever
`multiprocessing` can pass a socket, unlike SO_REUSEPORT's per-OS semantics. Request ids are
uuid4-based (responses.ResponseFormat) so they are unique across API processes; the core routes
each delta to the connection the request came from.

Shutdown: SIGINT/SIGTERM here -> SIGTERM to every API process (uvicorn's graceful shutdown, its
CoreClient closes its connection) -> the core sees its connections close and exits -> anything
still alive after a grace period is killed. If any child dies on its own, the rest are stopped
the same way and the supervisor exits 1. Children also get SIGTERM from the kernel if the
supervisor itself dies (PR_SET_PDEATHSIG), so nothing is orphaned.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn

from engine.config import EngineConfig
from engine.serve.core_client import spawn_core, stop_process
from engine.serve.engine_core import set_parent_death_signal, set_process_name
from engine.serve.server import bind_socket, uvicorn_config

logger = logging.getLogger(__name__)

API_STOP_TIMEOUT_S = 10.0


def run_api_server(index: int, config: EngineConfig, conn: Connection, sock: socket.socket,
                   app_kwargs: dict[str, Any], log_level: str) -> None:
    """Process entry point (spawn) of API server `index`."""
    from engine.serve.app import create_app  # the app module is heavy: only in this child

    set_parent_death_signal()
    set_process_name(f"llmbench-api-{index}")
    logging.basicConfig(level=log_level.upper(),
                        format=f"%(asctime)s %(levelname)s api-{index} %(name)s: %(message)s")
    app = create_app(config, core_connection=conn, log_level=log_level.upper(), **app_kwargs)
    uvicorn.Server(uvicorn_config(app, log_level)).run(sockets=[sock])


def run_servers(config: EngineConfig, app_kwargs: dict[str, Any], host: str, port: int,
                count: int, log_level: str = "info") -> int:
    """Serve until SIGINT/SIGTERM (exit 0) or until a child dies (exit 1)."""
    if count < 1:
        raise ValueError(f"api_server_count must be >= 1, got {count}")
    ctx = multiprocessing.get_context("spawn")
    sock = bind_socket(host, port)
    pipes = [ctx.Pipe() for _ in range(count)]
    core = spawn_core(config, [theirs for _, theirs in pipes], log_level.upper())
    apis: list[BaseProcess] = []
    try:
        for index, (ours, theirs) in enumerate(pipes):
            theirs.close()  # the core's end: only the core holds it now
            proc = ctx.Process(target=run_api_server, name=f"llmbench-api-{index}", daemon=False,
                               args=(index, config, ours, sock, app_kwargs, log_level))
            proc.start()
            ours.close()  # the API server's end: only it holds it now
            apis.append(proc)
        logger.info("serving on http://%s:%d with %d API server processes and one engine core",
                    host, sock.getsockname()[1], count)
        sock.close()  # the children hold the listening socket
        return 0 if _supervise(core, apis) else 1
    finally:
        _stop_all(core, apis)
        sock.close()


def _supervise(core: BaseProcess, apis: list[BaseProcess]) -> bool:
    """Block until a signal (True: asked to stop) or a child's exit (False)."""
    # both set explicitly: a shell starts background jobs with SIGINT ignored
    previous = {s: signal.signal(s, _raise_keyboard_interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ready = wait([p.sentinel for p in (core, *apis)])
    except KeyboardInterrupt:
        return True
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    dead = [p for p in (core, *apis) if p.sentinel in ready]
    for proc in dead:
        proc.join(1.0)
        logger.error("%s exited (code %s); stopping the server", proc.name, proc.exitcode)
    return False


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop_all(core: BaseProcess, apis: list[BaseProcess]) -> None:
    # signals are ignored while we stop: a second Ctrl-C must not leave children behind
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for proc in apis:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: uvicorn shuts down gracefully
        for proc in apis:
            stop_process(proc, API_STOP_TIMEOUT_S)
        stop_process(core)  # its connections are closed: it is on its way out
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
