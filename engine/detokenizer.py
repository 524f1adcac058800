"""Incremental detokenization: decode a short window of the newest tokens each step instead of
the whole output, and hold text back while it ends in an incomplete UTF-8 sequence."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, new_token_ids: list[int], final: bool = False) -> tuple[str, str | None]:
        """Append tokens; return (text delta, stop string hit or None). Once a stop string
        is hit, the text is cut before it."""
        self.token_ids.extend(new_token_ids)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return "", None
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return self._append(delta)

    def _append(self, delta: str) -> tuple[str, str | None]:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += delta
        for s in self.stop:
            idx = self.text.find(s, start)
            if idx >= 0:
                cut = len(self.text) - len(delta)
                self.text = self.text[:idx]
                return self.text[cut:] if idx > cut else "", s
        return delta, None
