"""Incremental detokenization of a request's output tokens, with stop strings.

Text comes from one of three decoders, each holding text back while it ends in an incomplete
UTF-8 sequence and flushing it on the final call, so the concatenated deltas equal
`tokenizer.decode(all_ids, skip_special_tokens=True)`:
- byte-level BPE (GPT-2, Qwen, Llama 3: a fast tokenizer whose decoder is ByteLevel): each id's
  bytes come from a table built once per tokenizer and go through Python's incremental UTF-8
  decoder, a fraction of a microsecond a token and never more, whatever the ids;
- any other fast tokenizer: `tokenizers.decoders.DecodeStream`, which decodes a short window of
  the newest ids in Rust (about a microsecond a token while the text is valid UTF-8);
- anything else: decode a window of the newest ids twice in Python (prefix, prefix + new).

On top, `IncrementalDetokenizer` holds back the last (longest stop string - 1) characters so a
stop string is never half streamed, and cuts the text before the earliest stop string."""

from __future__ import annotations

import codecs
import functools

from tokenizers import Tokenizer
from tokenizers.decoders import ByteLevel, DecodeStream
from transformers import PreTrainedTokenizerBase

INCOMPLETE = "\ufffd"  # what a decode of a partial UTF-8 sequence ends with


def _byte_level_translation() -> dict[int, int]:
    """str.translate table from ByteLevel's characters (GPT-2's bytes_to_unicode) back to the
    bytes they stand for; other characters below 256 go to U+FFFF so a token holding one fails
    the latin-1 encode and falls back to its own UTF-8, as ByteLevel's decoder does."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    trans = {c: 0xFFFF for c in others}
    trans.update({b: b for b in printable})
    trans.update({256 + i: b for i, b in enumerate(others)})
    return trans


@functools.lru_cache(maxsize=4)  # one table per tokenizer (a 151k vocabulary takes ~0.4 s), not per request
def byte_table(backend: Tokenizer) -> tuple[tuple[bytes, ...], tuple[tuple[str, bytes], ...]]:
    """The bytes each id decodes to with skip_special_tokens (special ids and ids the vocabulary
    lacks give nothing), and what an incremental UTF-8 decode of those bytes alone gives: the
    text, and the start of an unfinished character it keeps back."""
    trans = _byte_level_translation()
    special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    table = [b""] * backend.get_vocab_size(with_added_tokens=True)
    for token, i in backend.get_vocab(with_added_tokens=True).items():
        if i in special or i >= len(table):
            continue
        try:
            table[i] = token.translate(trans).encode("latin-1")
        except UnicodeEncodeError:  # a character with no byte: ByteLevel keeps the token's UTF-8
            table[i] = token.encode()
    return tuple(table), tuple(_decode_start(b) for b in table)


def _decode_start(data: bytes) -> tuple[str, bytes]:
    text, used = codecs.utf_8_decode(data, "replace", False)
    return text, data[used:]


def prepare_detokenization(tokenizer: PreTrainedTokenizerBase) -> None:
    """Build what the detokenizers of this tokenizer share (the byte table) now, not in the
    first request's step."""
    make_decoder(tokenizer)


class ByteLevelDecoder:
    """Byte-level BPE: table lookup, then UTF-8 decoding that keeps back at most the three bytes
    of an unfinished character and replaces invalid bytes as a full decode does. With nothing
    kept back (the common case), a token is one lookup."""

    def __init__(self, tables: tuple[tuple[bytes, ...], tuple[tuple[str, bytes], ...]]):
        self._bytes, self._starts = tables
        self._buffer = b""  # the start of an unfinished character

    def push(self, ids: list[int], final: bool) -> str:
        n = len(self._bytes)
        if len(ids) == 1:
            i = ids[0]
            if not self._buffer:
                text, rest = self._starts[i] if 0 <= i < n else ("", b"")
                if not rest or not final:
                    self._buffer = rest
                    return text
            data = self._buffer + self._bytes[i] if 0 <= i < n else self._buffer
        else:
            data = self._buffer + b"".join([self._bytes[i] for i in ids if 0 <= i < n])
        text, used = codecs.utf_8_decode(data, "replace", final)
        self._buffer = data[used:]
        return text


class StreamDecoder:
    """Rust streaming decode of a fast tokenizer's backend (`PreTrainedTokenizerFast._tokenizer`).
    Ids that never complete a character (invalid byte-fallback runs) grow its window until one
    does; byte-level tokenizers, whose random-model output does that all the time, take
    ByteLevelDecoder instead."""

    def __init__(self, backend: Tokenizer):
        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=True)
        self._vocab = backend.get_vocab_size(with_added_tokens=True)
        self.token_ids: list[int] = []
        self._decoded = 0  # characters produced so far
        self._resync = False  # the stream lost its place: decode everything until it can restart

    def push(self, ids: list[int], final: bool) -> str:
        self.token_ids += ids
        # ids the vocabulary lacks decode to nothing; kept out, they cannot grow the stream's window
        if len(ids) == 1:
            known = ids[0] if 0 <= ids[0] < self._vocab else None
        else:
            known = [i for i in ids if 0 <= i < self._vocab] or None
        text = None
        if known is not None and not self._resync:
            try:
                text = self._stream.step(self._backend, known)
            except Exception:  # DecodeStream's "invalid prefix": its window no longer decodes consistently
                self._resync = True
        if self._resync or (final and text is None):
            return self._from_full_decode(final)
        if text is None:
            return ""
        self._decoded += len(text)
        return text

    def _from_full_decode(self, final: bool) -> str:
        # rare (a resync) or once per request (the final flush): one decode of the whole output
        full = self._backend.decode(self.token_ids, skip_special_tokens=True)
        if not final and full.endswith(INCOMPLETE):
            return ""
        if self._resync and not final:
            # a stream seeded with every id decodes them as its prefix, then only the newest ids
            self._stream = DecodeStream(self.token_ids, skip_special_tokens=True)
        self._resync = False
        text, self._decoded = full[self._decoded :], len(full)
        return text


class WindowDecoder:
    """Any tokenizer: decode ids[prefix_offset:read_offset] and ids[prefix_offset:], emit the
    difference once it does not end in an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self._tokenizer = tokenizer
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, ids: list[int], final: bool) -> str:
        self.token_ids += ids
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset :])
        if len(full) <= len(prefix) or (not final and full.endswith(INCOMPLETE)):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return full[len(prefix) :]


# every pattern transformers' clean_up_tokenization rewrites
CLEAN_UP_PROBE = "a . b ? c ! d , e ' f n't g 'm h 's i 've j 're"


@functools.lru_cache(maxsize=4)  # per tokenizer: one probe, not one per request
def _decodes_like_backend(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's decode is its Rust backend's: transformers may also clean up
    spaces before punctuation (clean_up_tokenization_spaces), which transformers 5 skips for BPE
    models; asking the tokenizer itself holds for either version."""
    backend = tokenizer.backend_tokenizer
    ids = backend.encode(CLEAN_UP_PROBE, add_special_tokens=False).ids
    return tokenizer.decode(ids, skip_special_tokens=True) == backend.decode(ids, skip_special_tokens=True)


def make_decoder(tokenizer: PreTrainedTokenizerBase) -> ByteLevelDecoder | StreamDecoder | WindowDecoder:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer) or (
            getattr(tokenizer, "clean_up_tokenization_spaces", False) and not _decodes_like_backend(tokenizer)):
        return WindowDecoder(tokenizer)
    if isinstance(backend.decoder, ByteLevel):
        return ByteLevelDecoder(byte_table(backend))
    return StreamDecoder(backend)


class IncrementalDetokenizer:
    """One request's output text, delta by delta, cut at the first stop string. Only output ids
    are fed (no prompt context), so the text equals a decode of the output ids alone."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]):
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.decoder = make_decoder(tokenizer)
        self._held = ""  # decoded, not yet returned: at most `holdback` characters between calls
        self.stop_hit: str | None = None

    def add(self, new_token_ids: list[int], final: bool = False) -> tuple[str, str | None]:
        """Append tokens; return (text delta, stop string hit or None). Once a stop string is
        hit the text is cut before it, everything up to there is flushed, and later calls
        return nothing."""
        new_text = self.decoder.push(new_token_ids, final)
        if not self.stop:
            return new_text, None
        if self.stop_hit is not None:
            return "", None
        return self._check_stops(new_text, final)

    def add_until_stop(self, token_ids: list[int], final: bool) -> tuple[str, int, str | None]:
        """Add a request's new tokens; `final`: the last of them ends the request. Returns (text
        delta, tokens kept, the stop string that ends the output early or None). With stop
        strings the tokens go in one by one, so the output ends at the token that completed the
        stop string; one found on the final token leaves the request's own finish reason."""
        if not self.stop:
            return self.add(token_ids, final)[0], len(token_ids), None
        parts = []
        for i, token in enumerate(token_ids):
            last = i == len(token_ids) - 1
            part, hit = self.add([token], final=final and last)
            parts.append(part)
            if hit is not None and not (final and last):
                return "".join(parts), i + 1, hit
        return "".join(parts), len(token_ids), None

    def _check_stops(self, new_text: str, final: bool) -> tuple[str, str | None]:
        # a stop string can only start in the held-back tail or in the new text
        text = self._held + new_text
        if new_text and any(s in text for s in self.stop):
            idx, self.stop_hit = min((text.find(s), s) for s in self.stop if s in text)  # the earliest wins
            self._held = ""
            return text[:idx], self.stop_hit
        cut = len(text) if final else max(0, len(text) - self.holdback)
        self._held = text[cut:]
        return text[:cut], None
