"""What the engine hands back: per-step deltas for streaming callers, and whole-request outputs
for `LLM.generate` (vLLM's RequestOutput / CompletionOutput shape)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class RequestDelta:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    num_prompt_tokens: int
    num_cached_tokens: int
    stop_reason: int | str | None = None


@dataclass(kw_only=True)
class StepCounts:
    """What one engine step did and what the KV cache held after it: the counts the harness
    records per step (harness.records.StepRecord derives from this class)."""

    num_running: int
    num_waiting: int
    num_scheduled_seqs: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_preempted: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_slots_allocated: int
    kv_tokens_stored: int
    kv_waste_internal_slots: int
    kv_waste_reserved_slots: int
    prefix_query_tokens: int  # cumulative
    prefix_hit_tokens: int  # cumulative

    def counts(self) -> dict[str, int]:
        """The StepCounts fields of this object (a subclass may carry more)."""
        return {f.name: getattr(self, f.name) for f in fields(StepCounts)}


@dataclass(kw_only=True)
class StepStats(StepCounts):
    """`LLMEngine.last_step_stats`: the step's counts, its clock times and host timings."""

    t_start: float  # time.perf_counter()
    t_end: float
    schedule_s: float = 0.0  # host: scheduler.schedule()
    execute_s: float = 0.0  # launch (input prep, forward, sampling) + waiting for sampled ids
    launch_s: float = 0.0  # host: the launch part of execute_s (on a CPU the forward runs inside it)
    postprocess_s: float = 0.0  # host: update sequences, detokenize (async: the previous step's)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
