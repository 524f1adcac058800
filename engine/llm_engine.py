"""The engine: requests in, per-step deltas out. One `step()` = schedule -> run the model on
every shard -> update sequences -> detokenize. Not thread-safe: drive it from one thread."""

from __future__ import annotations

import gc
import itertools
import time

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer, prepare_detokenization
from engine.executor import StepResult, make_executor
from engine.outputs import RequestDelta, StepStats
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput, SequenceUpdate, make_scheduler
from engine.sequence import FinishReason, Sequence
from engine.tokenizer import load_tokenizer


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs):
        self.config = config if config is not None else EngineConfig(**kwargs)
        mc = self.config.model_config
        self.tokenizer = None  # skip_tokenizer_init: token ids in and out, no text
        if not self.config.skip_tokenizer_init:
            self.tokenizer = load_tokenizer(self.config.model, self.config.tokenizer, self.config.is_preset)
            prepare_detokenization(self.tokenizer)
        self.eos_token_id = mc.eos_token_id
        if self.eos_token_id is None and self.tokenizer is not None:
            self.eos_token_id = self.tokenizer.eos_token_id
        self._shut_down = False
        self.executor = make_executor(self.config)
        self.config = self.executor.config  # what runs: reports must not show a setting that fell back
        self.num_kv_blocks = self.executor.num_kv_blocks
        self.block_size = self.config.block_size
        self.block_manager = BlockManager(self.num_kv_blocks, self.block_size, self.config.enable_prefix_caching)
        self.scheduler = make_scheduler(self.config, self.block_manager, self.eos_token_id)
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._pending: list[RequestDelta] = []  # aborts reported by the next step()
        self._inflight: list[tuple[SchedulerOutput, StepResult]] = []  # launched, not yet applied
        self.async_scheduling = self._resolve_async()
        self._ids = itertools.count()
        self.last_step_stats: StepStats | None = None
        self._froze_gc = False  # warm_up() froze the heap (config.freeze_gc)

    def _resolve_async(self) -> bool:
        cfg = self.config
        if cfg.async_scheduling is not None:
            return cfg.async_scheduling
        # on CPU a step runs to completion inside its launch, so there is nothing to overlap;
        # under TP every rank fills placeholders from its own identical samples (tp_executor.py)
        return cfg.device_type == "cuda"

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: str | list[int],
                    sampling_params: SamplingParams | None = None, arrival_time: float | None = None) -> str:
        self._check_running()
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.scheduler.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        token_ids = self._tokenize(prompt)
        self._check_fits(token_ids, params)
        vocab = self.config.model_config.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab})")
        seq = Sequence(request_id, token_ids, params, arrival_time, self.config.max_model_len)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (the engine runs with skip_tokenizer_init=True): "
                             "use stop_token_ids")
        self.scheduler.add(seq)
        if self.tokenizer is not None and (params.detokenize or params.stop):
            self.detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, params.stop)
        return request_id

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            check_text_prompt(prompt, self.tokenizer is not None)
            token_ids = self.tokenizer(prompt).input_ids
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            token_ids = list(prompt)
        else:
            raise ValueError("prompt must be a string or a list of integer token ids")
        if not token_ids:
            raise ValueError("prompt is empty")
        vocab = self.config.model_config.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        return token_ids

    def _check_fits(self, token_ids: list[int], params: SamplingParams) -> None:
        limit = self.config.max_model_len
        if len(token_ids) + 1 > limit:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens but max_model_len is {limit}: "
                f"at most {limit - 1} prompt tokens leave room for one generated token"
            )
        tokens = self.scheduler.kv_tokens_needed(min(len(token_ids) + params.max_tokens, limit))
        need = self.block_manager.blocks_for(tokens)
        if need > self.block_manager.num_usable_blocks:
            raise ValueError(
                f"request needs {need} KV blocks of {self.block_size} tokens for {tokens} tokens (prompt "
                f"{len(token_ids)}, max_tokens {params.max_tokens}, max_model_len {limit}) but the cache "
                f"has {self.block_manager.num_usable_blocks}"
            )

    def abort_request(self, request_id: str) -> bool:
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return False
        self.detokenizers.pop(request_id, None)
        self._pending.append(self._delta(seq, [], "", True))
        return True

    def reset_prefix_cache(self) -> None:
        """Drop every cached prefix block; RuntimeError while requests are unfinished."""
        if self.has_unfinished_requests():
            raise RuntimeError("cannot reset the prefix cache while requests are unfinished")
        self.block_manager.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending) or bool(self._inflight)

    # ---- stepping -----------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        self._check_running()
        t_start = time.perf_counter()
        out = self.scheduler.schedule()
        deltas, self._pending = self._pending, []
        t_scheduled = time.perf_counter()
        if not out.is_empty:
            self._inflight.append((out, self.executor.execute_model_async(out)))
        launch_s = time.perf_counter() - t_scheduled
        execute_s, post_s = launch_s, 0.0
        # async: keep this step running while the previous one's results are applied
        keep = 1 if self.async_scheduling and not out.is_empty else 0
        while len(self._inflight) > keep:
            done, pending = self._inflight.pop(0)
            t0 = time.perf_counter()
            sampled = pending.result()
            t1 = time.perf_counter()
            deltas += [self._process(u) for u in self.scheduler.update_from_output(done, sampled)]
            execute_s, post_s = execute_s + t1 - t0, post_s + time.perf_counter() - t1
        self.last_step_stats = self._stats(out, t_start, t_scheduled - t_start, launch_s, execute_s, post_s)
        return deltas

    def _process(self, update: SequenceUpdate) -> RequestDelta:
        seq, finished, new_ids = update.seq, update.finished, [update.new_token_id]
        text = ""
        detok = self.detokenizers.get(seq.request_id)
        if detok is not None:
            text, _, stop_hit = detok.add_until_stop(new_ids, finished)
            if stop_hit is not None:
                seq.stop_reason = stop_hit
                self.scheduler.finish_request(seq, FinishReason.STOP)
                finished = True
        if finished:
            self.detokenizers.pop(seq.request_id, None)
        return self._delta(seq, new_ids, text, finished)

    @staticmethod
    def _delta(seq: Sequence, new_ids: list[int], text: str, finished: bool) -> RequestDelta:
        reason = seq.finish_reason.value if finished and seq.finish_reason else None
        return RequestDelta(seq.request_id, new_ids, text, finished, reason,
                            seq.num_prompt_tokens, seq.num_cached_tokens, seq.stop_reason if finished else None)

    def _stats(self, out: SchedulerOutput, t_start: float, schedule_s: float, launch_s: float,
               execute_s: float, post_s: float) -> StepStats:
        bm = self.block_manager
        return StepStats(
            t_start=t_start, t_end=time.perf_counter(), schedule_s=schedule_s,
            launch_s=launch_s, execute_s=execute_s, postprocess_s=post_s,
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_scheduled_seqs=len(out.seqs), num_prefill_tokens=out.num_prefill_tokens,
            num_decode_tokens=out.num_decode_tokens, num_preempted=out.num_preempted,
            kv_blocks_used=bm.num_used_blocks, kv_blocks_total=bm.num_usable_blocks,
            prefix_query_tokens=bm.prefix_query_tokens, prefix_hit_tokens=bm.prefix_hit_tokens,
            **self.scheduler.kv_stats(),
        )

    def warm_up(self) -> None:
        """Push a few requests through every kind of step (long prefill, prefill mixed with
        decodes, decode) so kernel compilation happens before anything is timed; then, with
        config.freeze_gc, collect and freeze the heap (shutdown() unfreezes it)."""
        if self.has_unfinished_requests():
            raise RuntimeError("warm_up() needs an idle engine")
        vocab = self.config.model_config.vocab_size
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, detokenize=False)
        n = min(64, self.config.max_model_len - params.max_tokens - 1)
        for wave in range(2):  # the second wave's prefills share steps with the first's decodes
            for i in range(3):
                self.add_request(f"warm-up-{wave}-{i}", [(7 * i + j) % vocab for j in range(max(1, n - 20 * i))], params)
            self.step()
        while self.has_unfinished_requests():
            self.step()
        if self.config.freeze_gc:
            # Python's full collections scan every live object: with a GPU model's start-up heap
            # that is ~0.1-0.3 s inside some decode step (LightLLM and vLLM freeze after start-up
            # for this). Frozen objects are never collected, so shutdown() unfreezes them
            gc.collect()
            gc.freeze()
            self._froze_gc = True

    def shutdown(self) -> None:
        """Free the model and stop any workers; later calls to add_request or step raise."""
        self._shut_down = True
        if self._froze_gc:  # the engine's reference cycles become collectable again
            gc.unfreeze()
            self._froze_gc = False
        self.executor.shutdown()

    def _check_running(self) -> None:
        if self._shut_down:
            raise RuntimeError("the engine is shut down: create a new one")

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def check_text_prompt(prompt: str, has_tokenizer: bool) -> None:
    """ValueError for a text prompt the tokenizer cannot take: text that is not valid Unicode
    (a lone UTF-16 surrogate, e.g. from a JSON escape), or any text without a tokenizer."""
    if not has_tokenizer:
        raise ValueError("text prompts need a tokenizer (the engine runs with skip_tokenizer_init=True): "
                         "pass token ids")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"prompt is not valid Unicode: {exc.reason} at character {exc.start} "
                         f"({prompt[exc.start:exc.end]!r})") from None
