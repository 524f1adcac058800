"""Turning requests into prompt token ids, as HTTP errors where the client is at fault. The chat
rule itself (template, or the presets' documented default) lives in engine/chat.py."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from engine import chat
from engine.serve.errors import APIError
from engine.serve.protocol import ChatMessage


def _dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.text()} for m in messages]


def default_chat_prompt(messages: list[ChatMessage]) -> str:
    return chat.default_chat_prompt(_dicts(messages))


def chat_prompt_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage],
                          add_generation_prompt: bool = True) -> list[int]:
    try:
        return chat.chat_prompt_token_ids(tokenizer, _dicts(messages), add_generation_prompt)
    except ValueError as e:  # the template rejected the conversation: the client's to fix
        raise APIError(400, str(e), param="messages") from None


def text_prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | list[int]) -> list[int]:
    """Same tokenization as LLMEngine.add_request does for a string, so counts agree."""
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    return list(prompt)
