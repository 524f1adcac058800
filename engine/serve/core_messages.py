"""Messages between API server processes and the engine core process (engine_core.py).

API -> core, one message per hand-over: a `list[AddRequest | AbortRequest]` (everything queued
since the last one), or `Shutdown()`.
Core -> API, one message per step per API process: `CoreOutput`; once at start `CoreReady`
(or `CoreFailed` if the engine could not be built).

NamedTuples: pickled as a class reference plus fields, the cheapest structured form for
`multiprocessing.connection` (see engine_core.py for why that transport).
"""

from __future__ import annotations

from typing import NamedTuple

from engine.sampling_params import SamplingParams
from engine.serve.engine_client import EngineSnapshot, TokenDelta


class AddRequest(NamedTuple):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # already stripped of stop strings (engine_client.engine_params)


class AbortRequest(NamedTuple):
    request_id: str


class Shutdown(NamedTuple):
    pass


class CoreReady(NamedTuple):
    max_model_len: int
    vocab_size: int
    snapshot: EngineSnapshot


class CoreFailed(NamedTuple):
    message: str


class CoreOutput(NamedTuple):
    deltas: list[TokenDelta]
    accepted: list[str]  # request ids the engine took since the last output
    rejected: list[tuple[str, str]]  # (request id, why): the engine's ValueError, a 400
    failed: list[tuple[str, str]]  # (request id, why): a step failed, a 500
    snapshot: EngineSnapshot
