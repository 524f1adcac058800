"""Incremental detokenization: decode a short window of the newest tokens each step instead of
the whole output, hold text back while it ends in an incomplete UTF-8 sequence, and hold back
the last (longest stop string - 1) characters so a stop string is never half streamed."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.emitted = 0  # characters of `text` already returned as deltas

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, new_token_ids: list[int], final: bool = False) -> tuple[str, str | None]:
        """Append tokens; return (text delta, stop string hit or None). Once a stop string is
        hit the text is cut before it and everything up to there is flushed."""
        self.token_ids.extend(new_token_ids)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        stop_hit = None
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            stop_hit = self._append(full[len(prefix) :])
        return self._emit(flush=final or stop_hit is not None), stop_hit

    def _append(self, new_text: str) -> str | None:
        # a stop string can only start in the held-back tail of the old text or in the new text
        start = max(0, len(self.text) - self.holdback)
        self.text += new_text
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return None
        idx, stop = min(hits)  # the earliest stop string wins
        self.text = self.text[:idx]
        return stop

    def _emit(self, flush: bool) -> str:
        end = len(self.text) if flush else max(self.emitted, len(self.text) - self.holdback)
        delta, self.emitted = self.text[self.emitted : end], end
        return delta
