"""Turning requests into prompt token ids.

Chat messages go through the tokenizer's own chat template when it has one (HF checkpoints).
The dummy-weight presets have a byte tokenizer with no template, so they use this documented
default, one block per message and an open assistant block at the end:

    <|system|>\\nYou are terse.\\n<|user|>\\nHi\\n<|assistant|>\\n
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from engine.serve.errors import APIError
from engine.serve.protocol import ChatMessage


def default_chat_prompt(messages: list[ChatMessage]) -> str:
    return "".join(f"<|{m.role}|>\n{m.text()}\n" for m in messages) + "<|assistant|>\n"


def chat_prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage]
) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer(default_chat_prompt(messages)).input_ids
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # jinja raises for conversations its template forbids (e.g. role order)
        raise APIError(
            400, f"the model's chat template rejected the messages: {e}", param="messages"
        ) from None
    # The template already holds BOS and friends: do not add special tokens a second time.
    return tokenizer(text, add_special_tokens=False).input_ids


def text_prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | list[int]) -> list[int]:
    """Same tokenization as LLMEngine.add_request does for a string, so counts agree."""
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    return list(prompt)
