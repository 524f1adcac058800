"""The SSE client core both load generators share: split a byte stream into events, count tokens.

    reader = EventReader(t0=t0)
    for chunk in byte_chunks:                       # as the socket hands them over
        reader.feed(chunk, time.perf_counter())     # True once "[DONE]" arrived (reader.done_at)
    reader.close(time.perf_counter())
    reader.state.token_times()                      # one time per token; .usage, .finish_reason

(EventReader = SSEDecoder, which splits bytes into events, + StreamState, which counts them.)

Used by harness/backends/openai.py (httpx, asyncio) and harness/locustfile.py (requests, gevent),
so both clients count the same way. No torch, engine or gevent-unsafe imports, no module state.

Token counting per choice of a chunk: ``len(choice["token_ids"])`` when the server sends token
ids (our server does; vLLM with ``return_token_ids``), else 1 for a chunk with non-empty text
(``text`` of a completion, ``delta.content`` of a chat chunk). ``usage`` is taken from the chunk
that carries it (the final one, with ``stream_options.include_usage``); an ``error`` object in
the stream raises StreamError; the last non-null ``finish_reason`` is kept.

Hot path: every event of every stream goes through ``on_data``. A plain token chunk (exactly one
``"token_ids":[...]``, ``"finish_reason":null``, no usage or error) is counted from its bytes
without JSON decoding (about 6x cheaper than ``json.loads`` on a 200-byte chunk); any other event
is decoded once. The byte patterns cannot match inside a JSON string value: a quote there is
always escaped as ``\\"``, and every pattern starts with an unescaped quote followed by a key.
"""

from __future__ import annotations

import json
from typing import Any

DONE = b"[DONE]"
_IDS = b'"token_ids":['
_NOT_FINISHED = b'"finish_reason":null'
_USAGE = b'"usage"'
_ERROR = b'"error"'


class StreamError(Exception):
    """The server reported an error inside a 200 stream, or the stream was malformed."""


class SSEDecoder:
    """Incremental Server-Sent Events parser: bytes in, the ``data`` payload of each complete
    event out (multi-line data joined with "\\n"; comments, ``event:``/``id:``/``retry:`` fields
    and events without data are dropped). Handles "\\n", "\\r\\n" and "\\r" line ends."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            buf = _normalise_newlines(buf)
        if b"\n\n" not in buf:
            self._buf = buf
            return []
        events = buf.split(b"\n\n")
        self._buf = events.pop()
        out = []
        for event in events:
            # Fast path: our servers send exactly "data: <json>" per event.
            if event.startswith(b"data: ") and b"\n" not in event:
                out.append(event[6:])
            else:
                data = _event_data(event)
                if data is not None:
                    out.append(data)
        return out

    def close(self) -> list[bytes]:
        """The last event when the stream ended without its blank line (else [])."""
        rest, self._buf = self._buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n"), b""
        data = _event_data(rest.rstrip(b"\n")) if rest.strip() else None
        return [] if data is None else [data]


def _normalise_newlines(buf: bytes) -> bytes:
    # A "\r" at the very end may be the first half of "\r\n": keep it for the next chunk by
    # normalising only what precedes it (the caller's buffer keeps the whole tail anyway).
    if buf.endswith(b"\r"):
        return _normalise_newlines(buf[:-1]) + b"\r"
    return buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _event_data(event: bytes) -> bytes | None:
    lines = [line for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    parts = [line[6:] if line.startswith(b"data: ") else line[5:] for line in lines]
    return b"\n".join(parts)


def fast_token_count(data: bytes) -> int | None:
    """Tokens in a plain token chunk counted from its bytes, or None when the chunk needs a
    full decode (no or several token_ids lists, a finish_reason, usage, an error)."""
    i = data.find(_IDS)
    if i < 0 or _NOT_FINISHED not in data or _USAGE in data or _ERROR in data:
        return None
    start = i + len(_IDS)
    if data.find(_IDS, start) >= 0:
        return None  # several choices: decode them properly
    end = data.find(b"]", start)
    if end < 0:
        return None
    return 0 if end == start else data.count(b",", start, end) + 1


def choice_tokens(choice: dict[str, Any]) -> int:
    """Tokens one decoded choice carries (see the module docstring)."""
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    if "text" in choice:
        return 1 if choice["text"] else 0
    delta = choice.get("delta")
    return 1 if isinstance(delta, dict) and delta.get("content") else 0


class StreamState:
    """What one streamed response said so far: token chunks with their arrival times, usage,
    finish_reason. Chunk times are stored once per chunk (``chunk_times``/``chunk_tokens``) and
    expanded to one time per token only when asked (``token_times``)."""

    __slots__ = ("chunk_times", "chunk_tokens", "num_tokens", "first_token", "finish_reason",
                 "usage", "done")

    def __init__(self) -> None:
        self.chunk_times: list[float] = []
        self.chunk_tokens: list[int] = []
        self.num_tokens = 0  # tokens counted from the chunks
        self.first_token: float | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.done = False  # "[DONE]" seen

    def on_data(self, data: bytes, t: float) -> bool:
        """Take one event's data received at time t; True once the stream said "[DONE]".
        Raises StreamError for an error event or data that is not JSON."""
        n = fast_token_count(data)
        if n is None:
            if data.strip() == DONE:
                self.done = True
                return True
            n = self._decoded(data)
        if n:
            if self.first_token is None:
                self.first_token = t
            self.chunk_times.append(t)
            self.chunk_tokens.append(n)
            self.num_tokens += n
        return False

    def _decoded(self, data: bytes) -> int:
        try:
            event = json.loads(data)
        except ValueError:
            raise StreamError(f"event data is not JSON: {data[:200]!r}") from None
        if not isinstance(event, dict):
            raise StreamError(f"event data is not a JSON object: {data[:200]!r}")
        if "error" in event:
            err = event["error"]
            message = err.get("message", err) if isinstance(err, dict) else err
            raise StreamError(f"error event in stream: {message}")
        if event.get("usage"):
            self.usage = event["usage"]
        n = 0
        for choice in event.get("choices") or ():
            n += choice_tokens(choice)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return n

    def token_times(self) -> list[float]:
        """One arrival time per token counted (a chunk of k tokens gives its time k times)."""
        if len(self.chunk_times) == self.num_tokens:
            return list(self.chunk_times)
        out: list[float] = []
        for t, n in zip(self.chunk_times, self.chunk_tokens):
            out += [t] * n
        return out

    def usage_counts(self) -> tuple[int, int, int]:
        """(prompt, completion, cached) tokens: from usage when the server sent it, else
        (0, tokens counted, 0)."""
        u = self.usage or {}
        completion = u.get("completion_tokens")
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
        return (int(u.get("prompt_tokens") or 0),
                int(completion) if completion is not None else self.num_tokens, int(cached or 0))


class EventReader:
    """One response body fed read by read: every event a read completes gets that read's time
    (minus t0); done_at is when "[DONE]" arrived. Events after "[DONE]" are ignored."""

    __slots__ = ("decoder", "state", "t0", "done_at")

    def __init__(self, state: StreamState | None = None, t0: float = 0.0):
        self.decoder, self.state, self.t0 = SSEDecoder(), state or StreamState(), t0
        self.done_at: float | None = None

    def feed(self, data: bytes, t: float) -> bool:
        """Take the bytes one read returned at time t; True once "[DONE]" has arrived."""
        for event in self.decoder.feed(data):
            if self.done_at is None and self.state.on_data(event, t - self.t0):
                self.done_at = t - self.t0
        return self.done_at is not None

    def close(self, t: float) -> None:
        """The body ended (at time t): take a last event that lacked its blank line."""
        for event in self.decoder.close():
            if self.done_at is None and self.state.on_data(event, t - self.t0):
                self.done_at = t - self.t0
