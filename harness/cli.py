"""Command line: parse -> validate into one spec object -> call one entry point.

    python -m harness run --backend engine --model tiny --workload smoke --out reports/smoke
    python -m harness run --backend static --trace workloads/traces/bench_tiny.jsonl --rate 4 \\
        --engine-arg num_kv_blocks=64 --slo-ttft-ms 500 --out reports/static-r4
    python -m harness sweep --backends engine,static --workload random --param num_prompts=32 \\
        --profile sweep --fractions 0.3,0.6,0.9 --out reports/sweep-random
    python -m harness compare reports/a reports/b [--html out.html]
    python -m harness gate --baseline reports/baselines/cpu_tiny.json --current reports/sweep-random
    python -m harness gate --write-baseline reports/baselines/cpu_tiny.json --current reports/sweep
    python -m harness bench            # the default job (nox -s bench)

Bad input (an unknown backend, a malformed trace, a bad --param) prints one `error:` line and
exits with status 2; a failed gate exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from harness.commands import COMMANDS
from harness.profiles import PROFILES
from harness.run import BACKENDS, BackendConfigError
from workloads.generators import GENERATORS


def positive_float(text: str) -> float:
    value = float(text)  # argparse turns ValueError into "invalid positive_float value"
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


# ---- the parser ------------------------------------------------------------------------
def _add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--workload", choices=list(GENERATORS), help="a generator (default: smoke)")
    src.add_argument("--trace", help="a .jsonl or .parquet trace file")
    g.add_argument("--param", action="append", default=[], metavar="K=V", help="generator parameter, repeatable")
    g.add_argument("--rate", type=positive_float, help="requests/s (inf = offline); default: the "
                   "generator's own, or the trace's arrival_s")
    g.add_argument("--burstiness", type=positive_float, default=1.0, help="gamma shape; 1.0 = Poisson")
    g.add_argument("--seed", type=int, default=0, help="seed of re-timed trace arrivals (a generator "
                   "takes --param seed=N)")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backend and measurement")
    g.add_argument("--model", default="tiny", help="preset, checkpoint dir, or served model name (openai)")
    g.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    g.add_argument("--engine-arg", action="append", default=[], metavar="K=V", help="EngineConfig field, repeatable")
    g.add_argument("--backend-arg", action="append", default=[], metavar="K=V",
                   help="backend option, e.g. batch_size=32 (hf), base_url=http://... (openai)")
    for name in ("ttft", "tpot", "e2el"):
        g.add_argument(f"--slo-{name}-ms", type=positive_float, help=f"{name.upper()} SLO for goodput")
    g.add_argument("--no-telemetry", action="store_true", help="do not sample NVML")
    g.add_argument("--bandwidth-gbps", default="auto", help="memory bandwidth for the roofline figure: "
                   "GB/s, 'auto' (measured on CUDA, none on CPU) or 'off'")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    g.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m harness", description="Replay LLM workloads, write Parquet "
                                 "reports, compare and gate them.")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="replay one workload against one backend")
    run.add_argument("--backend", default="engine", choices=list(BACKENDS))
    _add_workload_args(run)
    _add_engine_args(run)
    run.add_argument("--out", help="report folder (default: reports/<workload>-<backend>-<time>)")
    sweep = sub.add_parser("sweep", help="several backends x the rate points of a profile")
    sweep.add_argument("--backends", default="engine,static", help="comma-separated, the first steers the profile")
    sweep.add_argument("--profile", default="sweep", choices=list(PROFILES))
    sweep.add_argument("--rates", help="fixed profile: comma-separated requests/s")
    sweep.add_argument("--fractions", help="sweep profile: fractions of the offline rate, e.g. 0.3,0.6,0.9")
    _add_workload_args(sweep)
    _add_engine_args(sweep)
    sweep.add_argument("--out", help="sweep folder (default: reports/sweep-<time>)")
    cmp = sub.add_parser("compare", help="side-by-side table and an HTML page of plots")
    cmp.add_argument("reports", nargs="+", help="report folders or sweep folders")
    cmp.add_argument("--html", help="where to write the page (default: next to the reports)")
    gate = sub.add_parser("gate", help="fail when a gated ratio regresses past the threshold")
    which = gate.add_mutually_exclusive_group(required=True)
    which.add_argument("--baseline", help="baseline JSON (or a report/sweep folder)")
    which.add_argument("--write-baseline", metavar="OUT_JSON", help="write a baseline from --current")
    gate.add_argument("--current", required=True, action="append",
                      help="a sweep folder or a report folder; --write-baseline: repeat it to take medians")
    gate.add_argument("--threshold", type=float, help="allowed relative regression (default: the baseline's, else 0.1)")
    gate.add_argument("--reference", default="engine", help="--write-baseline: the numerator backend")
    gate.add_argument("--metric", action="append", default=[], metavar="NAME:higher|lower",
                      help="--write-baseline: a gated figure (default: throughput, KV waste, p50 E2EL)")
    gate.add_argument("--absolute", action="append", default=[], metavar="NAME:higher|lower",
                      help="--write-baseline: a figure of the reference backend itself, not a ratio "
                           "(e.g. roofline_efficiency:higher)")
    bench = sub.add_parser("bench", help="the default job: static vs continuous (and HF), offline and timed")
    bench.add_argument("--out-root", default="reports")
    bench.add_argument("--model", help="default: tiny on CPU, qwen3-0.6b on CUDA")
    bench.add_argument("--engine-arg", action="append", default=[], metavar="K=V")
    bench.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    bench.add_argument("--ci", action="store_true", help="only the small offline sweep the CI baseline gates")
    bench.add_argument("--gpu-gate", action="store_true",
                       help="only the GPU gate sweep (bench workload offline, qwen3-0.6b), gated against "
                            "reports/baselines/h100_qwen3.json unless --gate names another baseline")
    bench.add_argument("--gate", metavar="BASELINE_JSON", help="after the run, gate it; exit 1 on a regression")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPU)")
    bench.add_argument("--no-telemetry", action="store_true")
    bench.add_argument("--no-progress", action="store_true")
    fl = sub.add_parser("flagship", help="static vs continuous on a GPU over load, prefix caching, HF "
                        "(harness/studies/flagship.py); --publish / --table for the committed copy")
    fl.add_argument("--out-root", default="reports")
    fl.add_argument("--no-hf", action="store_true", help="skip the HF transformers subset")
    fl.add_argument("--no-telemetry", action="store_true")
    fl.add_argument("--no-progress", action="store_true")
    fl.add_argument("--publish", metavar="RUN_DIR", help="copy a finished run's small parts to --dest")
    fl.add_argument("--dest", default="reports/flagship")
    fl.add_argument("--table", metavar="SWEEP_PARQUET", help="print the headline table of a sweep.parquet")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console

    parser = build_parser()
    ns = parser.parse_args(argv)  # shape errors: usage + error line, exit 2
    try:
        command = COMMANDS[ns.command](ns)  # validation: UsageError, TraceError, the specs' checks
    except ValueError as e:
        return _fail(parser, ns, e)
    try:
        return command.execute(Console())
    except BackendConfigError as e:  # a backend refused its options (other errors are bugs: traceback)
        return _fail(parser, ns, e)


def _fail(parser: argparse.ArgumentParser, ns: argparse.Namespace, error: Exception) -> int:
    print(f"{parser.prog} {ns.command}: error: {error}", file=sys.stderr)
    return 2
