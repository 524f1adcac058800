"""The OpenAI-compatible HTTP app: `create_app(engine_or_config, ...)` returns a FastAPI app.

    POST /v1/completions        prompt: string or token-id list; SSE with "stream": true
    POST /v1/chat/completions   messages through the chat template (engine/serve/chat.py)
    GET  /v1/models             the one served model
    GET  /health                200 while the engine loop runs, 503 otherwise
    GET  /metrics               Prometheus text (engine/serve/metrics.py)

Every error is a 4xx/5xx with an OpenAI error object (engine/serve/errors.py).
"""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.serve.async_engine import AsyncEngine
from engine.serve.chat import chat_prompt_token_ids, text_prompt_token_ids
from engine.serve.errors import APIError, error_response, install_error_handlers
from engine.serve.generation import GenerationRequest, ServerState, generate
from engine.serve.metrics import ServerMetrics
from engine.serve.middleware import ApiKeyAuth, BodyLimit, ResponseCounter
from engine.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    check_supported,
    completion_prompt,
    requested_max_tokens,
    sampling_params,
)
from engine.serve.responses import ResponseFormat

DEFAULT_MAX_WAITING = 256
DEFAULT_MAX_BODY_BYTES = 8 << 20
ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"})

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _prepare(
    state: ServerState,
    req: SamplingRequest,
    prompt_token_ids: list[int],
    fmt: ResponseFormat,
    t_start: float,
) -> GenerationRequest:
    """Check length limits (vLLM's rule: prompt + max_tokens <= max_model_len) and build params."""
    limit, n_prompt = state.max_model_len, len(prompt_token_ids)
    param = "prompt" if fmt.kind == "completion" else "messages"
    if n_prompt >= limit:
        raise APIError(
            400,
            f"the prompt has {n_prompt} tokens but this model's maximum context length "
            f"is {limit} tokens, which must also hold at least one generated token",
            param=param,
            code="context_length_exceeded",
        )
    max_tokens = requested_max_tokens(req)
    if max_tokens is None:
        max_tokens = limit - n_prompt  # chat default: whatever the context leaves
    elif n_prompt + max_tokens > limit:
        raise APIError(
            400,
            f"this model's maximum context length is {limit} tokens, but {n_prompt + max_tokens} "
            f"were requested ({n_prompt} in the prompt, {max_tokens} to generate)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    params = sampling_params(req, max_tokens, state.vocab_size)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return GenerationRequest(fmt, prompt_token_ids, params, req.stream, include_usage, t_start)


def _check_request(state: ServerState, req: SamplingRequest) -> None:
    if req.model != state.model_name:
        raise APIError(
            404,
            f"the model '{req.model}' does not exist; this server serves '{state.model_name}'",
            param="model",
            code="model_not_found",
        )
    check_supported(req)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    t_start = time.perf_counter()
    state = _state(request)
    _check_request(state, body)
    ids = text_prompt_token_ids(state.tokenizer, completion_prompt(body))
    gen = _prepare(state, body, ids, ResponseFormat("completion", state.model_name), t_start)
    return await generate(state, gen, request)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    t_start = time.perf_counter()
    state = _state(request)
    _check_request(state, body)
    ids = chat_prompt_token_ids(state.tokenizer, body.messages)
    gen = _prepare(state, body, ids, ResponseFormat("chat", state.model_name), t_start)
    return await generate(state, gen, request)


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    state = _state(request)
    card = {
        "id": state.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "llmbench",
        "max_model_len": state.max_model_len,
    }
    return JSONResponse({"object": "list", "data": [card]})


@router.get("/health")
async def health(request: Request) -> Response:
    engine = _state(request).engine
    if engine is None or not engine.is_alive:
        reason = engine.failure if engine is not None and engine.failure else "not running"
        return error_response(503, f"engine loop is down: {reason}", code="engine_unavailable")
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    state = _state(request)
    engine = state.running_engine()
    text = state.metrics.render(engine.snapshot, engine.num_unstarted)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def create_app(
    engine_or_config: LLMEngine | EngineConfig,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_waiting: int = DEFAULT_MAX_WAITING,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """An app serving one engine. Given an EngineConfig, the engine is built now and shut down
    with the app; given an LLMEngine, the caller keeps ownership. The engine loop thread runs
    while the app runs (its lifespan), so one engine must not back two running apps at once."""
    owned = isinstance(engine_or_config, EngineConfig)
    engine = LLMEngine(engine_or_config) if owned else engine_or_config
    if not isinstance(engine, LLMEngine):
        raise ValueError(
            f"engine_or_config must be an LLMEngine or EngineConfig, got {type(engine).__name__}"
        )
    if max_waiting < 1:
        raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
    state = ServerState(
        model_name=served_model_name or engine.config.model,
        tokenizer=copy.deepcopy(engine.tokenizer),  # HF fast tokenizers are not thread-safe
        max_model_len=engine.config.max_model_len,
        vocab_size=engine.config.model_config.vocab_size,
        metrics=ServerMetrics(known_paths=ROUTES),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine = AsyncEngine(engine, max_waiting)
        state.engine.start()
        try:
            yield
        finally:
            state.engine.stop()
            state.engine = None
            if owned:
                engine.shutdown()

    app = FastAPI(title="llmbench OpenAI-compatible server", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(router)
    # Added innermost first: counting wraps auth, auth wraps the body limit (no reading for a 401).
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyAuth, api_key=api_key)
    app.add_middleware(ResponseCounter, metrics=state.metrics)
    return app
