"""`AsyncEngine`: the in-process `EngineClient` (engine_client.py): the (not thread-safe)
`LLMEngine` on one background thread of this process.

Callers on any asyncio loop send commands (add / abort) through a lock-protected deque; after
each step the thread hands every loop its requests' token deltas in one
`loop.call_soon_threadsafe`, merged per request. The thread sleeps on a condition while the
engine has nothing to do, so an idle server burns no CPU. `python -m engine.serve` runs the
engine in its own process instead (core_client.py); this one serves tests and callers that
pass their own LLMEngine to `create_app`, and shares the GIL with HTTP and detokenization.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict, deque
from dataclasses import dataclass

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.serve.engine_client import (
    ACCEPTED,
    EngineFailed,
    EngineOverloaded,
    EngineSnapshot,
    RequestRejected,
    RequestStream,
    StepTotals,
    engine_params,
    engine_snapshot,
    token_delta,
)

# Re-exported: callers imported them from here before the seam had its own module.
__all__ = ["AsyncEngine", "EngineFailed", "EngineOverloaded", "EngineSnapshot", "RequestRejected"]

logger = logging.getLogger(__name__)


@dataclass
class _Add:
    stream: RequestStream
    loop: asyncio.AbstractEventLoop
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256):
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.snapshot = EngineSnapshot(kv_blocks_total=engine.block_manager.num_usable_blocks)
        self.failure: BaseException | None = None  # set if the loop thread itself died
        self._cond = threading.Condition()
        self._commands: deque[_Add | _Abort] = deque()
        self._num_unstarted = 0  # accepted, no token yet; guarded by _cond
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Owned by the loop thread only:
        self._streams: dict[str, tuple[RequestStream, asyncio.AbstractEventLoop]] = {}
        self._unstarted: set[str] = set()
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, object]]] = defaultdict(list)
        self._totals = StepTotals()

    # ---- lifecycle (caller side) ---------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._thread = threading.Thread(target=self._run, name="llm-engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop thread; requests still in flight end with an EngineFailed error."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.error("engine loop thread did not stop within %.1f s", timeout_s)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def num_unstarted(self) -> int:
        """Accepted requests with no token yet: what max_waiting limits."""
        return self._num_unstarted

    # ---- requests (caller side, on an asyncio loop) --------------------------------------
    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> RequestStream:
        stream = RequestStream(request_id, self.abort)
        with self._cond:
            if not self.is_alive:
                raise EngineFailed(f"the engine loop is not running ({self.failure or 'stopped'})")
            if self._num_unstarted >= self.max_waiting:
                raise EngineOverloaded(
                    f"server overloaded: {self._num_unstarted} requests are already waiting "
                    f"(max_waiting={self.max_waiting}); retry later"
                )
            self._num_unstarted += 1
            add = _Add(stream, asyncio.get_running_loop(), prompt_token_ids, engine_params(params))
            self._commands.append(add)
            self._cond.notify()
        try:
            await stream.wait_accepted()
        except asyncio.CancelledError:
            self.abort(request_id)  # the client left while we waited for the loop thread
            raise
        return stream

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._commands.append(_Abort(request_id))
            self._cond.notify()

    # ---- the loop thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                commands = self._wait_for_work()
                if commands is None:
                    break
                for command in commands:
                    self._apply(command)
                if self.engine.has_unfinished_requests():
                    self._step()
                self._flush()
        except BaseException as e:  # the thread must not die silently: log and fail everyone
            self.failure = e
            logger.exception("engine loop thread died")
        finally:
            error = EngineFailed(f"the engine loop stopped ({self.failure or 'shutdown'})")
            self._fail_all(error)  # aborts them too: a caller-owned engine may outlive this loop
            self._fail_queued(error)
            self._flush()

    def _wait_for_work(self) -> list[_Add | _Abort] | None:
        with self._cond:
            while not (self._commands or self._stopping or self.engine.has_unfinished_requests()):
                self._cond.wait()
            if self._stopping:
                return None
            commands = list(self._commands)
            self._commands.clear()
        return commands

    def _send(self, stream: RequestStream, loop: asyncio.AbstractEventLoop, item: object) -> None:
        self._outbox[loop].append((stream, item))

    def _flush(self) -> None:
        """One hand-over per caller loop per step, not one per token."""
        for loop, items in self._outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
                pass
        self._outbox.clear()

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)  # False if unknown or already done
            return
        stream = command.stream
        try:
            self.engine.add_request(stream.request_id, command.prompt_token_ids, command.params)
        except ValueError as e:
            self._mark_started(stream.request_id, force=True)
            self._send(stream, command.loop, RequestRejected(str(e)))
            return
        self._streams[stream.request_id] = (stream, command.loop)
        self._unstarted.add(stream.request_id)
        self._send(stream, command.loop, ACCEPTED)

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; failing %d requests in flight", len(self._streams))
            self._fail_all(EngineFailed(f"engine step failed: {type(e).__name__}: {e}"))
            return
        self._totals.add(self.engine.last_step_stats)
        for delta in deltas:
            self._mark_started(delta.request_id)
            entry = self._streams.get(delta.request_id)
            if entry is not None:
                self._send(entry[0], entry[1], token_delta(delta))
            if delta.finished:
                self._streams.pop(delta.request_id, None)
        self._publish()

    def _mark_started(self, request_id: str, force: bool = False) -> None:
        if force or request_id in self._unstarted:
            self._unstarted.discard(request_id)
            with self._cond:
                self._num_unstarted -= 1

    def _fail_all(self, error: Exception) -> None:
        """Every request in flight gets `error` and is aborted in the engine (KV blocks freed)."""
        for request_id, (stream, loop) in list(self._streams.items()):
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("abort of %s after a failed step also failed", request_id)
            self._mark_started(request_id)
            self._send(stream, loop, error)
        self._streams.clear()
        try:
            self.engine.step()  # drain the abort deltas it queued (nothing left to schedule)
        except Exception:
            logger.exception("draining aborts after a failed step failed")
        self._publish()

    def _fail_queued(self, error: Exception) -> None:
        """Requests still in the command queue when the loop ends never reach the engine."""
        with self._cond:
            pending = [c for c in self._commands if isinstance(c, _Add)]
            self._commands.clear()
        for command in pending:
            self._mark_started(command.stream.request_id, force=True)
            self._send(command.stream, command.loop, error)

    def _publish(self) -> None:
        self.snapshot = engine_snapshot(self.engine, self._totals)


def _deliver(items: list[tuple[RequestStream, object]]) -> None:
    for stream, item in items:
        stream.put(item)
