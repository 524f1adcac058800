"""Sweep profiles, GuideLLM style: a profile is a generator that yields the next rate point and
receives the summary of the run at the last one, so a sweep can adapt to what it measured.

    profile = make_profile("sweep", fractions=(0.25, 0.5, 0.75))
    point = next(profile)                    # RatePoint("offline", inf)
    point = profile.send(summary)            # rates at fractions of summary["request_throughput"]

Kinds:
    offline   one point, every request at t=0 (max throughput)
    fixed     the given ``rates`` (requests/s), in order
    sweep     offline first, then ``fractions`` of the request throughput it measured (> 1:
              arrivals faster than the engine can serve, to show queueing); with ``base_rate``,
              fractions of that rate instead (another sweep's offline rate: a later sweep then
              runs at exactly the earlier one's rates, under the same labels)

Point labels are stable across machines ("offline", "rate-2", "x0.5"), so a gate can name a
point even when the measured rates differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RatePoint:
    label: str
    rate: float  # requests/s; inf = offline (everything at t=0)


MAX_FRACTION = 4.0  # of the offline request rate

Profile = Generator[RatePoint, "dict[str, Any] | None", None]


def offline() -> Profile:
    yield RatePoint("offline", math.inf)


def fixed(rates: Sequence[float] = (1.0,)) -> Profile:
    rates = list(rates) if isinstance(rates, (list, tuple)) else [rates]
    bad = [r for r in rates if not (isinstance(r, (int, float)) and r > 0)]
    if not rates or bad:
        raise ValueError(f"fixed profile: rates must be numbers > 0 requests/s, got {rates}")
    for rate in rates:
        yield RatePoint("offline" if math.isinf(rate) else f"rate-{rate:g}", float(rate))


def sweep(fractions: Sequence[float] = (0.25, 0.5, 0.75), base_rate: float | None = None) -> Profile:
    fractions = list(fractions) if isinstance(fractions, (list, tuple)) else [fractions]
    # fractions above 1 ask for more than the offline rate: past saturation, queues must grow
    if not fractions or any(not (isinstance(f, (int, float)) and 0 < f <= MAX_FRACTION) for f in fractions):
        raise ValueError(f"sweep profile: fractions must be numbers in (0, {MAX_FRACTION:g}], got {fractions}")
    if base_rate is not None and not (isinstance(base_rate, (int, float)) and 0 < base_rate < math.inf):
        raise ValueError(f"sweep profile: base_rate must be a finite number > 0 requests/s, got {base_rate}")
    summary = yield RatePoint("offline", math.inf)
    max_rate = base_rate or (summary or {}).get("request_throughput")
    if not max_rate:  # nothing finished offline: no rate to take fractions of
        return
    for f in fractions:
        yield RatePoint(f"x{f:g}", max_rate * f)


PROFILES: dict[str, Callable[..., Profile]] = {"offline": offline, "fixed": fixed, "sweep": sweep}


def make_profile(kind: str, **params: Any) -> Profile:
    """A profile generator; unknown kinds or bad parameters raise ValueError now, not at the
    first next() (generator bodies run lazily, so the first point is pulled here)."""
    if kind not in PROFILES:
        raise ValueError(f"unknown profile {kind!r}; valid profiles: {', '.join(PROFILES)}")
    try:
        profile = PROFILES[kind](**params)
    except TypeError as e:
        raise ValueError(f"bad parameters {sorted(params)} for profile {kind!r}: {e}") from None
    return _resume(next(profile), profile)


def _resume(first: RatePoint, profile: Profile) -> Profile:
    summary = yield first
    while True:
        try:
            point = profile.send(summary)
        except StopIteration:
            return
        summary = yield point
