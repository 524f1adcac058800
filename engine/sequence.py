"""A request's token state as the scheduler and block manager see it."""

from __future__ import annotations

import enum
import time

from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, stop token or stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"


class Sequence:
    """Prompt plus generated tokens. `num_computed_tokens` counts tokens whose KV has been
    scheduled (advanced when a step is scheduled, so the next step can be planned while this
    one runs); `num_inflight` counts sampled tokens scheduled but not yet appended."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        arrival_time: float | None = None,
        max_model_len: int | None = None,
    ) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_inflight = 0
        self.seq_no = -1  # unique per scheduler: results of a step are matched by it
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first schedule
        self.num_preemptions = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hashes of the full blocks registered so far
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        # Cap on total tokens this sequence may reach.
        limit = len(prompt_token_ids) + sampling_params.max_tokens
        self.max_total_tokens = min(limit, max_model_len) if max_model_len else limit

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)}, {self.status.value})"
        )
