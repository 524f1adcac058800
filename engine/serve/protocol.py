"""Request schemas of the OpenAI API subset we serve, and their mapping to `SamplingParams`.

Fields the OpenAI API has but this engine cannot honour (n > 1, logprobs, penalties, tools ...)
are rejected with a 400 naming the field, never silently ignored: a benchmark that asked for
them would otherwise measure something other than it thinks. Unknown fields are ignored, as
vLLM does, so that clients sending newer OpenAI fields keep working.

Extensions (vLLM's names): top_k, min_tokens, ignore_eos, stop_token_ids.

Types are strict: `true` is not an integer and `"yes"` is not a boolean (a float field takes an
integer, as JSON does). Every string must be valid Unicode: JSON may escape a lone UTF-16
surrogate ("\\ud800"), which Python keeps but no tokenizer or UTF-8 encoder takes, so it is a
400 naming the field. `stop` is bounded by the engine's limits (MAX_STOP_STRINGS strings of at
most MAX_STOP_STRING_CHARS characters), checked here so the 400 names `stop`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt

from engine.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, SamplingParams
from engine.serve.errors import APIError

SEED_RANGE = (-(2**63), 2**63)  # int64, as OpenAI's API documents seed


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"is not valid Unicode: a lone surrogate {text[e.start]!a} at character {e.start}"
        ) from None
    return text


def _bounded_stop(stop: str | list[str] | None) -> str | list[str] | None:
    strings = [stop] if isinstance(stop, str) else stop or []
    if len(strings) > MAX_STOP_STRINGS:
        raise ValueError(f"holds {len(strings)} strings; at most {MAX_STOP_STRINGS} are allowed")
    for s in strings:
        if not s:
            raise ValueError("stop strings must be non-empty")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise ValueError(
                f"holds a string of {len(s)} characters; at most {MAX_STOP_STRING_CHARS} are allowed"
            )
    return stop


Text = Annotated[str, AfterValidator(_valid_unicode)]
Float = Annotated[float, Field(strict=True)]  # strict: no "0.5" nor true; an int is fine
Stop = Annotated[Text | list[Text] | None, AfterValidator(_bounded_stop)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Model):
    include_usage: StrictBool = False


class SamplingRequest(_Model):
    model: Text
    max_tokens: StrictInt | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    top_k: StrictInt | None = None
    seed: StrictInt | None = None
    stop: Stop = None
    stop_token_ids: list[StrictInt] | None = None
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # Accepted only at their neutral values (see UNSUPPORTED):
    n: StrictInt = 1
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logit_bias: dict[Text, Float] | None = None


class CompletionRequest(SamplingRequest):
    prompt: Text | list[StrictInt] | list[Text] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16  # OpenAI's default for /v1/completions
    echo: StrictBool = False
    best_of: StrictInt | None = None
    logprobs: StrictInt | None = None
    suffix: Text | None = None


class TextPart(_Model):
    type: Literal["text"]
    text: Text


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


# field -> values this server accepts (the OpenAI neutral values)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (None, 1),
    "echo": (False,),
    "logprobs": (None, False, 0),
    "suffix": (None, ""),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0.0),
    "frequency_penalty": (None, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "response_format": (None, {"type": "text"}),
}


def check_supported(req: SamplingRequest) -> None:
    for name, allowed in UNSUPPORTED.items():
        if name not in type(req).model_fields:
            continue
        value = getattr(req, name)
        if value not in allowed:
            shown = " or ".join(repr(a) for a in allowed if a is not None)
            raise APIError(
                400,
                f"'{name}'={value!r:.80} is not supported by this server (use {shown})",
                param=name,
                code="unsupported_value",
            )
    if req.stream_options is not None and not req.stream:
        raise APIError(
            400, "'stream_options' is only allowed when 'stream' is true", param="stream_options"
        )
    if req.seed is not None and not SEED_RANGE[0] <= req.seed < SEED_RANGE[1]:
        raise APIError(400, f"'seed'={req.seed} must be a 64-bit signed integer", param="seed")


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """One prompt: a string or a list of token ids (a one-element batch is unwrapped)."""
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(
                400,
                f"'prompt' holds {len(prompt)} prompts; this server takes one per request",
                param="prompt",
                code="unsupported_value",
            )
        prompt = prompt[0]
    if not prompt:
        raise APIError(400, "'prompt' is empty", param="prompt")
    return prompt


def requested_max_tokens(req: SamplingRequest) -> int | None:
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def sampling_params(req: SamplingRequest, max_tokens: int, vocab_size: int) -> SamplingParams:
    """SamplingParams for a request; the engine's ValueError becomes a 400 naming the field."""
    # k >= vocab means the whole vocabulary; clamp, since the engine's sampler indexes the k-th
    # logit and a k past the vocabulary fails the whole step (every request in the batch).
    top_k = -1 if req.top_k is None else min(req.top_k, vocab_size)
    kwargs: dict[str, Any] = {
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": top_k,
        "seed": req.seed,
        "max_tokens": max_tokens,
        "min_tokens": req.min_tokens,
        "stop": req.stop or [],
        "stop_token_ids": req.stop_token_ids or [],
        "ignore_eos": req.ignore_eos,
    }
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        match = re.search(r"SamplingParams\.(\w+)", str(e))
        raise APIError(
            400, str(e), param=match.group(1) if match else None, code="invalid_value"
        ) from None
