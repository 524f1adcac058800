"""Token counting for dataset workloads: one adapter over the tokenizers a caller may pass.

    counter = TokenCounter(tokenizer)   # an HF tokenizer, or any object with encode/decode
    counter.count(text)                 # prompt tokens as the engine counts them
    counter.content_ids(text)           # ids of the text alone (no BOS or other added tokens)
    counter.decode(ids)

workloads/ never loads a tokenizer itself (that would tie it to the engine's presets): the
caller passes one, e.g. ``transformers.AutoTokenizer.from_pretrained(local_dir)`` or, for the
dummy-weight presets, ``engine.tokenizer.build_byte_tokenizer()``.

An HF tokenizer (callable, returning ``input_ids``) is counted as ``tokenizer(text).input_ids``:
exactly what ``LLMEngine.add_request`` and the server do with a text prompt, so a prompt sized
here has that many prompt tokens there (special tokens such as a BOS included). A plain object
is counted with ``encode(text)``.
"""

from __future__ import annotations

from typing import Any


class TokenCounter:
    def __init__(self, tokenizer: Any):
        self.is_hf = callable(tokenizer) and hasattr(tokenizer, "encode")
        if not (self.is_hf or (hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode"))):
            raise ValueError(f"a tokenizer needs encode/decode methods (or to be an HF tokenizer), "
                             f"got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer

    def ids(self, text: str) -> list[int]:
        """The prompt's token ids as the engine tokenizes it."""
        if self.is_hf:
            return list(self.tokenizer(text).input_ids)
        return list(self.tokenizer.encode(text))

    def count(self, text: str) -> int:
        return len(self.ids(text))

    def content_ids(self, text: str) -> list[int]:
        """The text's own ids, without the special tokens a prompt gets added."""
        if self.is_hf:
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)
        return list(self.tokenizer.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)
