"""Client ceilings: how many streamed tokens per second each load generator can take in.

    python -m harness.ceiling --client openai locust --processes 1 2 --tokens-per-chunk 1 4 \
        --streams 64 --out reports/ceiling.json

For every (tokens per chunk, client, client processes) it starts harness.mock_server (no model:
it streams as fast as the client reads) and drives it:

- ``openai``: the harness's OpenAIBackend (harness/backends/openai.py), offline, ``--requests``
  requests with ``--streams`` in flight, split over ``num_workers=P`` client processes;
- ``locust``: harness.loadtest's locust run (harness/locustfile.py) with ``--streams`` users in a
  closed loop (no wait) for ``--run-time``, over ``locust --processes P``.

It reports tokens/s in total and per client process, and tokens per client CPU-second: what
one client process takes in when it has a core to itself (on a machine whose cores the mock
and other work share, the wall-clock figure understates the client). Each request asks for
``--chunks x --tokens-per-chunk`` tokens; every token is counted by the client (harness/sse.py)
and checked against the server's usage.

Reading the numbers: when the client falls behind, events queue in the socket and one read
brings several, which makes each cheaper (and their timestamps late). ``--interval-ms`` paces
the mock like a server's steps; a client keeps up with a pace when its CPU stays under a core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.loadtest import (
    LOCUSTFILE,
    LOOPBACK,
    free_port,
    read_rows,
    run_locust,
    running,
    spawn_logged,
    wait_healthy,
)

CLIENTS = ("openai", "locust")


@dataclass
class Ceiling:
    client: str
    processes: int
    streams: int
    tokens_per_chunk: int
    requests: int
    errors: int
    tokens: int
    wall_s: float
    client_cpu_s: float | None
    server_cpu_s: float | None
    server_processes: int
    server_impl: str

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def row(self) -> dict[str, Any]:
        cpu = self.client_cpu_s
        return {**asdict(self), "tok_per_s": self.tok_per_s,
                "tok_per_s_per_process": self.tok_per_s / self.processes,
                "events_per_s": self.tok_per_s / self.tokens_per_chunk,
                "tok_per_client_cpu_s": self.tokens / cpu if cpu else None}


# ---- CPU accounting -------------------------------------------------------------------------
def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of a live process and its live descendants (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (OSError, ValueError, IndexError):
        return None
    return own + sum(tree_cpu_s(int(c)) or 0.0 for c in children)


# ---- the mock -------------------------------------------------------------------------------
@contextmanager
def mock_server(tokens_per_chunk: int, chunks: int, processes: int, impl: str, log_dir: Path,
                interval_ms: float = 0.0) -> Iterator[tuple[str, int]]:
    """(url, pid) of a running harness.mock_server; stopped with SIGTERM on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "harness.mock_server", "--port", str(port), "--tokens-per-chunk",
           str(tokens_per_chunk), "--chunks", str(chunks), "--processes", str(processes), "--impl", impl,
           "--interval-ms", str(interval_ms)]
    with running(spawn_logged(cmd, log_dir / f"mock-{port}.log", {})) as proc:
        url = f"http://{LOOPBACK}:{port}"
        wait_healthy(url, proc, timeout_s=60)
        yield url, proc.pid


# ---- the clients ----------------------------------------------------------------------------
def measure_openai(url: str, args: argparse.Namespace, k: int, processes: int) -> dict[str, Any]:
    from harness.backends.base import ReplayOptions
    from harness.backends.openai import OpenAIBackend
    from workloads.trace import TraceRequest

    n_requests = args.requests or 4 * args.streams
    requests = [TraceRequest(arrival_s=0.0, max_tokens=args.chunks * k, prompt_token_ids=[1, 2, 3, 4],
                             request_id=f"r{i}", ignore_eos=True) for i in range(n_requests)]
    backend = OpenAIBackend(url, "mock", num_workers=processes)  # workers start here, untimed
    try:
        t0 = time.perf_counter()
        result = backend.run(requests, t0, ReplayOptions(timed=False, max_concurrency=args.streams, progress=False))
    finally:
        backend.close()
    cpu = result.info["client_cpu_s"]  # the run only: not the workers' start-up
    records = result.requests
    ok = [r for r in records if r.status == "ok" and r.output_tokens == len(r.token_times_s)]
    finished = [r.finished_s for r in records if r.finished_s is not None]
    sent = [r.sent_s for r in records if r.sent_s is not None]
    errors = [r.error for r in records if r.status != "ok"]
    if errors:
        print(f"  {len(errors)} errors, e.g. {errors[:2]}", file=sys.stderr)
    return {"requests": len(records), "errors": len(records) - len(ok),
            "tokens": sum(len(r.token_times_s) for r in ok),
            "wall_s": max(finished) - min(sent) if finished and sent else 0.0, "client_cpu_s": cpu}


def measure_locust(url: str, args: argparse.Namespace, k: int, processes: int, out: Path) -> dict[str, Any]:
    trace = out / "ceiling-trace.jsonl"
    trace.write_text(json.dumps({"arrival_s": 0.0, "prompt_token_ids": [1, 2, 3, 4],
                                 "max_tokens": args.chunks * k, "ignore_eos": True}) + "\n")
    rows_path = out / "rows.jsonl"
    rows_path.unlink(missing_ok=True)
    run_args = argparse.Namespace(locustfile=str(LOCUSTFILE), users=args.streams, spawn_rate=args.streams,
                                  run_time=args.run_time, stop_timeout=30, processes=processes, wait="0",
                                  trace=str(trace))
    (out / "cpu.jsonl").unlink(missing_ok=True)
    rc = run_locust(run_args, url, out, "mock")
    # CPU during the test, as each locust process reported it (not locust's start-up)
    cpu = sum(r["cpu_s"] for r in read_rows(out / "cpu.jsonl")) or None
    rows = read_rows(rows_path)
    if rc != 0:
        print(f"  locust exited with {rc}; see {out}/locust.out", file=sys.stderr)
    ok = [r for r in rows if r["status"] == "ok" and sum(r["chunk_tokens"]) == r["output_tokens"]]
    wall = max((r["finished"] for r in rows), default=0.0) - min((r["scheduled"] for r in rows), default=0.0)
    return {"requests": len(rows), "errors": len(rows) - len(ok) + (rc != 0),
            "tokens": sum(r["output_tokens"] for r in ok), "wall_s": wall, "client_cpu_s": cpu}


def measure(client: str, processes: int, k: int, args: argparse.Namespace, work: Path) -> Ceiling:
    with mock_server(k, args.chunks, args.server_processes, args.server_impl, work, args.interval_ms) as (url, pid):
        server_cpu0 = tree_cpu_s(pid)
        if client == "openai":
            got = measure_openai(url, args, k, processes)
        else:
            out = work / f"locust-{k}-{processes}"
            out.mkdir(parents=True, exist_ok=True)
            got = measure_locust(url, args, k, processes, out)
        server_cpu1 = tree_cpu_s(pid)
    server_cpu = None if server_cpu0 is None or server_cpu1 is None else server_cpu1 - server_cpu0
    return Ceiling(client, processes, args.streams, k, server_cpu_s=server_cpu,
                   server_processes=args.server_processes, server_impl=args.server_impl, **got)


# ---- entry point ----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--client", nargs="+", choices=CLIENTS, default=list(CLIENTS))
    p.add_argument("--processes", nargs="+", type=int, default=[1], help="client processes (each value is a run)")
    p.add_argument("--tokens-per-chunk", nargs="+", type=int, default=[1], help="tokens per SSE event (each value is a run)")
    p.add_argument("--streams", type=int, default=64, help="streams in flight in total (locust: users)")
    p.add_argument("--chunks", type=int, default=256, help="SSE events per request (default 256)")
    p.add_argument("--requests", type=int, default=None, help="openai: requests per run (default 4 x streams)")
    p.add_argument("--run-time", default="10s", help="locust: run time per run (default 10s)")
    p.add_argument("--server-processes", type=int, default=1, help="mock server processes (SO_REUSEPORT)")
    p.add_argument("--server-impl", choices=["asyncio", "starlette"], default="asyncio")
    p.add_argument("--interval-ms", type=float, default=0.0,
                   help="mock: pause between a stream's events (0: as fast as the client reads; a pace "
                        "such as 2 ms at 64 streams makes every event arrive in a read of its own)")
    p.add_argument("--out", default=None, help="write the rows as JSON to this file")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="llmbench ceiling",
                                                 description=__doc__.split("\n")[0]))


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_row(row: dict[str, Any]) -> None:
    print(f"{row['client']:7s} procs {row['processes']:2d}  k {row['tokens_per_chunk']:2d}  "
          f"streams {row['streams']:4d}  req {row['requests']:5d} err {row['errors']:3d}  "
          f"{row['tok_per_s']:9,.0f} tok/s  {row['tok_per_s_per_process']:9,.0f} tok/s/proc  "
          f"{_fmt(row['tok_per_client_cpu_s'], '9,.0f')} tok/client-cpu-s  "
          f"client cpu {_fmt(row['client_cpu_s'], '.1f')} s  mock cpu {_fmt(row['server_cpu_s'], '.1f')} s  "
          f"wall {row['wall_s']:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.processes) < 1 or min(args.tokens_per_chunk) < 1 or args.streams < 1 or args.chunks < 1:
        parser.error("--processes, --tokens-per-chunk, --streams and --chunks must be >= 1")
    if args.server_processes < 1 or (args.requests is not None and args.requests < 1):
        parser.error("--server-processes and --requests must be >= 1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ceiling-") as tmp:
        for k in args.tokens_per_chunk:
            for client in args.client:
                for processes in args.processes:
                    rows.append(measure(client, processes, k, args, Path(tmp)).row())
                    print_row(rows[-1])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
