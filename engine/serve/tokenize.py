"""`/tokenize` and `/detokenize`, with vLLM's request and response shapes.

    POST /tokenize    {"model"?, "prompt", "add_special_tokens"?: true, "return_token_strs"?: false}
                      {"model"?, "messages", "add_generation_prompt"?: true}
                      -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize  {"model"?, "tokens"} -> {"prompt"}

A prompt is tokenized exactly as /v1/completions does it and messages as /v1/chat/completions
does (chat.py), so `count` equals the `usage.prompt_tokens` the same prompt gets there: load
generators (GuideLLM, vLLM's benchmarks) use these routes to size prompts without a tokenizer
of their own. Like vLLM, these routes are outside /v1 (an API key does not guard them) and
`model` may be left out; one that is given must be the served model.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from transformers import PreTrainedTokenizerBase

from engine.serve.chat import chat_prompt_token_ids, text_prompt_token_ids
from engine.serve.errors import APIError
from engine.serve.generation import ServerState
from engine.serve.protocol import ChatMessage
from engine.serve.tokenizing import check_prompt_chars, server_state, tokenize_off_loop

router = APIRouter()
T = TypeVar("T")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str | None = None


class TokenizeCompletionRequest(_Request):
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    tokens: list[int]


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(
            404,
            f"the model '{model}' does not exist; this server serves '{state.model_name}'",
            param="model",
            code="model_not_found",
        )


def _prompt_ids(tok: PreTrainedTokenizerBase, req: TokenizeCompletionRequest) -> list[int]:
    if req.add_special_tokens:
        return text_prompt_token_ids(tok, req.prompt)  # what /v1/completions does
    return list(tok(req.prompt, add_special_tokens=False).input_ids)


def _chat_ids(tok: PreTrainedTokenizerBase, req: TokenizeChatRequest) -> list[int]:
    return chat_prompt_token_ids(tok, req.messages, req.add_generation_prompt)  # as a chat request does


async def _tokenize_request(request: Request) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """The body as one of the two shapes, chosen by whether it has "messages" (a pydantic union
    would report a missing field under both branches' names, not the field's)."""
    try:
        data = await request.json()
    except ValueError as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_value")
    kind = TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    body = await _tokenize_request(request)
    state = server_state(request)
    _check_model(state, body.model)
    # the same limits and threads as the generation routes: /tokenize must not stall the server
    chat = isinstance(body, TokenizeChatRequest)
    n_chars = sum(len(m.text()) for m in body.messages) if chat else len(body.prompt)
    check_prompt_chars(request, "messages" if chat else "prompt", n_chars)
    ids = await tokenize_off_loop(request, n_chars, _chat_ids if chat else _prompt_ids, body)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids,
                           "token_strs": None}
    if body.return_token_strs:
        out["token_strs"] = state.tokenizer.convert_ids_to_tokens(ids)
    return out


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, str]:
    state = server_state(request)
    _check_model(state, body.model)
    # the model's vocabulary may be larger than the tokenizer's (ids past it decode to "", as
    # they do in a completion's text); outside both it is a mistake
    limit = max(state.vocab_size, len(state.encoder))
    bad = [t for t in body.tokens if not 0 <= t < limit]
    if bad:
        raise APIError(400, f"token ids out of range [0, {limit}): {bad[:8]}",
                       param="tokens", code="invalid_value")
    text = await tokenize_off_loop(request, 0, lambda tok, ids: tok.decode(ids), body.tokens)
    return {"prompt": text}
