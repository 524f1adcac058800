"""Multi-turn chat workloads: a trace's turns grouped into conversations, and the chat prompt a
conversation's history becomes.

    convs = conversations(requests)       # {conversation_id: [turn 0, turn 1, ...]}, checked
    chat_prompt_token_ids(tokenizer, [{"role": "user", "content": "Hi"}])

A turn row (trace field ``conversation_id`` + ``turn``) carries the user's message as its text
prompt. A backend sends turn k once turn k-1 has finished (and not before the row's arrival_s),
with the whole conversation so far: every earlier user message and, as the assistant's turns,
the answers the model actually gave.

The prompt is built the way the engine's server builds a ``/v1/chat/completions`` prompt
(engine/serve/chat.py): the tokenizer's chat template when it has one, else the documented
default (one ``<|role|>`` block per message and an open assistant block). The in-process
backends use this helper, so the same history gives the same token ids in process and over
HTTP (tests/harness/test_multiturn.py checks the two agree); it lives here and not in
engine/serve so that the engine backends need no web-server packages.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from workloads.trace import TraceRequest


def conversations(requests: Iterable[TraceRequest]) -> dict[str, list[TraceRequest]]:
    """The conversation turns of `requests` by conversation_id, each list in turn order.
    Raises ValueError unless every conversation's turns are exactly 0, 1, ..., n-1."""
    by_id: dict[str, list[TraceRequest]] = defaultdict(list)
    for r in requests:
        if r.conversation_id is not None:
            by_id[r.conversation_id].append(r)
    for cid, turns in by_id.items():
        turns.sort(key=lambda r: r.turn)
        numbers = [r.turn for r in turns]
        if numbers != list(range(len(turns))):
            raise ValueError(f"conversation {cid!r}: turns must be 0..{len(turns) - 1} once each, got {numbers}")
    return dict(by_id)


def default_chat_prompt(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def chat_prompt_token_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids of a chat (messages: {"role", "content"} dicts) for an HF tokenizer."""
    if not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(default_chat_prompt(messages)).input_ids)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template already holds BOS and friends: do not add special tokens a second time.
    return list(tokenizer(text, add_special_tokens=False).input_ids)


class History:
    """The messages of one conversation so far, grown turn by turn."""

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []

    def ask(self, user_text: str) -> list[dict[str, str]]:
        """The messages to send for the next turn (the user's message appended)."""
        self.messages.append({"role": "user", "content": user_text})
        return list(self.messages)

    def answer(self, assistant_text: str) -> None:
        self.messages.append({"role": "assistant", "content": assistant_text})
