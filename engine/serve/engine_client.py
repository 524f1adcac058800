"""The seam between the HTTP layer and the engine: `EngineClient`, one protocol, two engines.

    AsyncEngine (async_engine.py)  the LLMEngine on a thread of this process (tests, create_app(LLMEngine))
    CoreClient  (core_client.py)   the LLMEngine in its own process (`python -m engine.serve`)

Both take prompt token ids and hand back *token* deltas: the engine never detokenizes for the
server and never sees stop strings; the API layer does both (output_processor.py), so the
step loop does no per-token string work. A request's deltas arrive on a `RequestStream`
owned by the asyncio loop that added it; each `next()` returns everything that arrived since
the last one merged into one delta, so a slow consumer catches up in one chunk instead of many.

Admission control: at most `max_waiting` requests may be accepted but not yet started (no token
produced: queued in the scheduler or still in prefill). Past that, `add_request` raises
`EngineOverloaded` at once, which the HTTP layer turns into a 429.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from engine.outputs import RequestDelta, StepStats
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine


class EngineOverloaded(Exception):
    """Too many requests waiting; the caller should retry later (HTTP 429)."""


class RequestRejected(ValueError):
    """The engine refused the request (its ValueError from add_request; HTTP 400)."""


class EngineFailed(RuntimeError):
    """The step loop raised or the engine is gone; requests in flight get this (HTTP 5xx)."""


class TokenDelta(NamedTuple):
    """New tokens of one request (a NamedTuple: cheap to pickle, it crosses the process seam)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    num_prompt_tokens: int
    num_cached_tokens: int
    stop_reason: int | str | None = None  # the stop token id that ended it


def token_delta(d: RequestDelta) -> TokenDelta:
    """The engine's delta without its text (the engine makes none for the server)."""
    return TokenDelta(d.request_id, d.new_token_ids, d.finished, d.finish_reason,
                      d.num_prompt_tokens, d.num_cached_tokens, d.stop_reason)


def merge_deltas(first: TokenDelta, later: list[TokenDelta]) -> TokenDelta:
    """One delta holding the tokens of all; counts and finish state from the newest."""
    if not later:
        return first
    last = later[-1]
    ids = list(first.new_token_ids)
    for d in later:
        ids += d.new_token_ids
    return last._replace(new_token_ids=ids)


@dataclass
class StepTotals:
    """Counters over every step the serving loop ran: what /metrics exports so that a client can
    tell a served engine's step time and batch from its scrapes (differences over a window)."""

    num_steps: int = 0
    num_preemptions: int = 0
    step_seconds: float = 0.0  # wall time of the steps (StepStats t_end - t_start), summed
    scheduled_seqs: int = 0  # sequences in each step's batch, summed
    scheduled_tokens: int = 0  # prefill + decode tokens of each step, summed

    def add(self, stats: StepStats | None) -> None:
        self.num_steps += 1
        if stats is not None:
            self.num_preemptions += stats.num_preempted
            self.step_seconds += stats.t_end - stats.t_start
            self.scheduled_seqs += stats.num_scheduled_seqs
            self.scheduled_tokens += stats.num_prefill_tokens + stats.num_decode_tokens


@dataclass(frozen=True)
class EngineSnapshot:
    """Engine gauges after its latest step (replaced whole, never mutated)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    num_steps: int = 0
    num_preemptions: int = 0
    step_seconds: float = 0.0
    scheduled_seqs: int = 0
    scheduled_tokens: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


def engine_snapshot(engine: LLMEngine, totals: StepTotals) -> EngineSnapshot:
    bm, sched = engine.block_manager, engine.scheduler
    return EngineSnapshot(
        num_running=len(sched.running),
        num_waiting=len(sched.waiting),
        kv_blocks_used=bm.num_used_blocks,
        kv_blocks_total=bm.num_usable_blocks,
        **vars(totals),  # not dataclasses.asdict: this runs after every step, and asdict deep-copies
    )


def engine_params(params: SamplingParams) -> SamplingParams:
    """What the engine gets: token ids only; stop strings are matched by the API layer."""
    return dataclasses.replace(params, stop=[], detokenize=False)


ACCEPTED = object()  # first item on a stream once the engine took the request


class RequestStream:
    """Deltas of one request. Every method runs on the asyncio loop that created it; engines
    on other threads hand items over with `loop.call_soon_threadsafe(stream.put, item)`."""

    def __init__(self, request_id: str, on_abort: Callable[[str], None]):
        self.request_id = request_id
        self.finished = False
        self._on_abort = on_abort
        self._abort_sent = False
        self._items: deque[object] = deque()
        self._ready = asyncio.Event()

    def put(self, item: object) -> None:
        self._items.append(item)
        self._ready.set()

    async def _get(self) -> object:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    async def wait_accepted(self) -> None:
        item = await self._get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenDelta:
        """The next delta merged with any others already queued; an error ends the stream."""
        if self.finished:
            raise StopAsyncIteration
        item = await self._get()
        later: list[TokenDelta] = []
        while isinstance(item, TokenDelta) and not item.finished and self._items:
            nxt = self._items[0]
            if not isinstance(nxt, TokenDelta):
                break  # an error: deliver the tokens first, the error on the next call
            self._items.popleft()
            later.append(nxt)
            if nxt.finished:
                break
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        assert isinstance(item, TokenDelta)
        delta = merge_deltas(item, later)
        self.finished = delta.finished
        return delta

    def abort(self) -> None:
        """Abort if still running (client gone, stop string hit); a no-op once finished or
        after the first call. The engine answers with a finish_reason "abort" delta."""
        if not self.finished and not self._abort_sent:
            self._abort_sent = True
            self._on_abort(self.request_id)


class EngineClient(Protocol):
    """What the HTTP layer needs from an engine (in this process or in the core process)."""

    max_waiting: int
    failure: BaseException | None  # why the engine stopped, once it did

    @property
    def snapshot(self) -> EngineSnapshot: ...

    @property
    def num_unstarted(self) -> int: ...

    @property
    def is_alive(self) -> bool: ...

    def start(self) -> None:
        """Called on the serving asyncio loop (the app's lifespan); returns once it serves."""

    def stop(self) -> None: ...

    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> RequestStream:
        """Wait until the engine accepted the request. Raises EngineOverloaded,
        RequestRejected (bad input) or EngineFailed (the engine is not running)."""

    def abort(self, request_id: str) -> None: ...
