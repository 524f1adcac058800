"""`CoreClient`: the `EngineClient` (engine_client.py) of an API server process, talking to
the engine core process (engine_core.py) over one `multiprocessing` connection.

All request state lives on the serving asyncio loop; two small threads move bytes so the loop
never blocks on the socket: a receiver (`recv`, then one `call_soon_threadsafe` per core
message, that is per step) and a sender (requests and aborts queued by the loop, sent as one
message per hand-over). If the connection breaks (the core died), every request in flight
ends with `EngineFailed` at once and `is_alive` turns false (/health: 503).

`CoreClient.spawn(config)` starts a core of its own (one API process, the default);
`CoreClient(conn)` joins a core that a launcher started for several API processes.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import threading
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.serve.core_messages import (
    AbortRequest,
    AddRequest,
    CoreFailed,
    CoreOutput,
    CoreReady,
    Shutdown,
)
from engine.serve.engine_client import (
    ACCEPTED,
    EngineFailed,
    EngineOverloaded,
    EngineSnapshot,
    RequestRejected,
    RequestStream,
    engine_params,
)
from engine.serve.engine_core import run_engine_core

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 15.0  # a TP engine's shutdown joins its workers


def spawn_core(config: EngineConfig, conns: list[Connection], log_level: str = "INFO") -> BaseProcess:
    # spawn: the core initialises CUDA, which a forked child of a CUDA-using parent cannot.
    # Not a daemon: daemonic processes may not have children, and TP workers are its children.
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=run_engine_core, args=(config, conns, log_level),
                       name="llmbench-engine-core", daemon=False)
    proc.start()
    return proc


def stop_process(proc: BaseProcess, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Join, then SIGTERM, then SIGKILL: the process is gone when this returns."""
    proc.join(timeout_s)
    if proc.is_alive():
        logger.warning("%s did not exit within %.0f s; terminating", proc.name, timeout_s)
        proc.terminate()
        proc.join(5.0)
    if proc.is_alive():
        proc.kill()
        proc.join(5.0)


class CoreClient:
    def __init__(self, conn: Connection, max_waiting: int = 256, process: BaseProcess | None = None):
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.max_waiting = max_waiting
        self.process = process  # owned (stopped with us) when given
        self.failure: BaseException | None = None
        self.ready: CoreReady | None = None
        self._conn = conn
        self._snapshot = EngineSnapshot()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}
        self._unstarted: set[str] = set()
        self._ops: list[AddRequest | AbortRequest] = []
        self._outq: queue.SimpleQueue[list | Shutdown | None] = queue.SimpleQueue()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    @classmethod
    def spawn(cls, config: EngineConfig, max_waiting: int = 256, log_level: str = "INFO") -> CoreClient:
        ours, theirs = multiprocessing.get_context("spawn").Pipe()
        proc = spawn_core(config, [theirs], log_level)
        theirs.close()  # only the core holds it now: its death is our EOF
        return cls(ours, max_waiting, proc)

    # ---- EngineClient ---------------------------------------------------------------------
    @property
    def snapshot(self) -> EngineSnapshot:
        return self._snapshot

    @property
    def num_unstarted(self) -> int:
        return len(self._unstarted)

    @property
    def is_alive(self) -> bool:
        return self.ready is not None and self.failure is None and not self._stopping

    def start(self) -> None:
        """Wait (blocking) for the core's CoreReady, then start moving messages. Call it on
        the loop that will serve requests."""
        self._loop = asyncio.get_running_loop()
        msg = self._wait_ready()
        if isinstance(msg, CoreFailed):
            self._stopping = True
            self._reap()
            raise RuntimeError(f"the engine core failed to start: {msg.message}")
        self.ready, self._snapshot = msg, msg.snapshot
        for target, name in ((self._receive, "core-receiver"), (self._send_loop, "core-sender")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _wait_ready(self) -> CoreReady | CoreFailed:
        # no overall timeout (a big checkpoint loads for minutes), but never past the core's death
        while not self._conn.poll(0.1):
            if self.process is not None and not self.process.is_alive():
                raise RuntimeError(f"the engine core exited during start-up (exit code {self.process.exitcode})")
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"the engine core exited during start-up ({self._exit_info()})") from None

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._threads:
            self._outq.put(Shutdown())
            self._outq.put(None)
        else:  # never started: tell the core directly
            try:
                self._conn.send(Shutdown())
            except (OSError, ValueError):
                pass
        self._fail_all(EngineFailed("the server is shutting down"))
        self._reap()

    def _reap(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self._conn.close()

    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> RequestStream:
        if not self.is_alive:
            raise EngineFailed(f"the engine core is not running ({self.failure or 'stopped'})")
        if request_id in self._streams:
            raise RequestRejected(f"request_id {request_id!r} is already in use")
        if len(self._unstarted) >= self.max_waiting:
            raise EngineOverloaded(
                f"server overloaded: {len(self._unstarted)} requests are already waiting "
                f"(max_waiting={self.max_waiting}); retry later"
            )
        stream = RequestStream(request_id, self.abort)
        self._streams[request_id] = stream
        self._unstarted.add(request_id)
        self._queue_op(AddRequest(request_id, prompt_token_ids, engine_params(params)))
        try:
            await stream.wait_accepted()
        except asyncio.CancelledError:
            self.abort(request_id)  # the client left while the core had not answered yet
            raise
        return stream

    def abort(self, request_id: str) -> None:
        if self._stopping or self.failure is not None:
            return
        self._queue_op(AbortRequest(request_id))

    # ---- to the core ------------------------------------------------------------------------
    def _queue_op(self, op: AddRequest | AbortRequest) -> None:
        if not self._ops:  # first of this loop iteration: hand them all over at its end
            asyncio.get_running_loop().call_soon(self._hand_over)
        self._ops.append(op)

    def _hand_over(self) -> None:
        ops, self._ops = self._ops, []
        self._outq.put(ops)

    def _send_loop(self) -> None:
        while True:
            item = self._outq.get()
            if item is None:
                return
            if isinstance(item, list):  # merge whatever else is queued into one message
                while True:
                    try:
                        nxt = self._outq.get_nowait()
                    except queue.Empty:
                        break
                    if not isinstance(nxt, list):
                        self._outq.put(nxt)  # Shutdown / None keep their place: last
                        break
                    item += nxt
            try:
                self._conn.send(item)
            except (OSError, ValueError):  # closed or broken: the receiver reports the death
                return

    # ---- from the core ----------------------------------------------------------------------
    def _receive(self) -> None:
        loop = self._loop
        assert loop is not None
        try:
            while True:
                msg = self._conn.recv()
                loop.call_soon_threadsafe(self._dispatch, msg)
        except (EOFError, OSError):
            if not self._stopping:
                reason = f"the engine core process died ({self._exit_info()})"  # here: it may wait
                try:
                    loop.call_soon_threadsafe(self._core_died, reason)
                except RuntimeError:
                    pass
        except RuntimeError:  # the loop is closed: nobody to deliver to
            pass

    def _exit_info(self) -> str:
        if self.process is None:
            return "connection closed"
        self.process.join(2.0)  # the EOF comes a moment before the exit status
        return f"exit code {self.process.exitcode}"

    def _core_died(self, reason: str) -> None:
        logger.error("%s; failing %d requests in flight", reason, len(self._streams))
        self.failure = EngineFailed(reason)
        self._fail_all(self.failure)

    def _fail_all(self, error: EngineFailed) -> None:
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()
        self._unstarted.clear()

    def _dispatch(self, out: CoreOutput) -> None:
        self._snapshot = out.snapshot
        streams, unstarted = self._streams, self._unstarted
        for request_id in out.accepted:
            stream = streams.get(request_id)
            if stream is not None:
                stream.put(ACCEPTED)
        for errors, kind in ((out.rejected, RequestRejected), (out.failed, EngineFailed)):
            for request_id, message in errors:
                unstarted.discard(request_id)
                stream = streams.pop(request_id, None)
                if stream is not None:
                    stream.put(kind(message))
        for delta in out.deltas:
            stream = streams.get(delta.request_id)
            if stream is None:
                continue
            unstarted.discard(delta.request_id)
            stream.put(delta)
            if delta.finished:
                del streams[delta.request_id]
