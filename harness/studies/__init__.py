"""One-off measurements, each a `llmbench studies NAME` subcommand and a module with
`build_parser()` / `main(argv)`: offline throughput per attention backend and against HF
(throughput.py), TP=N / TP=1 (tp_scaling.py), a decode step against its floor (step_profile.py)
and swept over batch x context with low-load TTFT (latency.py), detokenization's cost in
`LLM.generate` (detokenize_cost.py), time to first token at low load with prefill graphs on and
off (ttft.py), and the static-vs-continuous flagship (flagship.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_result(path: str | None, result: Any) -> None:
    """A study's --json output (nothing when no path was given)."""
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
