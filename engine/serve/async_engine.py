"""`AsyncEngine`: an asyncio front for the (not thread-safe) `LLMEngine`.

One background thread owns the engine and runs its step loop. Callers on any asyncio loop send
commands (add / abort) through a lock-protected deque and get deltas back on a per-request
asyncio.Queue, filled with `loop.call_soon_threadsafe`. The thread sleeps on a condition while
the engine has nothing to do, so an idle server burns no CPU.

Admission control: at most `max_waiting` requests may be accepted but not yet started (no token
produced: queued in the scheduler or still in prefill). Past that, `add_request` raises
`EngineOverloaded` at once, which the HTTP layer turns into a 429, so an overload shows up as
fast, clear refusals instead of unbounded queueing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass

from engine.llm_engine import LLMEngine
from engine.outputs import RequestDelta
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineOverloaded(Exception):
    """Too many requests waiting; the caller should retry later (HTTP 429)."""


class RequestRejected(ValueError):
    """The engine refused the request (its ValueError from add_request; HTTP 400)."""


class EngineFailed(RuntimeError):
    """The step loop raised; every request in flight at that moment gets this (HTTP 500)."""


@dataclass(frozen=True)
class EngineSnapshot:
    """Gauges published by the loop thread after each step (replaced whole, never mutated)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    num_steps: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


_ACCEPTED = object()  # first item on a stream once add_request succeeded


class RequestStream:
    """Deltas of one request, consumed on the asyncio loop that created it."""

    def __init__(self, request_id: str, owner: AsyncEngine, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.finished = False
        self._owner = owner
        self._loop = loop
        self._queue: asyncio.Queue[object] = asyncio.Queue()

    def put(self, item: object) -> None:
        """Called from the loop thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            pass

    async def wait_accepted(self) -> None:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestDelta:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        assert isinstance(item, RequestDelta)
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Abort if still running (client gone); a no-op once finished. Safe to call twice."""
        if not self.finished:
            self._owner.abort(self.request_id)


@dataclass
class _Add:
    stream: RequestStream
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
        self._streams: dict[str, RequestStream] = {}
        self._unstarted: set[str] = set()
        self._num_steps = 0

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
        """Queue a request and wait until the engine accepted it. Raises EngineOverloaded,
        RequestRejected (bad input) or EngineFailed (the loop is not running)."""
        stream = RequestStream(request_id, self, asyncio.get_running_loop())
        with self._cond:
            if not self.is_alive:
                raise EngineFailed(f"the engine loop is not running ({self.failure or 'stopped'})")
            if self._num_unstarted >= self.max_waiting:
                raise EngineOverloaded(
                    f"server overloaded: {self._num_unstarted} requests are already waiting "
                    f"(max_waiting={self.max_waiting}); retry later"
                )
            self._num_unstarted += 1
            self._commands.append(_Add(stream, prompt_token_ids, params))
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
        except BaseException as e:  # the thread must not die silently: log and fail everyone
            self.failure = e
            logger.exception("engine loop thread died")
        finally:
            error = EngineFailed(f"the engine loop stopped ({self.failure or 'shutdown'})")
            self._fail_all(error)  # aborts them too: a caller-owned engine may outlive this loop
            self._fail_queued(error)

    def _wait_for_work(self) -> list[_Add | _Abort] | None:
        with self._cond:
            while not (self._commands or self._stopping or self.engine.has_unfinished_requests()):
                self._cond.wait()
            if self._stopping:
                return None
            commands = list(self._commands)
            self._commands.clear()
        return commands

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)  # False if unknown or already done
            return
        stream = command.stream
        try:
            self.engine.add_request(stream.request_id, command.prompt_token_ids, command.params)
        except ValueError as e:
            self._mark_started(stream.request_id, force=True)
            stream.put(RequestRejected(str(e)))
            return
        self._streams[stream.request_id] = stream
        self._unstarted.add(stream.request_id)
        stream.put(_ACCEPTED)

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; failing %d requests in flight", len(self._streams))
            self._fail_all(EngineFailed(f"engine step failed: {type(e).__name__}: {e}"))
            return
        self._num_steps += 1
        for delta in deltas:
            self._mark_started(delta.request_id)
            stream = self._streams.get(delta.request_id)
            if stream is not None:
                stream.put(delta)
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
        for request_id, stream in list(self._streams.items()):
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("abort of %s after a failed step also failed", request_id)
            self._mark_started(request_id)
            stream.put(error)
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
            command.stream.put(error)

    def _publish(self) -> None:
        bm = self.engine.block_manager
        sched = self.engine.scheduler
        self.snapshot = EngineSnapshot(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_usable_blocks,
            num_steps=self._num_steps,
        )
