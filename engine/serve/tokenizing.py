"""Tokenizing requests without stalling the server: the character limit checked before any
tokenizing, and tokenization on the API process's tokenizer threads (never on the event loop
that streams every other client's tokens). Used by the generation routes (app.py) and by
/tokenize (tokenize.py) alike."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from transformers import PreTrainedTokenizerBase

from engine.serve.errors import APIError
from engine.serve.generation import ServerState

T = TypeVar("T")
# A prompt of more characters than this many per context token cannot fit: byte-level tokens
# hold 1 character, BPE tokens ~4 on average, the longest (runs of spaces or dashes) ~16-32.
CHARS_PER_TOKEN_BOUND = 32
LONG_PROMPT_CHARS = 1 << 14  # longer prompts tokenize on their own thread (LongPromptLane)


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


@dataclass
class LongPromptLane:
    """A second tokenizer thread, with its own tokenizer copy (HF fast tokenizers are not
    thread-safe), for prompts of more than LONG_PROMPT_CHARS characters: tokenizing a prompt
    near the character limit takes seconds, and short prompts must not queue behind it.
    (HF's Rust tokenizers release the GIL while encoding, so the two threads run at once.)"""

    encoder: PreTrainedTokenizerBase
    pool: ThreadPoolExecutor | None = None  # set while the app runs


async def tokenize_off_loop(
    request: Request, n_chars: int, fn: Callable[..., T], *args: object
) -> T:
    """Run `fn(encoder_tokenizer, *args)` on a tokenizer thread: a long prompt or a chat
    template must not stall the event loop that streams every other client's tokens."""
    state, lane = server_state(request), request.app.state.long_prompt_lane
    pool, encoder = state.tokenizer_pool, state.encoder
    if n_chars > LONG_PROMPT_CHARS and lane.pool is not None:
        pool, encoder = lane.pool, lane.encoder
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(pool, fn, encoder, *args)


def prompt_chars_limit(request: Request) -> int:
    limit = request.app.state.max_prompt_chars
    return limit if limit is not None else CHARS_PER_TOKEN_BOUND * server_state(request).max_model_len


def check_prompt_chars(request: Request, param: str, n_chars: int) -> None:
    """Before tokenizing: a prompt this long cannot fit the context, whatever the tokenizer."""
    limit = prompt_chars_limit(request)
    if n_chars > limit:
        raise APIError(
            400,
            f"the prompt has {n_chars} characters; this server takes at most {limit} "
            f"(the model's context is {server_state(request).max_model_len} tokens)",
            param=param,
            code="context_length_exceeded",
        )


