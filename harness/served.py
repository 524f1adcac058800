"""Served vs in-process: the same workload over HTTP and through the engine in this process.

    python -m harness.served --model tiny --workload bench --param num_seqs=32 \
        [--engine-arg max_num_seqs=32] [--server-arg=--api-server-count=2] \
        [--client openai|locust] [--processes P] --out reports/served-tiny

1. start `python -m engine.serve` (the model, the --engine-arg settings as its flags, then every
   --server-arg as is) on a free 127.0.0.1 port and wait for /health;
2. replay the workload against it: ``--client openai`` (default) with harness/run.py's
   ``run_once`` and the openai backend (``num_workers=--processes`` client processes), the
   exact requests of the workload; ``--client locust`` with harness.loadtest's locust run
   (``--processes`` locust workers), ``--max-concurrency`` users (default: one per request)
   cycling through the workload's prompts without waiting, for ``--run-time``;
3. stop the server with SIGTERM and check that it exited cleanly; read its stream interval from
   /metrics if it reports one (a metric whose name holds "stream_interval");
4. run the same requests in this process with the ``engine`` backend and the same engine args;
5. write both reports under --out (DIR/<workload>-served, DIR/<workload>-engine, and
   DIR/sweep.parquet, so ``python -m harness compare DIR`` sets them side by side) and
   DIR/served.json: both output throughputs, their ratio (served / in-process), the client and
   its process count, the stream interval. Prints the ratio.

Put engine settings in --engine-arg (both sides get them); --server-arg is for the server alone
(API processes, stream interval, ...). Exit status: 0 when every request succeeded on both
sides and the server stopped cleanly, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

from harness.loadtest import (
    LOCUSTFILE,
    LOOPBACK,
    free_port,
    print_summary,
    read_rows,
    rows_to_records,
    run_locust,
    scrape_metrics,
    sigterm_as_exit,
    start_server,
    stop_process,
    wait_healthy,
)
from harness.report import append_sweep_summary, write_report
from harness.run import RunSpec, WorkloadSpec, build_workload, run_once

SERVED_FILE = "served.json"
CLIENTS = ("openai", "locust")


# ---- arguments ------------------------------------------------------------------------------
def parse_pairs(pairs: list[str], flag: str) -> dict[str, Any]:
    from engine.config import parse_value

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} expects KEY=VALUE, got {pair!r}")
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out


def server_flags(engine_args: dict[str, Any]) -> list[str]:
    """EngineConfig fields as `python -m engine.serve` flags (max_num_seqs=8 -> --max-num-seqs 8;
    True -> the bare flag; enable_prefix_caching=False -> --no-prefix-caching)."""
    flags: list[str] = []
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if key == "enable_prefix_caching":
            flags += [] if value else ["--no-prefix-caching"]
        elif value is True:
            flags.append(flag)
        elif value is not False:
            flags += [flag, str(value)]
    return flags


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="tiny", help="preset or checkpoint dir (default: tiny)")
    p.add_argument("--workload", default="bench", help="generator name (default: bench)")
    p.add_argument("--param", action="append", default=[], metavar="K=V", help="generator parameter, repeatable")
    p.add_argument("--trace", default=None, help="a trace file instead of a generator")
    p.add_argument("--rate", type=float, default=None, help="re-time arrivals to this rate (req/s)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight (default: no cap)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="K=V",
                   help="EngineConfig field for both sides, repeatable")
    p.add_argument("--server-arg", action="append", default=[], dest="server_args",
                   help="argument for `python -m engine.serve` only (repeatable): --server-arg=--api-server-count=2")
    p.add_argument("--client", choices=CLIENTS, default="openai")
    p.add_argument("--processes", type=int, default=1, help="client processes (default 1)")
    p.add_argument("--run-time", default="30s", help="locust client: run time (default 30s)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", required=True, help="report folder")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="python -m harness.served",
                                                 description=__doc__.split("\n")[0]))


# ---- the served side ------------------------------------------------------------------------
def _stream_interval(metrics: dict[str, float], server_args: list[str]) -> float | None:
    for name, value in metrics.items():
        if "stream_interval" in name:
            return value
    for i, arg in enumerate(server_args):  # else what we asked the server for, if we did
        if arg.startswith("--stream-interval"):
            value = arg.partition("=")[2] or (server_args[i + 1] if i + 1 < len(server_args) else "")
            try:
                return float(value)
            except ValueError:
                return None
    return None


def _served_openai(args: argparse.Namespace, url: str, workload: WorkloadSpec, requests: list,
                   engine_args: dict[str, Any], run_dir: Path, labels: dict[str, Any]) -> dict[str, Any]:
    spec = RunSpec(backend="openai", workload=workload, model=args.model, max_concurrency=args.max_concurrency,
                   engine_args=engine_args,
                   backend_args={"base_url": url, "num_workers": args.processes}, telemetry=True)
    return run_once(spec, run_dir, labels, requests=requests)


def _served_locust(args: argparse.Namespace, url: str, requests: list, run_dir: Path,
                   labels: dict[str, Any]) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    trace = run_dir / "trace.jsonl"
    trace.write_text("".join(json.dumps(r.to_row()) + "\n" for r in requests))
    users = args.max_concurrency or len(requests)
    run_args = argparse.Namespace(locustfile=str(LOCUSTFILE), users=users, spawn_rate=users,
                                  run_time=args.run_time, stop_timeout=60, processes=args.processes,
                                  wait="0", trace=str(trace))
    rc = run_locust(run_args, url, run_dir, None)
    records = rows_to_records(read_rows(run_dir / "rows.jsonl"))
    if not records:
        raise RuntimeError(f"locust completed no request (exit {rc}); see {run_dir}/locust.out")
    config = {"kind": "served", "backend": "locust", "model": args.model, "labels": labels,
              "users": users, "processes": args.processes, "run_time": args.run_time, "locust_exit_code": rc}
    return write_report(run_dir, records, [], [], config).summary_row()


def _warm_up(url: str, model: str) -> None:
    """A few short requests first, as the in-process backend warms its engine: the first steps'
    lazy initialisation (and compilation on a GPU) stays out of the measured run. Their prompts
    share no block with a generated workload's random ids, so no prefix-cache hit leaks in."""
    from harness.backends.base import ReplayOptions
    from harness.backends.openai import OpenAIBackend
    from workloads.trace import TraceRequest

    warm = [TraceRequest(arrival_s=0.0, max_tokens=8, prompt_token_ids=list(range(1, 65)), ignore_eos=True,
                         request_id=f"warm-up-{i}") for i in range(4)]
    result = OpenAIBackend(url, model).run(warm, time.perf_counter(), ReplayOptions(timed=False, progress=False))
    errors = [r.error for r in result.requests if r.status != "ok"]
    if errors:
        raise RuntimeError(f"the server failed its warm-up requests: {errors[0]}")


def run_served(args: argparse.Namespace, workload: WorkloadSpec, requests: list,
               engine_args: dict[str, Any], out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The served run's summary and facts about the server (exit code, stream interval)."""
    port = free_port()
    server_args = [*server_flags(engine_args), *args.server_args]
    proc = start_server(args.model, port, server_args, out / "server.log")
    url = f"http://{LOOPBACK}:{port}"
    run_dir = out / f"{workload.name}-served"
    labels = _labels(workload, f"served-{args.client}", run_dir.name, args.model)
    try:
        wait_healthy(url, proc, args.startup_timeout)
        _warm_up(url, args.model)
        if args.client == "openai":
            summary = _served_openai(args, url, workload, requests, engine_args, run_dir, labels)
        else:
            summary = _served_locust(args, url, requests, run_dir, labels)
        metrics = scrape_metrics(url)
    finally:
        stop_process(proc, timeout_s=60)
    facts = {"server_exit_code": proc.returncode, "server_args": server_args,
             "stream_interval": _stream_interval(metrics, server_args), "url": url}
    append_sweep_summary(out, {**labels, **summary})
    return summary, facts


# ---- the in-process side and the result ------------------------------------------------------
def _labels(workload: WorkloadSpec, backend: str, run_dir: str, model: str) -> dict[str, Any]:
    return {"workload": workload.name, "backend": backend, "point": "served-vs-in-process",
            "rate": math.inf if workload.rate is None else workload.rate, "model": model, "run_dir": run_dir}


def run_in_process(args: argparse.Namespace, workload: WorkloadSpec, requests: list,
                   engine_args: dict[str, Any], out: Path) -> dict[str, Any]:
    run_dir = out / f"{workload.name}-engine"
    labels = _labels(workload, "engine", run_dir.name, args.model)
    spec = RunSpec(backend="engine", workload=workload, model=args.model, max_concurrency=args.max_concurrency,
                   engine_args=engine_args, telemetry=True)
    summary = run_once(spec, run_dir, labels, requests=requests)
    append_sweep_summary(out, {**labels, **summary})
    return summary


def served_result(args: argparse.Namespace, served: dict[str, Any], local: dict[str, Any],
                  facts: dict[str, Any], engine_args: dict[str, Any]) -> dict[str, Any]:
    s, e = served["output_throughput"], local["output_throughput"]
    return {"model": args.model, "workload": args.workload if args.trace is None else args.trace,
            "client": args.client, "client_processes": args.processes,
            "served_output_tok_s": s, "in_process_output_tok_s": e,
            "ratio": s / e if s is not None and e else None,
            "served_ok": served["num_ok"], "served_requests": served["num_requests"],
            "in_process_ok": local["num_ok"], "in_process_requests": local["num_requests"],
            "stream_interval": facts["stream_interval"], "server_exit_code": facts["server_exit_code"],
            "server_args": facts["server_args"], "engine_args": engine_args,
            "max_concurrency": args.max_concurrency}


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[WorkloadSpec, dict[str, Any]]:
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be >= 1")
    if (Path(args.out) / SERVED_FILE).exists():
        parser.error(f"{args.out} already holds a served run; pick another --out")
    try:
        params = parse_pairs(args.param, "--param")
        engine_args = parse_pairs(args.engine_arg, "--engine-arg")
        if args.trace is not None and params:
            raise ValueError("--param applies to generated workloads, not to --trace")
        workload = WorkloadSpec(kind=None if args.trace else args.workload, params=params, trace=args.trace,
                                rate=args.rate)
        from engine.config import EngineConfig

        EngineConfig(model=args.model, **engine_args)  # a bad field fails now, before any server
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    return workload, engine_args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    workload, engine_args = _check(parser, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    requests = build_workload(workload, args.model)
    with sigterm_as_exit():
        try:
            served, facts = run_served(args, workload, requests, engine_args, out)
        except (RuntimeError, TimeoutError) as e:  # the server did not start or serve
            log = (out / "server.log").read_text(errors="replace").strip().splitlines()[-5:]
            print(f"error: {e}; the end of {out}/server.log:", *log, sep="\n  ", file=sys.stderr)
            return 1
        local = run_in_process(args, workload, requests, engine_args, out)
    result = served_result(args, served, local, facts, engine_args)
    (out / SERVED_FILE).write_text(json.dumps(result, indent=2) + "\n")
    print_summary(served, out / f"{workload.name}-served")
    print_summary(local, out / f"{workload.name}-engine")
    ratio = result["ratio"]
    print(f"served / in-process output throughput: {'n/a' if ratio is None else f'{ratio:.3f}'} "
          f"({_tok(result['served_output_tok_s'])} vs {_tok(result['in_process_output_tok_s'])} tok/s; "
          f"client {args.client} x{args.processes})")
    clean_stop = facts["server_exit_code"] in (0, -signal.SIGTERM)
    if not clean_stop:
        print(f"the server exited with status {facts['server_exit_code']} after SIGTERM; see {out}/server.log",
              file=sys.stderr)
    failed = served["num_error"] or local["num_error"] or served["num_ok"] == 0
    return 0 if clean_stop and not failed else 1


def _tok(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
