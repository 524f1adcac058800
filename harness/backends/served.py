"""The engine behind its own HTTP server ("served"): `python -m engine.serve` on a free loopback
port with the run's model and engine args, replayed through the openai backend.

    backend = ServedBackend("qwen3-0.6b", {"num_kv_blocks": 2048}, num_workers=4, log_dir="reports/x")
    result = backend.run(requests, t0, options)      # an OpenAIBackend run against it
    backend.close()                                    # SIGTERM; an unclean exit is a warning

What `llmbench served` does around one run, as a backend, so that a sweep sets served rows
beside the in-process ones: the same model, the same EngineConfig fields (as the server's own
``--engine-arg`` flags, parsed by the same code), the same requests at the same rates. The
server runs the engine core in a process of its own (engine/serve) on the same GPU as any
in-process engine; a sweep closes its backends at its end, and a reused one is reset.

A server that does not come up (fastapi or uvicorn missing, a bad flag, an engine that fails to
build) raises RuntimeError with the end of its log: served rows fail loudly, never vanish.
``reset()`` restarts the server: its prefix cache cannot be cleared over HTTP, and a sweep that
replays the same prompts at its next point must not hit the blocks of the last one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from harness.backends.base import ReplayOptions, RunResult
from harness.backends.openai import OpenAIBackend
from harness.loadtest import LOOPBACK, free_port, start_server, stop_process, wait_healthy
from workloads.trace import TraceRequest

# What `python -m engine.serve` imports beyond the engine (the GPU image lacks them: carry wheels).
SERVER_MODULES = ("fastapi", "uvicorn", "prometheus_client")


def missing_server_modules() -> list[str]:
    """The server's dependencies this interpreter cannot import (its child inherits our path)."""
    return [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]


def server_flags(engine_arg_pairs: list[str]) -> list[str]:
    """K=V pairs as the server's own `--engine-arg` flags: one parser reads them on both sides
    (engine/config_args.py)."""
    return [f"--engine-arg={pair}" for pair in engine_arg_pairs]


def engine_arg_flags(engine_args: dict[str, Any]) -> list[str]:
    """EngineConfig fields as server flags; values as JSON, which the server's parser reads back."""
    return server_flags([f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in engine_args.items()])


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return "\n".join(f"  {line}" for line in text) or f"  ({path} is empty)"


def served_model_card(url: str) -> dict[str, Any]:
    """The server's /v1/models card: how it serves (our server adds `engine` and
    `stream_interval`; other servers may not, and then those stay unknown)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as resp:
            return json.loads(resp.read())["data"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return {}


def warm_up(url: str, model: str) -> None:
    """A few short requests first, as the in-process backend warms its engine: the first steps'
    lazy initialisation (and compilation on a GPU) stays out of the measured run. Their prompts
    share no block with a generated workload's random ids, so no prefix-cache hit leaks in; 64
    tokens, as the engine's own warm-up, or fewer when the server's max_model_len is smaller."""
    max_len = served_model_card(url).get("max_model_len") or 64 + 9
    n = max(1, min(64, int(max_len) - 9))  # room for the 8 output tokens
    warm = [TraceRequest(arrival_s=0.0, max_tokens=8, prompt_token_ids=list(range(1, n + 1)), ignore_eos=True,
                         request_id=f"warm-up-{i}") for i in range(4)]
    result = OpenAIBackend(url, model).run(warm, time.perf_counter(), ReplayOptions(timed=False, progress=False))
    errors = [r.error for r in result.requests if r.status != "ok"]
    if errors:
        raise RuntimeError(f"the server failed its warm-up requests: {errors[0]}")


class ServedBackend:
    name = "served"

    def __init__(self, model: str, engine_args: dict[str, Any] | None = None, num_workers: int = 1,
                 server_args: list[str] | tuple[str, ...] = (), startup_timeout_s: float = 600.0,
                 log_dir: str | None = None):
        if int(num_workers) < 1 or not startup_timeout_s > 0:
            raise ValueError(f"num_workers must be >= 1 and startup_timeout_s > 0, got {num_workers}, "
                             f"{startup_timeout_s}")
        missing = missing_server_modules()
        if missing:
            raise RuntimeError(f"the served backend's server needs {', '.join(missing)}, which this Python "
                               "cannot import: install the `serve` extra or put their wheels on PYTHONPATH")
        self.model, self.num_workers, self.startup_timeout_s = model, int(num_workers), startup_timeout_s
        self.flags = [*engine_arg_flags(engine_args or {}), *server_args]
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="llmbench-served-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.proc, self.client, self.card, self.starts = None, None, {}, 0
        self._start()

    def _start(self) -> None:
        port = free_port()
        self.base_url = f"http://{LOOPBACK}:{port}"
        fd, name = tempfile.mkstemp(prefix="server-", suffix=".log", dir=self.log_dir)
        os.close(fd)  # a unique name only: start_server opens the log itself
        self.log_path = Path(name)
        self.proc = start_server(self.model, port, self.flags, self.log_path)
        self.starts += 1
        try:
            wait_healthy(self.base_url, self.proc, self.startup_timeout_s)
            warm_up(self.base_url, self.model)
            self.card = served_model_card(self.base_url)
            self.client = OpenAIBackend(self.base_url, self.model, num_workers=self.num_workers)
        except (RuntimeError, TimeoutError, OSError) as e:
            self._stop(warn=False)
            raise RuntimeError(f"the served backend's server ({self.model}, {' '.join(self.flags)}) did not "
                               f"start: {e}; the end of {self.log_path}:\n{log_tail(self.log_path)}") from e

    def run(self, requests: list[TraceRequest], t0: float, options: ReplayOptions) -> RunResult:
        result = self.client.run(requests, t0, options)
        result.info.update(server_flags=self.flags, server_log=str(self.log_path), server_starts=self.starts,
                           server_engine=self.card.get("engine"), stream_interval=self.card.get("stream_interval"))
        return result

    def reset(self) -> None:
        self._stop()
        self._start()

    def close(self) -> None:
        self._stop()

    def _stop(self, warn: bool = True) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is None:
            return
        stop_process(self.proc, timeout_s=60)
        code, self.proc = self.proc.returncode, None
        if warn and code not in (0, -signal.SIGTERM):
            warnings.warn(f"the served backend's server exited with status {code}; the end of {self.log_path}:\n"
                          f"{log_tail(self.log_path)}", RuntimeWarning, stacklevel=2)
