"""Which Triton kernel specializations a block of code met for the first time in this process.

Triton compiles (or, with a warm disk cache, loads) a kernel once per specialization: integer
arguments are specialized on divisibility by 16 and on == 1 unless marked `do_not_specialize`.
A specialization first met inside a timed run costs a compile there on a fresh machine (seconds
in all), a cache load on later runs. `harness.studies.throughput` reports them, so a slow first run can be told
apart from a slow GPU (reports/PERF.md, session 5: first runs 3-6% slower).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class JitWatch:
    """Collects "module.kernel" for each specialization compiled or loaded while active."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.available = True

    def record(self, *, fn: Any = None, **_: Any) -> None:
        """Triton's jit_cache_hook; returning None lets the compile go on."""
        self.seen.append(f"{getattr(fn, 'module', '?')}.{getattr(fn, 'name', '?')}")


@contextlib.contextmanager
def watch_jit() -> Iterator[JitWatch]:
    """Record the specializations met inside the block (chaining any hook already installed).
    Where this Triton has no `knobs.runtime.jit_cache_hook`, `available` is False and nothing is
    recorded."""
    watch = JitWatch()
    try:
        from triton import knobs

        runtime = knobs.runtime
        previous = runtime.jit_cache_hook
    except (ImportError, AttributeError):
        watch.available = False
        yield watch
        return

    def hook(**kwargs: Any) -> Any:
        watch.record(**kwargs)
        return previous(**kwargs) if previous is not None else None

    runtime.jit_cache_hook = hook
    try:
        yield watch
    finally:
        runtime.jit_cache_hook = previous
