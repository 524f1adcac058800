"""The in-process engine as a backend: continuous batching ("engine") or the static-batching
baseline on the same runner and kernels, reserving each request's prompt + max_tokens
("static") or max_model_len ("static-max") up front.

    backend = EngineBackend("tiny", "static", num_kv_blocks=64)
    result = backend.run(requests, t0, ReplayOptions(timed=True, max_concurrency=32))

The engine is driven step by step in the calling thread (it is not thread-safe):

- a request is added once its arrival time has passed (timed) or at t=0 (offline), while fewer
  than ``max_concurrency`` are in flight; ``sent_s`` is when ``add_request`` returned;
- each delta's new tokens get the time its ``step()`` returned: that is when a streaming
  server could first send them;
- with ``options.duration_s``, requests not added by then are recorded as "not_sent" and the
  run ends when the ones in flight finish;
- a request the engine rejects (``ValueError`` at ``add_request``) gets status "error" with
  the message, and the run goes on;
- ``engine.last_step_stats`` becomes one StepRecord per step (times relative to t0, prefix
  counters relative to the start of this run).
- requests are detokenized as a server would (the text is dropped, its host cost is timed);
  ``detokenize=False`` (``--backend-arg detokenize=false``) times tokens only, and ``info()``
  records which.

With nothing in flight the loop sleeps until the next arrival instead of spinning.

Multi-turn conversations (trace rows with conversation_id and turn, workloads/chat.py): turn k
is due when turn k-1 has finished (and not before its own arrival_s; its ``scheduled_s`` is that
moment); its prompt is the conversation so far, built with engine.chat.chat_prompt_token_ids
(the server's chat formatting), with the model's streamed answers as the assistant turns. Those
requests are always detokenized (the answer text is the next turn's history). When a turn
fails, the conversation's later turns become error rows without being sent.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections import deque
from typing import Any

from tqdm.auto import tqdm

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.chat import chat_prompt_token_ids
from engine.outputs import RequestDelta, StepStats
from harness.backends.base import (
    ENGINE_BACKENDS,
    NOT_SENT,
    ReplayOptions,
    RunResult,
    not_sent_error,
)
from harness.records import RequestRecord, StepRecord
from workloads.chat import History, conversations
from workloads.trace import TraceRequest

# A stalled engine (unfinished requests but nothing scheduled) would loop forever; after this
# many consecutive empty steps the remaining requests are aborted and recorded as errors.
MAX_IDLE_STEPS = 1000


class EngineBackend:
    def __init__(self, model: str = "tiny", name: str = "engine", warmup: bool = True, detokenize: bool = True,
                 **engine_args: Any):
        """detokenize: stream text as a server would (the default, its host cost included); False
        times tokens only (stop strings still detokenize the requests that carry them)."""
        if name not in ENGINE_BACKENDS:
            raise ValueError(f"unknown engine backend {name!r}; valid: {', '.join(ENGINE_BACKENDS)}")
        if not isinstance(detokenize, bool):
            raise ValueError(f"detokenize must be true or false, got {detokenize!r}")
        self.detokenize = detokenize
        self.engine = LLMEngine(EngineConfig(model=model, **ENGINE_BACKENDS[name], **engine_args))
        self.name = name
        if warmup:
            self._warmup()

    def _warmup(self) -> None:
        """Every kind of step once, so kernel compilation and lazy init stay out of the run."""
        try:
            self.engine.warm_up()
            return
        except ValueError:  # its 64-token prompts do not fit a very small KV cache
            pass
        self.engine.add_request("warm-up", [1, 2, 3, 4], SamplingParams(max_tokens=4, ignore_eos=True))
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def info(self) -> dict[str, Any]:
        """Engine facts for the report config."""
        cfg = self.engine.config
        fields = cfg.describe()  # the settings and what "auto" resolved to
        fields.pop("dist_init_method", None)  # a random port: noise in the config
        mc = cfg.model_config
        return {"engine_config": fields, "num_kv_blocks": self.engine.num_kv_blocks,
                "block_size": self.engine.block_size, "model_config": dataclasses.asdict(mc),
                "kv_bytes_per_token": cfg.kv_bytes_per_token, "detokenize": self.detokenize}

    def reset(self) -> None:
        """Ready for another run: no prefix-cache hit may come from an earlier run's prompts."""
        self.engine.reset_prefix_cache()

    def run(self, requests: list[TraceRequest], t0: float, options: ReplayOptions) -> RunResult:
        return _EngineRun(self.engine, requests, t0, options, self.detokenize).run(self.info())

    def close(self) -> None:
        self.engine.shutdown()


class _EngineRun:
    """The state of one replay: records, the arrival queue, what is in flight."""

    def __init__(self, engine: LLMEngine, requests: list[TraceRequest], t0: float, options: ReplayOptions,
                 detokenize: bool = True):
        self.engine, self.t0, self.options, self.detokenize = engine, t0, options, detokenize
        self.records = {r.request_id: RequestRecord(r.request_id, r.arrival_s if options.timed else 0.0,
                                                    prefix_group=r.prefix_group, conversation_id=r.conversation_id,
                                                    turn=r.turn) for r in requests}
        self.order = [r.request_id for r in requests]
        # Later turns wait for the previous answer: only first turns (and plain requests) start queued.
        self.next_turns = {r.request_id: turns[i + 1] for turns in conversations(requests).values()
                           for i, r in enumerate(turns[:-1])}
        self.histories: dict[str, History] = {}
        self.answers: dict[str, list[str]] = {}  # a conversation turn's streamed text so far
        follow_ups = set(t.request_id for t in self.next_turns.values())
        # Trace order is arrival order (load_trace sorts); offline every request is due at t=0.
        self.pending = deque(sorted((r for r in requests if r.request_id not in follow_ups),
                                    key=lambda r: self.records[r.request_id].scheduled_s))
        self.in_flight: set[str] = set()
        self.steps: list[StepRecord] = []
        bm = engine.block_manager
        self.prefix_base = (bm.prefix_query_tokens, bm.prefix_hit_tokens)  # counters are cumulative
        self.bar = tqdm(total=len(requests), desc="requests", unit="req", leave=False,
                        disable=None if options.progress else True)  # None: off when not a TTY

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, info: dict[str, Any]) -> RunResult:
        idle = 0
        with self.bar:
            while self.pending or self.engine.has_unfinished_requests():
                if self.options.past_deadline(self.now()):
                    self._expire_pending()
                self._admit_due()
                if not self.engine.has_unfinished_requests():
                    self._sleep_until_next_arrival()
                    continue
                deltas = self.engine.step()
                t = self.now()
                self._record_step(self.engine.last_step_stats)
                for d in deltas:
                    self._apply(d, t)
                idle = 0 if deltas or self.steps[-1].num_scheduled_seqs else idle + 1
                if idle >= MAX_IDLE_STEPS:
                    self._abort_stalled()
        return RunResult([self.records[rid] for rid in self.order], self.steps, info)

    # ---- admission -------------------------------------------------------------------
    def _admit_due(self) -> None:
        cap = self.options.max_concurrency
        while self.pending and (cap is None or len(self.in_flight) < cap):
            if self.records[self.pending[0].request_id].scheduled_s > self.now():
                return
            self._add(self.pending.popleft())

    def _add(self, req: TraceRequest) -> None:
        rec = self.records[req.request_id]
        prompt = req.prompt_input
        if req.conversation_id is not None:  # the conversation so far, as the chat endpoint builds it
            history = self.histories.setdefault(req.conversation_id, History())
            prompt = chat_prompt_token_ids(self.engine.tokenizer, history.ask(req.prompt))
            self.answers[req.request_id] = []
        try:
            self.engine.add_request(req.request_id, prompt, _sampling_params(req, self.detokenize))
        except ValueError as e:
            rec.sent_s = rec.finished_s = self.now()
            rec.status, rec.error = "error", str(e)
            rec.prompt_tokens = len(prompt) if isinstance(prompt, list) else 0
            self.bar.update(1)
            self._end_turn(req.request_id)
            return
        rec.sent_s = self.now()
        self.in_flight.add(req.request_id)

    def _end_turn(self, rid: str) -> None:
        """A conversation turn is over: queue the next turn (due now, or at its arrival), or,
        when this one failed, write the rest of the conversation off as errors."""
        nxt = self.next_turns.get(rid)
        text = "".join(self.answers.pop(rid, []))
        if nxt is None:
            return
        rec, now = self.records[rid], self.now()
        if rec.status == "ok":
            self.histories[nxt.conversation_id].answer(text)
            due = self.records[nxt.request_id]
            due.scheduled_s = max(due.scheduled_s, now)
            bisect.insort(self.pending, nxt, key=lambda r: self.records[r.request_id].scheduled_s)
            return
        while nxt is not None:
            later = self.records[nxt.request_id]
            later.scheduled_s = later.sent_s = later.finished_s = max(later.scheduled_s, now)
            later.status, later.error = "error", f"not sent: turn {rec.turn} of the conversation failed"
            self.bar.update(1)
            nxt = self.next_turns.get(nxt.request_id)

    def _sleep_until_next_arrival(self) -> None:
        if self.pending:
            due = self.records[self.pending[0].request_id].scheduled_s
            if self.options.duration_s is not None:
                due = min(due, self.options.duration_s)
            time.sleep(max(0.0, due - self.now()))

    def _expire_pending(self) -> None:
        while self.pending:
            rec = self.records[self.pending.popleft().request_id]
            rec.status, rec.error = NOT_SENT, not_sent_error(self.options)
            self.bar.update(1)

    # ---- results ---------------------------------------------------------------------
    def _apply(self, d: RequestDelta, t: float) -> None:
        rec = self.records[d.request_id]
        rec.prompt_tokens, rec.cached_tokens = d.num_prompt_tokens, d.num_cached_tokens
        if d.request_id in self.answers:
            self.answers[d.request_id].append(d.new_text)
        if d.new_token_ids:
            rec.first_token_s = t if rec.first_token_s is None else rec.first_token_s
            rec.token_times_s.extend([t] * len(d.new_token_ids))
            rec.output_tokens += len(d.new_token_ids)
        if d.finished:
            rec.finished_s, rec.finish_reason = t, d.finish_reason
            if rec.status == "pending":  # a stall abort has already written its error
                rec.status = "aborted" if d.finish_reason == "abort" else "ok"
            self.in_flight.discard(d.request_id)
            self.bar.update(1)
            self._end_turn(d.request_id)

    def _record_step(self, s: StepStats) -> None:
        stats = s.counts()  # StepStats also carries host timings, which StepRecord does not
        stats["prefix_query_tokens"] -= self.prefix_base[0]
        stats["prefix_hit_tokens"] -= self.prefix_base[1]
        self.steps.append(StepRecord(step=len(self.steps), start_s=s.t_start - self.t0,
                                     end_s=s.t_end - self.t0, **stats))

    def _abort_stalled(self) -> None:
        for rid in list(self.in_flight):
            rec = self.records[rid]
            rec.status, rec.error = "error", f"engine made no progress for {MAX_IDLE_STEPS} steps; aborted"
            self.engine.abort_request(rid)


def _sampling_params(req: TraceRequest, detokenize: bool = True) -> SamplingParams:
    # The text itself is dropped, but producing it is part of serving: timed unless turned off
    # (the engine detokenizes requests with stop strings either way). A conversation turn's
    # text is the next turn's history, so it is always produced.
    detokenize = detokenize or req.conversation_id is not None
    return SamplingParams(**{"detokenize": detokenize, **req.sampling_kwargs()})
