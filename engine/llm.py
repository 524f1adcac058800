"""Offline entry point, shaped like vLLM's `LLM`."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from tqdm.auto import tqdm

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str = "tiny", **config):
        unknown = set(config) - EngineConfig.field_names()
        if unknown:
            raise ValueError(f"unknown engine option(s) {sorted(unknown)}; valid: {sorted(EngineConfig.field_names())}")
        self.engine = LLMEngine(EngineConfig(model=model, **config))

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        outputs: dict[str, RequestOutput] = {}
        added: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                rid = self.engine.add_request(None, prompt, p)
                added.append(rid)
                outputs[rid] = RequestOutput(rid, prompt if isinstance(prompt, str) else None, [],
                                             [CompletionOutput(0, "", [], None)])
        except ValueError:
            for rid in added:
                self.engine.abort_request(rid)
            self.engine.step()  # drain the abort deltas
            raise
        texts: dict[str, list[str]] = {rid: [] for rid in added}  # joined once, at the end
        with tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for d in self.engine.step():
                    out = outputs[d.request_id]
                    comp = out.outputs[0]
                    comp.token_ids += d.new_token_ids
                    if d.new_text:
                        texts[d.request_id].append(d.new_text)
                    if d.finished:
                        out.finished, comp.finish_reason, comp.stop_reason = True, d.finish_reason, d.stop_reason
                        out.num_cached_tokens = d.num_cached_tokens
                        bar.update(1)
        for rid, prompt in zip(added, prompts):
            outputs[rid].outputs[0].text = "".join(texts[rid])
            outputs[rid].prompt_token_ids = prompt if not isinstance(prompt, str) else self.engine.tokenizer(prompt).input_ids
        return [outputs[rid] for rid in added]

    def shutdown(self) -> None:
        self.engine.shutdown()


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a string, a list of token ids, or a list of those; "
                         f"got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    return prompts


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if not isinstance(params, (list, tuple)):
        raise ValueError(f"sampling_params must be a SamplingParams or a list of them, got {type(params).__name__}")
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling_params for {n} prompts")
    return params
