"""Load test: the OpenAI shim on a model, locust against it, a harness report from what it saw.

    python -m harness.loadtest --model tiny --users 4 --spawn-rate 4 --run-time 8s --out reports/load-tiny
    nox -s load -- --users 16 --run-time 60s
    python -m harness.loadtest --host http://127.0.0.1:8000 ...   # an already running server
    python -m harness.loadtest --users 256 --processes 4 --wait 0 ...   # closed loop, 4 locust workers

1. start `python -m engine.serve` on a free 127.0.0.1 port (unless --host) and wait for /health;
2. run locust headless (harness/locustfile.py) for --run-time with --users (over --processes
   forked locust workers; each user waits --wait seconds between requests), writing
   locust's CSV and HTML next to the report; its users append raw rows to rows.jsonl;
3. stop everything it started, also on errors, Ctrl-C and SIGTERM;
4. turn the rows into RequestRecords (times relative to the first request) and write a
   report with harness.report.write_report; print a summary.

While locust runs, the server's /metrics is scraped every --scrape-interval seconds
(harness/scrape.py) into server_metrics.parquet, on the requests' clock, and its queue, KV
usage and preemptions join the summary (server_* columns).

Exit status: 0 when every request succeeded, 1 when any failed, none ran or locust failed,
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from harness.records import RequestRecord
from harness.report import write_report

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
LOOPBACK = "127.0.0.1"


def parse_duration_s(text: str) -> float:
    """Locust's --run-time format: "90", "90s", "2m", "1h30m"."""
    match = re.fullmatch(r"(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s?)?", text.strip())
    if not text.strip() or match is None:
        raise ValueError(f"run time {text!r} is not valid; use e.g. 30s, 2m, 1h30m")
    h, m, s = (int(g) if g else 0 for g in match.groups())
    if h * 3600 + m * 60 + s <= 0:
        raise ValueError(f"run time {text!r} must be > 0")
    return float(h * 3600 + m * 60 + s)


# ---- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra}
    # An uninstalled checkout: make engine/ and harness/ importable in the children.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def spawn_logged(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        # A session of its own: a terminal's Ctrl-C reaches only us, and we stop it in order.
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env=_child_env(env), start_new_session=True)


def _flags(flags: dict[str, object]) -> list[str]:
    return [str(x) for pair in flags.items() for x in pair]


def start_server(model: str, port: int, server_args: list[str], log_path: Path,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    flags = {"--model": model, "--host": LOOPBACK, "--port": port, "--log-level": "warning"}
    return spawn_logged([sys.executable, "-m", "engine.serve", *_flags(flags), *server_args], log_path, env or {})


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} during startup")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM (graceful), then SIGKILL after timeout_s; only the process we started."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)


@contextmanager
def running(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    try:
        yield proc
    finally:
        stop_process(proc)


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit, so `finally` blocks stop the children (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_locust(args: argparse.Namespace, url: str, out: Path, model: str | None) -> int:
    flags = {"-f": args.locustfile, "-u": args.users, "-r": args.spawn_rate, "--run-time": args.run_time,
             "--host": url, "--stop-timeout": args.stop_timeout, "--csv": out / "locust",
             "--html": out / "locust.html", "--loglevel": "WARNING", "--logfile": out / "locust.log"}
    if args.processes != 1:
        flags["--processes"] = args.processes  # locust forks this many workers under one master
    cmd = [sys.executable, "-m", "locust", "--headless", "--only-summary", *_flags(flags)]
    env = {"LLMBENCH_LOCUST_ROWS": str(out / "rows.jsonl"), "LLMBENCH_LOCUST_CPU": str(out / "cpu.jsonl")}
    if args.wait is not None:
        env["LLMBENCH_LOCUST_WAIT"] = args.wait
    if getattr(args, "once", False):  # each user sends one trace row (harness.served)
        env.update(LLMBENCH_LOCUST_ONCE="1", LLMBENCH_LOCUST_PROCESSES=str(args.processes))
    if model:
        env["LLMBENCH_MODEL"] = model
    if args.trace:
        env["LLMBENCH_LOCUST_TRACE"] = str(Path(args.trace).resolve())
    with running(spawn_logged(cmd, out / "locust.out", env)) as proc:
        try:  # locust stops itself; the margin covers its start-up and the stop timeout
            return proc.wait(parse_duration_s(args.run_time) + args.stop_timeout + 120)
        except subprocess.TimeoutExpired:
            print("locust did not stop in time; killing it", file=sys.stderr)
            return 1


# ---- results ---------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


_TIME_KEYS = {"scheduled": "scheduled_s", "sent": "sent_s", "first_token": "first_token_s", "finished": "finished_s"}


def rows_to_records(rows: list[dict[str, Any]]) -> list[RequestRecord]:
    """Locust rows (epoch seconds) as RequestRecords timed from the first request's start."""
    t0 = min((r["scheduled"] for r in rows), default=0.0)
    records = []
    for row in sorted(rows, key=lambda r: r["scheduled"]):
        counts = {k: v for k, v in row.items() if k not in _TIME_KEYS and k not in _TOKEN_KEYS}
        times = {field: None if row[k] is None else row[k] - t0 for k, field in _TIME_KEYS.items()}
        records.append(RequestRecord(**counts, **times, token_times_s=[t - t0 for t in _token_times(row)]))
    return records


_TOKEN_KEYS = ("token_times", "chunk_times", "chunk_tokens")


def _token_times(row: dict[str, Any]) -> list[float]:
    """One time per token: a row holds per-chunk times and token counts (or, from an older
    locustfile, one time per token)."""
    if "chunk_times" not in row:
        return row["token_times"]
    out: list[float] = []
    for t, n in zip(row["chunk_times"], row["chunk_tokens"]):
        out += [t] * n
    return out


def scrape_metrics(url: str) -> dict[str, float]:
    """The server's /metrics samples without histogram buckets ({} if it has no /metrics)."""
    from harness.scrape import fetch_samples

    return fetch_samples(url)


def print_summary(summary: dict[str, Any], out: Path) -> None:
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    print(f"load test report: {out}")
    print(f"  requests {summary['num_requests']}  ok {summary['num_ok']}  errors {summary['num_error']}  "
          f"aborted {summary['num_aborted']}  duration {fmt(summary['duration_s'])} s")
    print(f"  throughput {fmt(summary['request_throughput'])} req/s, {fmt(summary['output_throughput'])} tok/s")
    for name in ("ttft", "itl", "e2el"):
        p50, p90, p99 = (fmt(summary[f"p{p}_{name}_ms"]) for p in (50, 90, 99))
        print(f"  {name:5s} ms  p50 {p50}  p90 {p90}  p99 {p99}")


# ---- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmbench load", description=__doc__.split("\n")[0])
    return add_arguments(parser)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The load test's options on `p` (a parser of its own, or a CLI subcommand's)."""
    p.add_argument("--model", default="tiny", help="model the started server loads (default: tiny)")
    p.add_argument("--host", default=None, help="use this running server instead of starting one")
    p.add_argument("--served-model", default=None, help="model name to send (default: ask /v1/models)")
    p.add_argument("--users", "-u", type=int, default=4)
    p.add_argument("--spawn-rate", "-r", type=float, default=4.0)
    p.add_argument("--run-time", "-t", default="8s", help="locust --run-time (default: 8s)")
    p.add_argument("--processes", type=int, default=1,
                   help="locust worker processes (locust --processes; -1: one per core)")
    p.add_argument("--wait", default=None,
                   help='seconds a user waits between requests: "MIN,MAX" or one number (default 0.05,0.25)')
    p.add_argument("--stop-timeout", type=int, default=30, help="seconds users get to finish a request")
    p.add_argument("--trace", default=None, help="JSONL trace whose prompts users send (default: smoke)")
    p.add_argument("--locustfile", default=str(LOCUSTFILE))
    p.add_argument("--out", default=None, help="report folder (default: reports/load-<model>-<time>)")
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--scrape-interval", type=float, default=0.5,
                   help="seconds between scrapes of the server's /metrics (0: only once at the end)")
    p.add_argument("--server-arg", action="append", default=[], dest="server_args",
                   help="argument for `python -m engine.serve` (repeatable): --server-arg=--max-num-seqs=8")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    if args.users < 1 or args.spawn_rate <= 0 or args.stop_timeout < 0:
        parser.error("--users must be >= 1, --spawn-rate > 0 and --stop-timeout >= 0")
    if args.scrape_interval < 0:
        parser.error("--scrape-interval must be >= 0")
    if args.processes == 0 or args.processes < -1:
        parser.error("--processes must be >= 1, or -1 for one per core")
    if args.wait is not None:
        try:
            parts = [float(x) for x in args.wait.split(",")]
        except ValueError:
            parts = []
        if len(parts) not in (1, 2) or min(parts) < 0:
            parser.error(f"--wait {args.wait!r}: give MIN,MAX or one number of seconds >= 0")
    try:
        parse_duration_s(args.run_time)
    except ValueError as e:
        parser.error(str(e))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or REPO_ROOT / "reports" / f"load-{Path(args.model).name}-{stamp}")
    if (out / "summary.parquet").exists():
        parser.error(f"{out} already holds a report; pick another --out")
    return out


def _run(args: argparse.Namespace, out: Path) -> tuple[int, dict[str, float], Any]:
    """Server (unless --host) and locust; returns locust's exit status, the server metrics at
    the end and the background scraper (epoch-second times) or None."""
    with ExitStack() as stack:
        url = args.host.rstrip("/").removesuffix("/v1") if args.host else None
        proc = None
        if url is None:
            port = free_port()
            server = start_server(args.model, port, args.server_args, out / "server.log")
            proc = stack.enter_context(running(server))
            url = f"http://{LOOPBACK}:{port}"
        wait_healthy(url, proc, args.startup_timeout)
        scraper = None
        if args.scrape_interval > 0:
            from harness.scrape import MetricsScraper

            scraper = stack.enter_context(MetricsScraper(url, 0.0, args.scrape_interval, clock=time.time))
        rc = run_locust(args, url, out, args.served_model)
        return rc, scrape_metrics(url), scraper  # the stack stops the scraper, then the server


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = _check_args(parser, args)
    out.mkdir(parents=True, exist_ok=True)
    with sigterm_as_exit():
        locust_rc, server_metrics, scraper = _run(args, out)
    rows = read_rows(out / "rows.jsonl")
    records = rows_to_records(rows)
    if not records:
        print(f"no request completed; see {out}/locust.out, locust.log and server.log", file=sys.stderr)
        return 1
    names = ("model", "host", "users", "spawn_rate", "run_time", "server_args", "trace", "processes", "wait")
    config = {"kind": "loadtest", "backend": "locust", **{n: getattr(args, n) for n in names},
              "locust_exit_code": locust_rc, "server_metrics": server_metrics,
              "server_scrape": scraper.status() if scraper is not None else None}
    frame = None
    if scraper is not None:  # epoch seconds -> the records' clock (first request = 0)
        frame = scraper.frame()
        frame["t_s"] -= min(r["scheduled"] for r in rows)
    summary = write_report(out, records, [], [], config, server_metrics=frame).summary_row()
    print_summary(summary, out)
    if summary["num_error"] > 0 or locust_rc != 0:
        errors = [r.error for r in records if r.status == "error"][:3]
        print(f"FAILED: {summary['num_error']} request errors, e.g. {errors}; locust exit code {locust_rc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
