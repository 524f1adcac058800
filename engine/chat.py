"""Chat messages -> prompt token ids, one rule for the server's /v1/chat/completions and
/tokenize, and for in-process callers (the harness's multi-turn backends).

Messages are {"role", "content"} dicts. They go through the tokenizer's own chat template when
it has one (HF checkpoints). The dummy-weight presets have a byte tokenizer with no template, so
they use this documented default, one block per message and an open assistant block at the end:

    <|system|>\\nYou are terse.\\n<|user|>\\nHi\\n<|assistant|>\\n
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

ASSISTANT_OPENING = "<|assistant|>\n"


def default_chat_prompt(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + ASSISTANT_OPENING


def chat_prompt_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> list[int]:
    """ValueError when the model's template rejects the conversation (e.g. its role order)."""
    if not getattr(tokenizer, "chat_template", None):
        text = default_chat_prompt(messages)
        return list(tokenizer(text if add_generation_prompt else text.removesuffix(ASSISTANT_OPENING)).input_ids)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises for conversations its template forbids
        raise ValueError(f"the model's chat template rejected the messages: {e}") from None
    # The template already holds BOS and friends: do not add special tokens a second time.
    return list(tokenizer(text, add_special_tokens=False).input_ids)
