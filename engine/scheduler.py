"""Iteration-level scheduling with a token budget (vLLM v1 style).

There are no prefill/decode phases: each sequence has `num_computed_tokens`, and each step a
token budget goes to running sequences first (decodes and unfinished prefill chunks), then to
waiting ones, so chunked prefill, prefix hits and mixed prefill+decode steps fall out. When KV
blocks run short the last running sequence is preempted (recompute).

`StaticScheduler` is the static-batching baseline on the same runner: a new batch is admitted
only when the previous one has fully finished, and each request reserves KV for its whole
maximum length up front.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(slots=True)  # built once per sequence per step: keep construction cheap
class ScheduledSequence:
    """One sequence's share of a step. Plain data (no tensors) so it can be pickled to workers."""

    request_id: str
    token_ids: list[int]  # tokens whose KV is computed this step (last may be a placeholder)
    start_pos: int  # num_computed_tokens before this step
    block_table: list[int]
    sample: bool  # the chunk reaches the last known token: sample the next one
    sampling_params: SamplingParams
    num_output_tokens: int
    num_preemptions: int = 0  # the block table only grows between preemptions (runner caches rows)
    banned_token_ids: list[int] = field(default_factory=list)  # min_tokens: eos/stop ids masked
    seq_no: int = -1
    placeholder: bool = False  # last token is the one the previous step is still sampling


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSequence]
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_preempted: int = 0
    # sequences whose blocks were freed since the previous step (finished, aborted, preempted):
    # tensor-parallel workers drop their per-sequence state (engine/step_delta.py)
    freed_seq_nos: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class SequenceUpdate:
    """What a step did to one sequence (the engine turns these into request deltas)."""

    seq: Sequence
    new_token_id: int | None
    finished: bool


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, eos_token_id: int | None) -> None:
        self.config = config
        self.block_manager = block_manager
        self.eos_token_id = eos_token_id
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self._seq_nos = itertools.count()
        self._freed_seq_nos: list[int] = []  # reported by the next schedule()

    # ---- queue management -------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.seq_no = next(self._seq_nos)
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.requests.get(request_id)
        if seq is None or seq.is_finished:
            return None
        if seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self._finish(seq, FinishReason.ABORT)
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        self._freed_seq_nos.append(seq.seq_no)
        del self.requests[seq.request_id]

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self._freed_seq_nos.append(seq.seq_no)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- scheduling ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(seqs=[])
        budget = self._schedule_running(self.config.max_num_batched_tokens, out)
        if not out.num_preempted:
            self._admit_waiting(budget, out)
        # after scheduling: a sequence preempted above is freed before this step's
        # sequences (it is not one of them; it returns as new, with num_preemptions + 1)
        out.freed_seq_nos, self._freed_seq_nos = self._freed_seq_nos, []
        return out

    def _schedule_running(self, budget: int, out: SchedulerOutput) -> int:
        i, running, bm = 0, self.running, self.block_manager
        slots_per_block = bm.block_size
        while i < len(running) and budget > 0:
            seq = running[i]
            known = len(seq.token_ids) + seq.num_inflight
            if known >= seq.max_total_tokens and seq.num_computed_tokens >= known - 1:
                i += 1  # its last token is in flight: nothing left to compute
                continue
            n = self._chunk(known - seq.num_computed_tokens, budget)
            if n == 0:
                i += 1
                continue
            need = seq.num_computed_tokens + n
            while need > len(seq.block_table) * slots_per_block and not bm.allocate_slots(seq, need):
                victim = self.running.pop()
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    return budget
            self._emit(seq, n, out)
            budget -= n
            i += 1
        return budget

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> None:
        bm, bs = self.block_manager, self.block_manager.block_size
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_inflight:  # preempted while its last sample is still in flight
                break
            cached = bm.find_cached_prefix(seq)
            num_cached = len(cached) * bs
            n = self._chunk(seq.num_tokens - num_cached, budget)
            if n == 0 or not bm.allocate_slots(seq, num_cached + n, cached):
                break
            self._start(seq, num_cached)
            self._emit(seq, n, out)
            budget -= n

    def _start(self, seq: Sequence, num_cached: int) -> None:
        """Move the head of the waiting queue to running (its blocks are allocated)."""
        self.block_manager.record_prefix_lookup(seq.num_tokens, num_cached)
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        seq.num_computed_tokens = num_cached
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = num_cached
        self.running.append(seq)

    def kv_tokens_needed(self, max_total_tokens: int) -> int:
        """KV slots a request capped at `max_total_tokens` needs at its largest."""
        return max_total_tokens

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens of `remaining` to run under `budget` (0: not this step)."""
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def _emit(self, seq: Sequence, n: int, out: SchedulerOutput) -> None:
        start, tokens, params = seq.num_computed_tokens, seq.token_ids, seq.sampling_params
        known = len(tokens) + seq.num_inflight
        sample = start + n == known
        placeholder = start + n > len(tokens)  # the previous step's sample, still on the device
        num_output = known - seq.num_prompt_tokens
        banned: list[int] = []
        if sample and num_output < params.min_tokens:
            banned = list(params.stop_token_ids)
            if self.eos_token_id is not None and not params.ignore_eos:
                banned.append(self.eos_token_id)
        chunk = tokens[start : start + n] + [0] if placeholder else tokens[start : start + n]
        out.seqs.append(ScheduledSequence(
            seq.request_id, chunk, start, seq.block_table, sample, params,
            num_output, seq.num_preemptions, banned, seq.seq_no, placeholder,
        ))
        seq.num_computed_tokens = start + n
        seq.num_inflight += sample
        if start >= seq.num_prompt_tokens:
            out.num_decode_tokens += n
        else:
            out.num_prefill_tokens += n

    # ---- results ------------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, sampled: list[int | None]) -> list[SequenceUpdate]:
        """Append a finished step's sampled tokens, register newly full blocks for prefix
        caching, apply token-level stops. (Computed counts advanced when the step was scheduled.)"""
        updates = []
        requests, running = self.requests, SequenceStatus.RUNNING
        cache_blocks = self.block_manager.cache_full_blocks if self.block_manager.enable_prefix_caching else None
        for sched, token_id in zip(out.seqs, sampled):
            seq = requests.get(sched.request_id)
            if seq is None or seq.seq_no != sched.seq_no:
                continue  # finished or aborted meanwhile: this step's work is discarded
            if cache_blocks is not None and seq.status is running:
                cache_blocks(seq)
            if not sched.sample:
                continue
            seq.num_inflight -= 1
            seq.token_ids.append(token_id)  # also for a sequence preempted meanwhile: still its next token
            reason = self._stop_reason(seq, token_id)
            if reason is not None:
                (self.running if seq.status is running else self.waiting).remove(seq)
                self._finish(seq, reason)
            updates.append(SequenceUpdate(seq, token_id, reason is not None))
        return updates

    def finish_request(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish a running sequence for a reason found outside the scheduler (stop strings)."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._finish(seq, reason)

    def _stop_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params, num_tokens = seq.sampling_params, len(seq.token_ids)
        if num_tokens - seq.num_prompt_tokens > params.min_tokens:  # stop ids were masked until then
            if token_id == self.eos_token_id and not params.ignore_eos:
                return FinishReason.STOP
            if params.stop_token_ids and token_id in params.stop_token_ids:
                seq.stop_reason = token_id
                return FinishReason.STOP
        if num_tokens >= seq.max_total_tokens:
            return FinishReason.LENGTH
        return None

    # ---- telemetry ----------------------------------------------------------------------
    def kv_stats(self) -> dict[str, int]:
        """Slots allocated vs tokens stored over running sequences (waste = the difference,
        split into the unfilled tail of the last block and blocks reserved ahead)."""
        bs = self.block_manager.block_size
        allocated = stored = internal = 0
        for seq in self.running:
            n = seq.num_computed_tokens  # tokens with a written (or being written) KV slot
            allocated += len(seq.block_table)
            stored += n
            internal += -(-n // bs) * bs - n
        allocated *= bs
        return {
            "kv_slots_allocated": allocated,
            "kv_tokens_stored": stored,
            "kv_waste_internal_slots": internal,
            "kv_waste_reserved_slots": allocated - stored - internal,
        }


class StaticScheduler(Scheduler):
    """Static batching: admit a batch only when the running one has fully finished, and
    reserve KV up front for each request's maximum (`config.static_reservation`), so no
    preemption can happen. Prefix-cache hits come from blocks computed by earlier batches."""

    def kv_tokens_needed(self, max_total_tokens: int) -> int:
        if self.config.static_reservation == "max_model_len":
            return self.config.max_model_len
        return max_total_tokens

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> None:
        if self.running:
            return
        bm = self.block_manager
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached = bm.find_cached_prefix(seq)
            if not bm.allocate_slots(seq, self.kv_tokens_needed(seq.max_total_tokens), cached):
                break
            self._start(seq, len(cached) * bm.block_size)
        self._schedule_running(budget, out)


def make_scheduler(config: EngineConfig, block_manager: BlockManager, eos_token_id: int | None) -> Scheduler:
    cls = StaticScheduler if config.scheduling_policy == "static" else Scheduler
    return cls(config, block_manager, eos_token_id)
