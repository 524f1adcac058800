"""Response bodies of /v1/completions and /v1/chat/completions, whole and streamed (SSE).

Streaming sends one chunk per engine step with all of that step's new tokens (or per
--stream-interval tokens: generation.py), even when they add no text yet (an incomplete UTF-8
sequence, or text held back while it may still become a stop string). Each choice also carries
`token_ids` (an extension, as in vLLM's `return_token_ids`), so clients can count tokens per chunk
exactly instead of guessing from text.
Chat streams put `role` in the first token's chunk rather than in an empty chunk of its own, so a
client that times "first chunk" gets the first token.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


def sse(data: dict[str, Any] | str) -> bytes:
    payload = (
        data
        if isinstance(data, str)
        else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    )
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class ResponseFormat:
    """Per-request shape: "completion" (text_completion) or "chat" (chat.completion)."""

    kind: str
    model: str
    request_id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    _role_sent: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("completion", "chat"):
            raise ValueError(f"kind must be 'completion' or 'chat', got {self.kind!r}")
        if not self.request_id:
            self.request_id = (
                "cmpl-" if self.kind == "completion" else "chatcmpl-"
            ) + uuid.uuid4().hex

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(self, text: str, token_ids: list[int], finish_reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": finish_reason,
            "token_ids": token_ids,
        }
        if self.kind == "completion":
            choice.update(text=text, logprobs=None)
            return self._envelope("text_completion", [choice])
        delta: dict[str, Any] = {"content": text}
        if not self._role_sent:
            delta, self._role_sent = {"role": "assistant", **delta}, True
        choice.update(delta=delta, logprobs=None)
        return self._envelope("chat.completion.chunk", [choice])

    def usage_chunk(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int
    ) -> dict[str, Any]:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        return {
            **self._envelope(obj, []),
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
        }

    def full(
        self,
        text: str,
        token_ids: list[int],
        finish_reason: str | None,
        prompt_tokens: int,
        cached_tokens: int,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": finish_reason,
            "logprobs": None,
            "token_ids": token_ids,
        }
        if self.kind == "completion":
            choice["text"] = text
            body = self._envelope("text_completion", [choice])
        else:
            choice["message"] = {"role": "assistant", "content": text}
            body = self._envelope("chat.completion", [choice])
        body["usage"] = usage(prompt_tokens, len(token_ids), cached_tokens)
        return body
