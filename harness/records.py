"""Raw rows a run produces. Only timestamps and counts live here; every metric (TTFT, TPOT,
ITL, E2EL, throughput, goodput) is a function of these rows (harness/metrics.py).

All times are seconds on one monotonic clock (time.perf_counter) relative to the run start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.outputs import StepCounts


@dataclass
class RequestRecord:
    request_id: str
    scheduled_s: float  # when the trace says the request arrives
    sent_s: float | None = None  # when the backend accepted it
    first_token_s: float | None = None
    finished_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # one entry per output token
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    status: str = "pending"  # ok | error | aborted | not_sent (past --duration) | pending
    error: str | None = None
    finish_reason: str | None = None
    prefix_group: str | None = None
    conversation_id: str | None = None  # multi-turn chat: the conversation and this turn's index
    turn: int | None = None
    window: str = "steady"  # warmup | steady | cooldown: only steady rows enter the summary


@dataclass
class StepRecord(StepCounts):
    """One engine step (continuous or static backend): the engine's StepCounts (prefix counts
    relative to the run start) and when the step ran."""

    step: int
    start_s: float
    end_s: float


@dataclass
class TelemetrySample:
    """One NVML reading; fields are None on a machine without NVML (never faked)."""

    t_s: float
    gpu_index: int | None = None
    gpu_util_pct: float | None = None
    mem_util_pct: float | None = None
    mem_used_bytes: float | None = None
    power_w: float | None = None
    sm_clock_mhz: float | None = None
    energy_j: float | None = None  # total-energy counter, joules since driver load
