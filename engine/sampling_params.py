"""Per-request sampling settings, validated on construction (vLLM's names and meanings).

Every rule violation is a ValueError naming the field, whatever the value's type: a wrong type
(a string temperature, a bool or 1.5 as top_k) is a user mistake like an out-of-range number.
Numbers are normalised (floats for temperature / top_p, ints for the rest).

Stop strings are bounded (MAX_STOP_STRINGS strings of at most MAX_STOP_STRING_CHARS characters):
the detokenizer searches each one in the held-back tail plus each step's new text, so these
bounds keep that per-step cost small. vLLM sets no such limit; OpenAI's API allows 4 strings.
workloads/trace.py repeats the numbers (it may not import the engine); a test keeps them equal."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_INT = 2**63 - 1  # ids and counts end up in int64 tensors


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = -1  # -1 (or 0): whole vocabulary
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    detokenize: bool = True

    def __post_init__(self) -> None:
        self.temperature = _real("temperature", self.temperature)
        _require(self.temperature >= 0.0, "temperature", self.temperature, "must be >= 0")
        self.top_k = _integer("top_k", self.top_k)
        if self.top_k == 0:
            self.top_k = -1
        _require(self.top_k == -1 or self.top_k >= 1, "top_k", self.top_k, "must be -1 (disabled) or >= 1")
        self.top_p = _real("top_p", self.top_p)
        _require(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        if self.seed is not None:
            self.seed = _integer("seed", self.seed)
        self.max_tokens = _integer("max_tokens", self.max_tokens)
        _require(self.max_tokens >= 1, "max_tokens", self.max_tokens, "must be an integer >= 1")
        self.min_tokens = _integer("min_tokens", self.min_tokens)
        _require(0 <= self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                 f"must be in [0, max_tokens={self.max_tokens}]")
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = [_integer("stop_token_ids", t) for t in _sequence("stop_token_ids", self.stop_token_ids)]
        _require(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids,
                 "must be non-negative integers")
        _require(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids", len(self.stop_token_ids),
                 f"(the count) must be at most {MAX_STOP_TOKEN_IDS}")
        for name in ("ignore_eos", "detokenize"):
            _require(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be a bool")


def _require(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={_show(value)} {rule}")


def _show(value: object) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - an object whose repr fails is still reported
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _real(name: str, value: Any) -> float:
    """A finite real number (bool is not one), as a float."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    try:
        number = float(value) if ok else math.nan
    except (OverflowError, TypeError, ValueError):
        number = math.nan
    _require(math.isfinite(number), name, value, "must be a finite number")
    return number


def _integer(name: str, value: Any) -> int:
    """An integer (bool is not one; neither is 1.5 nor 2.0) within int64, as an int."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    _require(ok, name, value, "must be an integer")
    number = int(value)
    _require(-MAX_INT - 1 <= number <= MAX_INT, name, value, "must fit in 64 bits")
    return number


def _sequence(name: str, value: Any) -> list[Any]:
    if value is None:
        return []
    _require(isinstance(value, (list, tuple)), name, value, "must be a list")
    return list(value)


def _stop_strings(value: Any) -> list[str]:
    stop = [value] if isinstance(value, str) else _sequence("stop", value)
    _require(len(stop) <= MAX_STOP_STRINGS, "stop", f"<{len(stop)} strings>", f"has more than {MAX_STOP_STRINGS} strings")
    for s in stop:
        _require(isinstance(s, str) and s, "stop", s, "must be non-empty strings")
        _require(len(s) <= MAX_STOP_STRING_CHARS, "stop", s, f"is longer than {MAX_STOP_STRING_CHARS} characters")
        _require(_encodable(s), "stop", s, "is not valid Unicode (a lone surrogate?)")
    return stop


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
