"""`llmbench`: one command line with subcommands, as `vllm serve` / `vllm bench`.

    llmbench serve --model tiny --port 8000 [--max-num-seqs 64 ...]    # engine/serve/cli.py
    llmbench run --backend engine --model tiny --workload smoke --out reports/smoke
    llmbench run --backend static --trace workloads/traces/bench_tiny.jsonl --rate 4 \\
        --num-kv-blocks 64 --slo-ttft-ms 500 --out reports/static-r4
    llmbench run --dataset sharegpt --dataset-path sg.json --param num_prompts=200 \\
        --param multi_turn=true --dataset-tokenizer tiny
    llmbench sweep --backends engine,static --workload random --param num_prompts=32 \\
        --profile sweep --fractions 0.3,0.6,0.9 --out reports/sweep-random
    llmbench compare reports/a reports/b [--html out.html]
    llmbench gate --baseline reports/baselines/cpu_tiny.json --current reports/sweep-random
    llmbench gate --write-baseline reports/baselines/cpu_tiny.json --current reports/sweep
    llmbench bench            # the default job (nox -s bench)
    llmbench flagship --model llama-3-8b --only bench,random --out reports/fl   # pieces append to one folder
    llmbench studies throughput|tp-scaling|step-profile|latency|ttft|kv-agreement ...  # harness/studies/
    llmbench kernels bench-decode|bench-gemv|bench-sample|bench-allreduce|profile-persistent|compile-check ...    # harness/kernels/
    llmbench tokenizer save --model tiny --out DIR     # for GuideLLM's --processor and the like

run, sweep, bench, serve and the throughput study take every EngineConfig field as a flag
(engine/config_args.py); `--engine-arg KEY=VALUE` is the same. `python -m harness ...` is
`llmbench ...`. serve, the studies and the kernel benchmarks keep their own parser and
main(argv): they are mounted by module name and imported only when named, so
`llmbench serve --help` loads no harness code.

Bad input (an unknown backend, a malformed trace, a bad --param) prints one `error:` line and
exits with status 2; a failed gate exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from engine.config_args import add_engine_args

PROG = "llmbench"
# Subcommands with a parser and main(argv) of their own: name -> (module, one-line help).
MOUNTED: dict[str, tuple[str, str]] = {
    "serve": ("engine.serve.cli", "OpenAI-compatible HTTP server for the engine"),
    "served": ("harness.served", "the same workload over HTTP and in process, and their ratio"),
    "load": ("harness.loadtest", "locust against the server (started here unless --host), a report"),
    "mock-server": ("harness.mock_server", "an endpoint streaming fixed tokens (no model)"),
    "ceiling": ("harness.ceiling", "a load generator's ceiling in tok/s against the mock"),
}
# Groups of mounted subcommands (`llmbench studies throughput ...`): name -> (help, members).
GROUPS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "studies": ("one-off measurements (harness/studies/)", {
        "throughput": ("harness.studies.throughput", "offline throughput (bench or prefill-heavy) per attention backend, vs HF generate"),
        "tp-scaling": ("harness.studies.tp_scaling", "TP=N / TP=1 throughput in fresh processes"),
        "step-profile": ("harness.studies.step_profile", "where a decode step's time goes (GPU)"),
        "latency": ("harness.studies.latency", "TPOT over batch x context against its floor, low-load TTFT"),
        "ttft": ("harness.studies.ttft", "time to first token at low load, prefill graphs on and off"),
        "detokenize-cost": ("harness.studies.detokenize_cost", "LLM.generate with and without detokenization"),
        "kv-agreement": ("harness.studies.kv_agreement", "greedy tokens of an fp8 KV cache vs the model-dtype cache"),
    }),
    "kernels": ("kernel microbenchmarks and compile checks (harness/kernels/)", {
        "bench-decode": ("harness.kernels.bench_decode", "split-K decode and unified attention (GPU)"),
        "bench-gemv": ("harness.kernels.bench_gemv", "small-batch fused projections vs cuBLAS (GPU)"),
        "bench-sample": ("harness.kernels.bench_sample", "the one-pass sampling kernel by vocabulary chunk (GPU)"),
        "bench-allreduce": ("harness.kernels.bench_allreduce", "the TP all-reduce paths (2 GPUs)"),
        "profile-persistent": ("harness.kernels.profile_persistent",
                               "the persistent decode kernel's time per step and plan (GPU)"),
        "compile-check": ("harness.kernels.compile_check", "compile the Triton kernels for a GPU, without one"),
    }),
    "tokenizer": ("the served tokenizer, for other tools", {
        "save": ("harness.tokenizer_save", "write a model's tokenizer to a directory (presets too)"),
    }),
}
# run/sweep/bench name the model with their own --model (every backend takes it), and --seed
# re-times a trace there, so the engine's seed is --engine-seed.
HARNESS_ENGINE_FLAGS = {"skip": ("model",), "spellings": {"seed": ("--engine-seed",)}}


def positive_float(text: str) -> float:
    value = float(text)  # argparse turns ValueError into "invalid positive_float value"
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


# ---- the parser ------------------------------------------------------------------------
def _add_workload_args(p: argparse.ArgumentParser) -> None:
    from workloads.datasets import DATASETS
    from workloads.generators import GENERATORS

    g = p.add_argument_group("workload")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--workload", choices=list(GENERATORS), help="a generator (default: smoke)")
    src.add_argument("--trace", help="a .jsonl or .parquet trace file")
    src.add_argument("--dataset", choices=list(DATASETS), help="a dataset source (workloads/datasets.py), "
                     "sized with the model's tokenizer")
    g.add_argument("--dataset-path", help="--dataset: the local file (hf: a file or glob)")
    g.add_argument("--dataset-tokenizer", help="--dataset: a tokenizer/checkpoint dir or a preset name "
                   "(default: the engine's --tokenizer, else the --model's)")
    g.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="generator or dataset parameter, repeatable")
    g.add_argument("--rate", type=positive_float, help="requests/s (inf = offline); default: the "
                   "generator's own, or the trace's arrival_s")
    g.add_argument("--burstiness", type=positive_float, default=1.0, help="gamma shape; 1.0 = Poisson")
    g.add_argument("--seed", type=int, default=0, help="seed of re-timed trace arrivals (a generator "
                   "takes --param seed=N)")


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backend and measurement")
    g.add_argument("--model", default="tiny", help="preset, checkpoint dir, or served model name (openai)")
    g.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    g.add_argument("--backend-arg", action="append", default=[], metavar="K=V",
                   help="backend option, e.g. batch_size=32 (hf), base_url=http://... (openai)")
    for name in ("ttft", "tpot", "e2el"):
        g.add_argument(f"--slo-{name}-ms", type=positive_float, help=f"{name.upper()} SLO for goodput")
    g.add_argument("--no-telemetry", action="store_true", help="do not sample NVML")
    g.add_argument("--warmup", metavar="N|Ts", help="leave the first N requests (or those sent in the first "
                   "T seconds, e.g. 5s) out of the summary; flagged window=warmup in requests.parquet")
    g.add_argument("--cooldown", metavar="N|Ts", help="leave the last N requests to finish (or those "
                   "finishing in the last T seconds) out of the summary; flagged window=cooldown")
    g.add_argument("--duration", metavar="SECONDS", help="time-bounded run: send nothing after this "
                   "(e.g. 60, 60s, 2m); unsent requests are recorded with status not_sent")
    g.add_argument("--percentiles", default="50,90,95,99", help="latency percentiles of the summary, "
                   "e.g. 50,90,95,99,99.9 (columns p99.9_ttft_ms ...)")
    g.add_argument("--scrape-interval", default="0.5", metavar="SECONDS",
                   help="openai backend: scrape the server's /metrics this often into "
                        "server_metrics.parquet ('off' to disable; default 0.5)")
    g.add_argument("--bandwidth-gbps", default="auto", help="memory bandwidth for the roofline figure: "
                   "GB/s, 'auto' (measured on CUDA, none on CPU) or 'off'")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    g.add_argument("--no-progress", action="store_true")
    _add_engine_flags(p)


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (EngineConfig fields, for the engine and static backends)")
    add_engine_args(g, **HARNESS_ENGINE_FLAGS)


def build_parser() -> argparse.ArgumentParser:
    """The whole tree; the mounted subcommands show by name only (their parsers are their own)."""
    from harness.profiles import PROFILES
    from harness.run import BACKENDS

    ap = argparse.ArgumentParser(prog=PROG, description="Serve the engine, replay LLM workloads against it "
                                 "and other backends, write Parquet reports, compare and gate them.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, text) in MOUNTED.items():
        sub.add_parser(name, help=text, add_help=False)
    run = sub.add_parser("run", help="replay one workload against one backend")
    run.add_argument("--backend", default="engine", choices=list(BACKENDS))
    _add_workload_args(run)
    _add_backend_args(run)
    run.add_argument("--out", help="report folder (default: reports/<workload>-<backend>-<time>)")
    sweep = sub.add_parser("sweep", help="several backends x the rate points of a profile")
    sweep.add_argument("--backends", default="engine,static", help="comma-separated, the first steers the profile")
    sweep.add_argument("--profile", default="sweep", choices=list(PROFILES))
    sweep.add_argument("--rates", help="fixed profile: comma-separated requests/s")
    sweep.add_argument("--fractions", help="sweep profile: fractions of the offline rate, e.g. 0.3,0.6,0.9")
    _add_workload_args(sweep)
    _add_backend_args(sweep)
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
    gate.add_argument("--ratios-only", action="store_true",
                      help="gate only the ratios (e.g. a baseline from another device: its absolute figures "
                           "are refused otherwise)")
    gate.add_argument("--metric", action="append", default=[], metavar="NAME:higher|lower",
                      help="--write-baseline: a gated figure (default: throughput, KV waste, p50 E2EL)")
    gate.add_argument("--absolute", action="append", default=[], metavar="NAME:higher|lower",
                      help="--write-baseline: a figure of the reference backend itself, not a ratio "
                           "(e.g. roofline_efficiency:higher)")
    bench = sub.add_parser("bench", help="the default job: static vs continuous (and HF), offline and timed")
    bench.add_argument("--out-root", default="reports")
    bench.add_argument("--model", help="default: tiny on CPU, qwen3-0.6b on CUDA")
    bench.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    bench.add_argument("--ci", action="store_true", help="only the small offline sweep the CI baseline gates")
    bench.add_argument("--gpu-gate", action="store_true",
                       help="only the GPU gate sweep (bench workload offline, qwen3-0.6b), gated against "
                            "this GPU's reports/baselines/<device-slug>_qwen3.json (e.g. h200_qwen3.json) "
                            "unless --gate names another baseline")
    bench.add_argument("--gate", metavar="BASELINE_JSON", help="after the run, gate it; exit 1 on a regression")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPU)")
    bench.add_argument("--no-telemetry", action="store_true")
    bench.add_argument("--no-progress", action="store_true")
    _add_engine_flags(bench)
    fl = sub.add_parser("flagship", help="static vs continuous on a GPU over load, served beside in-process, "
                        "per model, in pieces (harness/studies/flagship.py); --publish / --table")
    fl.add_argument("--model", default="qwen3-0.6b", help="a model with a flagship plan: qwen3-0.6b, "
                    "llama-3-8b, tiny (CPU dry run) (harness/studies/flagship_plans.py)")
    fl.add_argument("--only", metavar="SWEEPS", help="comma-separated sweep labels (default: all): bench, random, "
                    "random-bursty, prefix, prefix-nocache, sharegpt-like, hf, served-bench, served-random")
    fl.add_argument("--out", metavar="DIR", help="the run folder, created or appended to (default: "
                    "OUT_ROOT/flagship-<model>-<time>)")
    fl.add_argument("--redo", action="store_true", help="run sweeps already in --out again (their rows replaced)")
    fl.add_argument("--estimate", action="store_true", help="print each sweep's estimated seconds on an H200 and "
                    "the plan's per-piece commands; run nothing")
    fl.add_argument("--kv-blocks", type=int, help="override the plan's KV blocks (every engine backend)")
    fl.add_argument("--out-root", default="reports")
    fl.add_argument("--no-hf", action="store_true", help="leave out the hf sweep (when --only is not given)")
    fl.add_argument("--no-telemetry", action="store_true")
    fl.add_argument("--no-progress", action="store_true")
    fl.add_argument("--publish", metavar="RUN_DIR", help="copy a finished run's small parts to --dest")
    fl.add_argument("--dest", help="where --publish writes (default: reports/flagship/<the run's model>)")
    fl.add_argument("--table", metavar="SWEEP_PARQUET", help="print the headline table of a sweep.parquet")
    for name, (text, _) in GROUPS.items():
        sub.add_parser(name, help=text, add_help=False)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MOUNTED:
        return _run_mounted(MOUNTED[argv[0]][0], argv[1:])
    if argv and argv[0] in GROUPS:
        return _run_group(argv[0], argv[1:])
    from rich.console import Console

    from harness.commands import COMMANDS
    from harness.run import BackendConfigError

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


def _run_group(group: str, argv: list[str]) -> int:
    """`llmbench studies NAME ...`: NAME's own main; anything else gets the group's usage."""
    text, members = GROUPS[group]
    if argv and argv[0] in members:
        return _run_mounted(members[argv[0]][0], argv[1:])
    parser = argparse.ArgumentParser(prog=f"{PROG} {group}", description=text)
    sub = parser.add_subparsers(dest="name", required=True, metavar="NAME")
    for name, (_, help_text) in members.items():
        sub.add_parser(name, help=help_text, add_help=False)
    parser.parse_args(argv)  # prints the help or the usage error, and exits
    return 2


def _run_mounted(module: str, argv: list[str]) -> int:
    """Import the module only now and hand it the rest of the line. Its parser names itself
    (`llmbench serve`); its main(argv) returns the exit status (None, or a result: 0)."""
    status = importlib.import_module(module).main(argv)
    return status if isinstance(status, int) else 0


def _fail(parser: argparse.ArgumentParser, ns: argparse.Namespace, error: Exception) -> int:
    print(f"{parser.prog} {ns.command}: error: {error}", file=sys.stderr)
    return 2
