"""Multi-turn chat workloads: a trace's turns grouped into conversations, and each
conversation's history as it grows.

    convs = conversations(requests)       # {conversation_id: [turn 0, turn 1, ...]}, checked

A turn row (trace field ``conversation_id`` + ``turn``) carries the user's message as its text
prompt. A backend sends turn k once turn k-1 has finished (and not before the row's arrival_s),
with the whole conversation so far: every earlier user message and, as the assistant's turns,
the answers the model actually gave.

The history's prompt ids come from engine/chat.py (`chat_prompt_token_ids`), the rule the
server uses for ``/v1/chat/completions`` too, so the same history gives the same ids in process
and over HTTP (tests/harness/test_multiturn.py checks the two agree).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

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
