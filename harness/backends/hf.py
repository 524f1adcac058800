"""HF transformers `generate` in static batches: the external baseline ("hf").

    backend = HFBackend("tiny", batch_size=16)       # a preset: random weights, same shape
    backend = HFBackend("/path/to/checkpoint")       # AutoModelForCausalLM.from_pretrained

Batching: whenever the model is idle, the next batch is taken from the requests that have
arrived (timed) or from all of them (offline), at most ``batch_size`` (and ``max_concurrency``)
at a time. With ``sort_by_length`` (default) the arrived requests are sorted by prompt length
first, as the DESIGN's reference HF numbers were measured (less padding); otherwise FIFO.
Prompts are left padded; every request in a batch decodes ``max(max_tokens)`` tokens with EOS
disabled (``min_new_tokens``), and each request's output is counted as its own ``max_tokens``
only (ignore_eos semantics; the padding tokens past it are not useful output). Decoding is
greedy: throughput does not depend on the sampled values.

Timing: a StoppingCriteria hook timestamps every decoding step of the batch (it is called
right after each new token is appended), so token k of every request in the batch gets the
time of step k. ``first_token_s`` is step 1, ``finished_s`` is the step of the request's own
last token: what a streaming server built on this loop could deliver. ``generate`` itself
returns only when the longest request of the batch is done; those times are in
``info["batch_end_s"]``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from engine.config import EngineConfig
from engine.tokenizer import load_tokenizer
from harness.backends.base import NOT_SENT, ReplayOptions, RunResult, not_sent_error
from harness.records import RequestRecord
from workloads.trace import TraceRequest


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, [batch, longest prompt], left padded with id 0."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def hf_model_from_config(config: EngineConfig, dtype: torch.dtype, device: str):
    """An HF model of the same shape (random weights: throughput does not depend on them)."""
    import transformers

    mc = config.model_config
    cls = {"qwen3": "Qwen3", "qwen2": "Qwen2", "llama": "Llama"}[mc.architecture]
    hf_config = getattr(transformers, f"{cls}Config")(
        vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_hidden_layers, num_attention_heads=mc.num_attention_heads,
        num_key_value_heads=mc.num_key_value_heads, head_dim=mc.head_dim, rms_norm_eps=mc.rms_norm_eps,
        rope_theta=mc.rope_theta, max_position_embeddings=mc.max_position_embeddings,
        tie_word_embeddings=mc.tie_word_embeddings,
    )
    with torch.device(device):
        model = getattr(transformers, f"{cls}ForCausalLM")(hf_config).to(dtype)
    return model.eval()


class _StepClock(StoppingCriteria):
    """Never stops generation; records perf_counter after every decoding step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if input_ids.is_cuda:  # kernels run ahead of the host: time the token, not the launch
            torch.cuda.synchronize(input_ids.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class HFBackend:
    name = "hf"

    def __init__(self, model: str = "tiny", batch_size: int = 16, sort_by_length: bool = True,
                 device: str | None = None, dtype: str | None = None, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # resolved as the engine resolves them: presets and checkpoint dirs alike, bf16 on GPUs,
        # fp32 on CPU (where bf16 matmuls are slow)
        self.config = EngineConfig(model=model, device=device or "auto", dtype=dtype or "auto")
        self.device = device or self.config.device_type
        self.dtype = self.config.torch_dtype
        self.batch_size, self.sort_by_length, self.seed = batch_size, sort_by_length, seed
        self.model = self._load(model)
        self.tokenizer = load_tokenizer(model, None, self.config.is_preset)
        self.max_len = self.config.model_config.max_position_embeddings

    def _load(self, model: str):
        if self.config.is_preset:
            # Reproducible random weights without touching the caller's global RNG state.
            devices = [torch.device(self.device)] if self.device.startswith("cuda") else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                return hf_model_from_config(self.config, self.dtype, self.device)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model, dtype=self.dtype).to(self.device).eval()

    def info(self) -> dict[str, Any]:
        return {"hf_batch_size": self.batch_size, "sort_by_length": self.sort_by_length, "device": self.device,
                "dtype": str(self.dtype).removeprefix("torch."), "decoding": "greedy, min_new_tokens = max_new_tokens",
                "kv_bytes_per_token": self.config.kv_bytes_per_token}

    def reset(self) -> None:
        pass  # greedy `generate` over fresh inputs: nothing carries from one run to the next

    def close(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # ---- the replay loop ---------------------------------------------------------------
    def run(self, requests: list[TraceRequest], t0: float, options: ReplayOptions) -> RunResult:
        if any(r.conversation_id is not None for r in requests):  # static batches cannot wait for answers
            raise ValueError("the hf backend does not replay multi-turn conversations; use engine, static or openai")
        now = lambda: time.perf_counter() - t0
        records = {r.request_id: RequestRecord(r.request_id, r.arrival_s if options.timed else 0.0,
                                               prefix_group=r.prefix_group) for r in requests}
        pending = sorted(requests, key=lambda r: records[r.request_id].scheduled_s)
        prompts: dict[str, list[int]] = {}
        batch_ends: list[float] = []
        cap = min(self.batch_size, options.max_concurrency or self.batch_size)
        with tqdm(total=len(requests), desc="requests", unit="req", leave=False,
                  disable=None if options.progress else True) as bar:
            while pending:
                if options.past_deadline(now()):  # --duration: the rest is recorded, not run
                    for r in pending:
                        records[r.request_id].status, records[r.request_id].error = NOT_SENT, not_sent_error(options)
                    bar.update(len(pending))
                    break
                arrived = [r for r in pending if records[r.request_id].scheduled_s <= now()]
                if not arrived:
                    due = records[pending[0].request_id].scheduled_s
                    time.sleep(max(0.0, min(due, options.duration_s or due) - now()))
                    continue
                if self.sort_by_length:
                    arrived.sort(key=lambda r: len(self._prompt_ids(r, prompts)))
                batch = self._valid(arrived[:cap], records, prompts, now)
                done = {r.request_id for r in arrived[:cap]}
                pending = [r for r in pending if r.request_id not in done]
                if batch:
                    batch_ends.append(self._generate(batch, records, prompts, t0))
                bar.update(len(done))
        info = {**self.info(), "batch_end_s": batch_ends}
        return RunResult([records[r.request_id] for r in requests], [], info)

    def _prompt_ids(self, req: TraceRequest, cache: dict[str, list[int]]) -> list[int]:
        if req.request_id not in cache:
            ids = req.prompt_token_ids
            cache[req.request_id] = list(ids) if ids is not None else self.tokenizer(req.prompt).input_ids
        return cache[req.request_id]

    def _valid(self, reqs: list[TraceRequest], records: dict[str, RequestRecord],
               prompts: dict[str, list[int]], now) -> list[TraceRequest]:
        """Requests that can run; the others are recorded as errors (the engine's rules)."""
        ok, vocab = [], self.config.model_config.vocab_size
        for r in reqs:
            ids, rec = self._prompt_ids(r, prompts), records[r.request_id]
            rec.prompt_tokens = len(ids)
            error = None
            if len(ids) + r.max_tokens > self.max_len:
                error = f"prompt {len(ids)} + max_tokens {r.max_tokens} exceeds the model's {self.max_len} positions"
            elif not ids or not all(0 <= t < vocab for t in ids):
                error = f"prompt is empty or has a token id outside the vocabulary [0, {vocab})"
            if error is None:
                ok.append(r)
            else:
                rec.sent_s = rec.finished_s = now()
                rec.status, rec.error = "error", error
        return ok

    def _generate(self, batch: list[TraceRequest], records: dict[str, RequestRecord],
                  prompts: dict[str, list[int]], t0: float) -> float:
        """One left-padded generate call; returns when it ended (seconds after t0)."""
        ids, mask = left_pad([prompts[r.request_id] for r in batch])
        new = max(r.max_tokens for r in batch)
        clock = _StepClock()
        sent = time.perf_counter() - t0
        with torch.inference_mode():
            self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, pad_token_id=0,
                                stopping_criteria=StoppingCriteriaList([clock]))
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        end = time.perf_counter() - t0
        times = [t - t0 for t in clock.times]
        for r in batch:
            rec = records[r.request_id]
            rec.sent_s, rec.status, rec.finish_reason = sent, "ok", "length"
            rec.token_times_s = times[: r.max_tokens]
            rec.output_tokens = len(rec.token_times_s)
            rec.first_token_s, rec.finished_s = rec.token_times_s[0], rec.token_times_s[-1]
        return end
