"""The OpenAI-compatible HTTP app: `create_app(engine_or_config, ...)` returns a FastAPI app.

    POST /v1/completions        prompt: string or token-id list; SSE with "stream": true
    POST /v1/chat/completions   messages through the chat template (engine/serve/chat.py)
    GET  /v1/models             the one served model (and how it is served: engine, stream_interval,
                                tokenizer: its directory or hub name, or "byte-level (preset)")
    POST /tokenize, /detokenize vLLM's shapes (engine/serve/tokenize.py)
    GET  /health                200 while the engine runs, 503 otherwise (e.g. the core died)
    GET  /metrics               Prometheus text, vLLM's vllm:* names and our llmbench_* (metrics.py)

Every error is a 4xx/5xx with an OpenAI error object (engine/serve/errors.py); the OpenAPI
schema (/openapi.json) lists those answers, not FastAPI's default 422.

No single request may stall the others: a prompt longer than `max_prompt_chars` characters
(default CHARS_PER_TOKEN_BOUND x max_model_len, far more than any tokenizer needs to fill the
context) is a 400 before it is tokenized; then the token count is checked against the context.
Prompts of more than LONG_PROMPT_CHARS characters tokenize on a thread of their own, so short
requests never queue behind one. Bodies and headers have read deadlines (middleware.py
BodyLimit, server.py).

The routes talk to an `EngineClient` (engine_client.py) only: the engine core process
(core_client.py, the default for an EngineConfig) or a thread of this process (async_engine.py,
for an LLMEngine or engine_in_process=True). Either way this process tokenizes (on worker
threads, off the event loop), detokenizes and matches stop strings (output_processor.py).
"""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from multiprocessing.connection import Connection
from typing import TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from engine.config import PRESETS, EngineConfig
from engine.llm_engine import LLMEngine
from engine.serve.async_engine import AsyncEngine
from engine.serve.chat import chat_prompt_token_ids, text_prompt_token_ids
from engine.serve.core_client import CoreClient
from engine.serve.engine_client import EngineClient
from engine.serve.errors import (
    APIError,
    error_response,
    error_responses,
    install_error_handlers,
    without_validation_422,
)
from engine.serve.generation import GenerationRequest, ServerState, generate
from engine.serve.metrics import CONTENT_TYPE, ServerMetrics
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
from engine.serve.server import DEFAULT_HEADER_TIMEOUT_S
from engine.serve.tokenize import router as tokenize_router
from engine.serve.tokenizing import (
    LongPromptLane,
    check_prompt_chars,
    server_state,
    tokenize_off_loop,
)
from engine.tokenizer import load_tokenizer, tokenizer_source

DEFAULT_MAX_WAITING = 256
DEFAULT_MAX_BODY_BYTES = 8 << 20
DEFAULT_BODY_TIMEOUT_S = 30.0
ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
                    "/tokenize", "/detokenize"})

router = APIRouter()
T = TypeVar("T")


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


# What the generation routes answer besides 200 (the OpenAPI schema lists these, not 422).
GENERATION_ERRORS = error_responses(400, 401, 404, 413, 429, 500, 503)


@router.post("/v1/completions", responses=GENERATION_ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Response:
    t_start = time.perf_counter()
    state = server_state(request)
    _check_request(state, body)
    prompt = completion_prompt(body)
    n_chars = len(prompt) if isinstance(prompt, str) else 0
    check_prompt_chars(request, "prompt", n_chars)
    ids = await tokenize_off_loop(request, n_chars, text_prompt_token_ids, prompt)
    gen = _prepare(state, body, ids, ResponseFormat("completion", state.model_name), t_start)
    return await generate(state, gen, request)


@router.post("/v1/chat/completions", responses=GENERATION_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    t_start = time.perf_counter()
    state = server_state(request)
    _check_request(state, body)
    n_chars = sum(len(m.text()) for m in body.messages)
    check_prompt_chars(request, "messages", n_chars)
    ids = await tokenize_off_loop(request, n_chars, chat_prompt_token_ids, body.messages)
    gen = _prepare(state, body, ids, ResponseFormat("chat", state.model_name), t_start)
    return await generate(state, gen, request)


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    state = server_state(request)
    card = {
        "id": state.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "llmbench",
        "max_model_len": state.max_model_len,
        "engine": state.engine_kind,  # "core-process" | "in-process"
        "stream_interval": state.stream_interval,
        "tokenizer": state.tokenizer_name,  # what to hand other tools (GuideLLM's --processor)
    }
    return JSONResponse({"object": "list", "data": [card]})


@router.get("/health", responses=error_responses(503))
async def health(request: Request) -> Response:
    engine = server_state(request).engine
    if engine is None or not engine.is_alive:
        reason = engine.failure if engine is not None and engine.failure else "not running"
        return error_response(503, f"engine is down: {reason}", code="engine_unavailable")
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    state = server_state(request)
    engine = state.running_engine()
    text = state.metrics.render(engine.snapshot, engine.num_unstarted)
    return PlainTextResponse(text, media_type=CONTENT_TYPE)


def create_app(
    engine_or_config: LLMEngine | EngineConfig,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_waiting: int = DEFAULT_MAX_WAITING,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    *,
    max_prompt_chars: int | None = None,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    engine_in_process: bool = False,
    core_connection: Connection | None = None,
    stream_interval: int = 1,
    log_level: str = "INFO",
) -> FastAPI:
    """An app serving one engine.

    - an LLMEngine: served from a thread of this process; the caller keeps ownership.
    - an EngineConfig: an engine core process is spawned when the app starts and stopped with
      it; with engine_in_process=True the engine is built here and served from a thread;
      with core_connection, the app joins a core a launcher started (several API processes).

    The engine runs while the app runs (its lifespan), so one engine must not back two running
    apps at once. stream_interval K: a stream sends a chunk once K tokens are pending (or it
    finished); 1 = one chunk per engine step.

    max_prompt_chars: longer prompts are a 400 before tokenizing (None: CHARS_PER_TOKEN_BOUND
    x max_model_len). body_timeout_s: the whole body must arrive within it (408 else);
    header_timeout_s: a connection must complete its request headers within it (closed else;
    server.py reads it from app.state when it configures uvicorn)."""
    if max_waiting < 1:
        raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
    if max_prompt_chars is not None and max_prompt_chars < 1:
        raise ValueError(f"max_prompt_chars must be >= 1, got {max_prompt_chars}")
    for name, value in (("body_timeout_s", body_timeout_s), ("header_timeout_s", header_timeout_s)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if stream_interval < 1:
        raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
    if isinstance(engine_or_config, LLMEngine):
        config, tokenizer = engine_or_config.config, engine_or_config.tokenizer
        in_process = True
    elif isinstance(engine_or_config, EngineConfig):
        config = engine_or_config
        tokenizer = load_tokenizer(config.model, config.tokenizer, config.model in PRESETS)
        in_process = engine_in_process
    else:
        raise ValueError(
            "engine_or_config must be an LLMEngine or EngineConfig, "
            f"got {type(engine_or_config).__name__}"
        )
    state = ServerState(
        model_name=served_model_name or config.model,
        tokenizer=tokenizer,
        # HF fast tokenizers are not thread-safe: the tokenizer thread gets its own copy
        encoder=copy.deepcopy(tokenizer),
        max_model_len=config.max_model_len,
        vocab_size=config.model_config.vocab_size,
        metrics=ServerMetrics(model_name=served_model_name or config.model, known_paths=ROUTES),
        engine_kind="in-process" if in_process else "core-process",
        stream_interval=stream_interval,
        tokenizer_name=tokenizer_source(config),
    )

    lane = LongPromptLane(encoder=copy.deepcopy(tokenizer))

    def make_client() -> EngineClient:
        if isinstance(engine_or_config, LLMEngine):
            return AsyncEngine(engine_or_config, max_waiting)
        if in_process:
            return AsyncEngine(LLMEngine(config), max_waiting)
        if core_connection is not None:
            return CoreClient(core_connection, max_waiting)
        return CoreClient.spawn(config, max_waiting, log_level)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        client = make_client()
        state.tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")
        lane.pool = ThreadPoolExecutor(1, thread_name_prefix="tokenizer-long")
        try:
            client.start()
            if isinstance(client, CoreClient) and client.ready is not None:
                state.max_model_len = client.ready.max_model_len  # what the core runs with
            state.engine = client
            yield
        finally:
            state.engine = None
            client.stop()
            state.tokenizer_pool.shutdown(wait=False, cancel_futures=True)
            lane.pool.shutdown(wait=False, cancel_futures=True)
            lane.pool = None
            if in_process and not isinstance(engine_or_config, LLMEngine):
                assert isinstance(client, AsyncEngine)
                client.engine.shutdown()

    app = FastAPI(title="llmbench OpenAI-compatible server", lifespan=lifespan)
    app.state.server = state
    app.state.max_prompt_chars = max_prompt_chars
    app.state.header_timeout_s = header_timeout_s
    app.state.long_prompt_lane = lane
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(tokenize_router)
    without_validation_422(app)
    # Added innermost first: counting wraps auth, auth wraps the body limit (no reading for a 401).
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes, timeout_s=body_timeout_s)
    if api_key:
        app.add_middleware(ApiKeyAuth, api_key=api_key)
    app.add_middleware(ResponseCounter, metrics=state.metrics)
    return app
