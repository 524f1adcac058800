"""Steady-state windows: warm-up and cool-down requests kept in requests.parquet, left out of
the summary.

    warmup, cooldown = parse_bound("10"), parse_bound("5s")   # 10 requests, 5 seconds
    flag_window(records, warmup, cooldown)                    # sets RequestRecord.window

Warm-up is counted from the start: the first N requests sent (by sent_s), or
those sent in the first T seconds of the run. Cool-down is counted from the end: the last N
requests to finish, or those finishing in the last T seconds (the drain, when the load falls).
A request in both is warm-up. Requests never sent (not_sent past --duration, refused before
sending) stay steady: they count in num_not_sent / num_error, in no latency. The rows stay in
the Parquet with their flag.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from harness.records import RequestRecord

WINDOWS = ("warmup", "steady", "cooldown")


@dataclass(frozen=True)
class Bound:
    """How much of one end of a run to leave out: a request count or seconds (not both)."""

    requests: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.requests < 0 or not (self.seconds >= 0 and math.isfinite(self.seconds)):
            raise ValueError(f"a warm-up/cool-down must be >= 0, got {self}")
        if self.requests and self.seconds:
            raise ValueError("give a warm-up/cool-down in requests or in seconds, not both")

    def __bool__(self) -> bool:
        return bool(self.requests or self.seconds)

    def describe(self) -> str:
        return f"{self.seconds:g}s" if self.seconds else str(self.requests)


def parse_bound(text: str | int | float | None) -> Bound:
    """"10" -> 10 requests; "5s" -> 5 seconds; None/""/"0" -> nothing left out."""
    if text is None or str(text).strip() in ("", "0"):
        return Bound()
    t = str(text).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*s", t)
    if m:
        return Bound(seconds=float(m.group(1)))
    if re.fullmatch(r"\d+", t):
        return Bound(requests=int(t))
    raise ValueError(f"{text!r} is neither a request count (e.g. 10) nor seconds (e.g. 5s)")


def _start(r: RequestRecord) -> float:
    return r.sent_s


def _end(r: RequestRecord) -> float:
    return r.finished_s if r.finished_s is not None else r.sent_s


def flag_window(records: Sequence[RequestRecord], warmup: Bound = Bound(),
                cooldown: Bound = Bound()) -> None:
    """Set each record's window in place (every record starts as steady)."""
    for r in records:
        r.window = "steady"
    records = [r for r in records if r.sent_s is not None]
    if not records:
        return
    if cooldown:
        by_end = sorted(records, key=_end)
        if cooldown.requests:
            tail = by_end[-cooldown.requests:]
        else:
            last = _end(by_end[-1])
            tail = [r for r in by_end if _end(r) > last - cooldown.seconds]
        for r in tail:
            r.window = "cooldown"
    if warmup:
        by_start = sorted(records, key=_start)
        if warmup.requests:
            head = by_start[:warmup.requests]
        else:
            first = _start(by_start[0])
            head = [r for r in by_start if _start(r) < first + warmup.seconds]
        for r in head:
            r.window = "warmup"
