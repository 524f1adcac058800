"""Served vs in-process: the same workload over HTTP and through the engine in this process.

    python -m harness.served --model tiny --workload bench --param num_seqs=32 \
        [--engine-arg max_num_seqs=32] [--server-arg=--api-server-count=2] \
        [--client openai|locust] [--processes P] --out reports/served-tiny

1. start `python -m engine.serve` (the model, the --engine-arg settings as its flags, then every
   --server-arg as is) on a free 127.0.0.1 port and wait for /health;
2. replay the workload against it: ``--client openai`` (default) with harness/run.py's
   ``run_once`` and the openai backend (``num_workers=--processes`` client processes), the
   exact requests of the workload; ``--client locust`` with harness.loadtest's locust run
   (``--processes`` locust workers): by default one user per request, each sending its own
   request once (the same request set; the run ends with ``--run-time``, which must cover it),
   or with ``--max-concurrency`` that many users cycling through the prompts without waiting;
3. read how it served from its /v1/models card (stream interval, engine in its own process or
   not), stop the server with SIGTERM and check that it exited cleanly;
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
import dataclasses
import inspect
import json
import math
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

from engine.config_args import parse_pairs
from harness.backends.served import log_tail, served_model_card, server_flags, warm_up
from harness.loadtest import (
    LOCUSTFILE,
    LOOPBACK,
    free_port,
    print_summary,
    read_rows,
    rows_to_records,
    run_locust,
    sigterm_as_exit,
    start_server,
    stop_process,
    wait_healthy,
)
from harness.report import append_sweep_summary, write_report
from harness.run import RunSpec, build_workload, make_backend, run_once
from workloads.generators import GENERATORS
from workloads.spec import WorkloadSpec

SERVED_FILE = "served.json"
CLIENTS = ("openai", "locust")


# ---- arguments ------------------------------------------------------------------------------
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
    p.add_argument("--repeat", type=int, default=1,
                   help="runs on each side against one server / one engine (their medians are compared)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", required=True, help="report folder")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="llmbench served",
                                                 description=__doc__.split("\n")[0]))


# ---- the served side ------------------------------------------------------------------------
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
    # one user per request, each sending its own row once: the same request set as the other side
    # (with --max-concurrency, fewer users than requests: a closed loop over the rows instead)
    once = users == len(requests)
    run_args = argparse.Namespace(locustfile=str(LOCUSTFILE), users=users, spawn_rate=users,
                                  run_time=args.run_time, stop_timeout=60, processes=args.processes,
                                  wait="0", trace=str(trace), once=once)
    rc = run_locust(run_args, url, run_dir, None)
    records = rows_to_records(read_rows(run_dir / "rows.jsonl"))
    if not records:
        raise RuntimeError(f"locust completed no request (exit {rc}); see {run_dir}/locust.out")
    config = {"kind": "served", "backend": "locust", "model": args.model, "labels": labels,
              "users": users, "processes": args.processes, "run_time": args.run_time, "once": once,
              "locust_exit_code": rc}
    return write_report(run_dir, records, [], [], config).summary_row()


def _run_dir(out: Path, workload: WorkloadSpec, side: str, i: int, repeat: int) -> Path:
    return out / (f"{workload.name}-{side}" if repeat == 1 else f"{workload.name}-{side}-{i + 1}")


def request_sets(workload: WorkloadSpec, model: str, repeat: int) -> list[list]:
    """The requests of each repeat, the same on both sides. A generated workload gets a new seed
    per repeat (seed, seed + 1, ...), so no run hits the prefix blocks an earlier run left in
    the server's cache (the server's cache cannot be reset from here); a trace is replayed as
    is, and its later repeats may hit them, on both sides alike."""
    if workload.kind is None or "seed" not in inspect.signature(GENERATORS[workload.kind]).parameters:
        return [build_workload(workload, model)] * repeat
    base = workload.params.get("seed", 0)
    return [build_workload(dataclasses.replace(workload, params={**workload.params, "seed": base + i}), model)
            for i in range(repeat)]


def run_served(args: argparse.Namespace, workload: WorkloadSpec, request_sets: list[list],
               engine_args: dict[str, Any], out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The served runs' summaries (--repeat of them against one server) and facts about the
    server (exit code, stream interval)."""
    port = free_port()
    server_args = [*server_flags(args.engine_arg), *args.server_args]
    proc = start_server(args.model, port, server_args, out / "server.log")
    url = f"http://{LOOPBACK}:{port}"
    summaries = []
    try:
        wait_healthy(url, proc, args.startup_timeout)
        warm_up(url, args.model)
        for i in range(args.repeat):
            run_dir = _run_dir(out, workload, "served", i, args.repeat)
            labels = _labels(workload, f"served-{args.client}", run_dir.name, args.model)
            if args.client == "openai":
                summary = _served_openai(args, url, workload, request_sets[i], engine_args, run_dir, labels)
            else:
                summary = _served_locust(args, url, request_sets[i], run_dir, labels)
            append_sweep_summary(out, {**labels, **summary})
            summaries.append(summary)
        card = served_model_card(url)
    finally:
        stop_process(proc, timeout_s=60)
    facts = {"server_exit_code": proc.returncode, "server_args": server_args,
             "stream_interval": card.get("stream_interval"), "engine": card.get("engine"), "url": url}
    return summaries, facts


# ---- the in-process side and the result ------------------------------------------------------
def _labels(workload: WorkloadSpec, backend: str, run_dir: str, model: str) -> dict[str, Any]:
    return {"workload": workload.name, "backend": backend, "point": "served-vs-in-process",
            "rate": math.inf if workload.rate is None else workload.rate, "model": model, "run_dir": run_dir}


def run_in_process(args: argparse.Namespace, workload: WorkloadSpec, request_sets: list[list],
                   engine_args: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """--repeat runs through one in-process engine, as the served side runs against one server
    (no prefix-cache reset between them: the server gets none either)."""
    spec = RunSpec(backend="engine", workload=workload, model=args.model, max_concurrency=args.max_concurrency,
                   engine_args=engine_args, telemetry=True)
    backend = make_backend("engine", args.model, engine_args)
    summaries = []
    try:
        for i in range(args.repeat):
            run_dir = _run_dir(out, workload, "engine", i, args.repeat)
            labels = _labels(workload, "engine", run_dir.name, args.model)
            summary = run_once(spec, run_dir, labels, requests=request_sets[i], backend=backend)
            append_sweep_summary(out, {**labels, **summary})
            summaries.append(summary)
    finally:
        backend.close()
    return summaries


def _median(summaries: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in summaries if s[key] is not None]
    return statistics.median(values) if values else None


def served_result(args: argparse.Namespace, served: list[dict[str, Any]], local: list[dict[str, Any]],
                  facts: dict[str, Any], engine_args: dict[str, Any]) -> dict[str, Any]:
    """Medians over the repeats; the ratio is median served / median in-process."""
    s, e = _median(served, "output_throughput"), _median(local, "output_throughput")
    return {"model": args.model, "workload": args.workload if args.trace is None else args.trace,
            "client": args.client, "client_processes": args.processes, "repeat": args.repeat,
            "served_output_tok_s": s, "in_process_output_tok_s": e,
            "ratio": s / e if s is not None and e else None,
            "served_runs_tok_s": [r["output_throughput"] for r in served],
            "in_process_runs_tok_s": [r["output_throughput"] for r in local],
            "served_ok": sum(r["num_ok"] for r in served), "served_requests": sum(r["num_requests"] for r in served),
            "in_process_ok": sum(r["num_ok"] for r in local),
            "in_process_requests": sum(r["num_requests"] for r in local),
            "stream_interval": facts["stream_interval"], "server_engine": facts["engine"],
            "server_exit_code": facts["server_exit_code"],
            "server_args": facts["server_args"], "engine_args": engine_args,
            "max_concurrency": args.max_concurrency}


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[WorkloadSpec, dict[str, Any]]:
    if args.processes < 1 or args.repeat < 1:
        parser.error("--processes and --repeat must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be >= 1")
    if (Path(args.out) / SERVED_FILE).exists():
        parser.error(f"{args.out} already holds a served run; pick another --out")
    try:
        params = parse_pairs(args.param, "--param")
        engine_args = parse_pairs(args.engine_arg, "--engine-arg")  # the server parses the same pairs
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
    requests = request_sets(workload, args.model, args.repeat)
    with sigterm_as_exit():
        try:
            served, facts = run_served(args, workload, requests, engine_args, out)
        except (RuntimeError, TimeoutError) as e:  # the server did not start or serve
            print(f"error: {e}; the end of {out}/server.log:\n{log_tail(out / 'server.log', 5)}", file=sys.stderr)
            return 1
        local = run_in_process(args, workload, requests, engine_args, out)
    result = served_result(args, served, local, facts, engine_args)
    (out / SERVED_FILE).write_text(json.dumps(result, indent=2) + "\n")
    for i, (one_served, one_local) in enumerate(zip(served, local)):
        print_summary(one_served, _run_dir(out, workload, "served", i, args.repeat))
        print_summary(one_local, _run_dir(out, workload, "engine", i, args.repeat))
    ratio = result["ratio"]
    print(f"served / in-process output throughput: {'n/a' if ratio is None else f'{ratio:.3f}'} "
          f"({_tok(result['served_output_tok_s'])} vs {_tok(result['in_process_output_tok_s'])} tok/s; "
          f"client {args.client} x{args.processes})")
    clean_stop = facts["server_exit_code"] in (0, -signal.SIGTERM)
    if not clean_stop:
        print(f"the server exited with status {facts['server_exit_code']} after SIGTERM; see {out}/server.log",
              file=sys.stderr)
    failed = any(r["num_error"] for r in served + local) or result["served_ok"] == 0
    return 0 if clean_stop and not failed else 1


def _tok(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
