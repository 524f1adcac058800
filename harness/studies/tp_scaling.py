"""Tensor-parallel scaling: `harness.studies.throughput` at TP=1 and TP=N in alternating fresh processes, and
the throughput ratio of each pair.

    llmbench studies tp-scaling --model llama-3-8b --num-seqs 128 --max-output-len 512 --tp 2 --pairs 2

The first run of each configuration is run and reported but left out of the ratio: on 2xH200 the
first full run of a configuration in a fresh machine came out 3-6% slower than the next ones,
which agreed within 0.1% (reports/PERF.md, session 5). Extra `--engine-arg`s apply to the TP=N
runs only (A/B of a TP feature against the same TP=1 baseline); bench's other flags pass through.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.studies import write_result


def run_bench(bench_args: list[str], tp: int, engine_args: list[str], timeout_s: float) -> dict:
    """One `harness.studies.throughput` in a fresh process; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "harness.studies.throughput", *bench_args, "--json", str(out),
               "--engine-arg", f"tensor_parallel_size={tp}"]
        for arg in engine_args:
            cmd += ["--engine-arg", arg]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"harness.studies.throughput at TP={tp} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def describe(tp: int, r: dict) -> str:
    steps = r["steps"]
    decode, prefill = steps.get("decode", {}), steps.get("prefill", {})
    return (f"TP={tp}: {r['engine_tok_s']:>10,.0f} tok/s  decode {decode.get('execute_ms', 0):6.2f} ms/step  "
            f"prefill {prefill.get('execute_ms', 0):7.1f} ms/step")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmbench studies tp-scaling", description=__doc__.split("\n\n")[0],
                                 epilog="Other options go to each `llmbench studies throughput` run.")
    ap.add_argument("--tp", type=int, default=2, help="the tensor-parallel size compared with 1")
    ap.add_argument("--pairs", type=int, default=2, help="TP=1 / TP=N pairs after the first (discarded) pair")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="EngineConfig field for the TP=N runs")
    ap.add_argument("--timeout-s", type=float, default=900.0, help="per run")
    ap.add_argument("--json", help="write the runs and ratios here")
    return ap


def main(argv: list[str] | None = None) -> dict:
    """The runs and ratios (`llmbench` takes a non-int result as exit status 0)."""
    ap = build_parser()
    args, bench_args = ap.parse_known_args(argv)
    if args.tp < 2 or args.pairs < 1:
        ap.error("--tp must be >= 2 and --pairs >= 1")
    runs, ratios = [], []
    for i in range(args.pairs + 1):
        # TP=N first: an engine option it rejects fails the study before a TP=1 run is spent
        many = run_bench(bench_args, args.tp, args.engine_arg, args.timeout_s)
        one = run_bench(bench_args, 1, [], args.timeout_s)
        ratio = many["engine_tok_s"] / one["engine_tok_s"]
        tag = "first, not counted" if i == 0 else f"pair {i}"
        print(f"{tag}: {describe(1, one)} | {describe(args.tp, many)} | ratio {ratio:.3f}", flush=True)
        runs.append({"tp1": one, f"tp{args.tp}": many, "ratio": ratio, "counted": i > 0})
        if i:
            ratios.append(ratio)
    result = {"tp": args.tp, "ratios": ratios, "median_ratio": statistics.median(ratios), "runs": runs}
    print(f"TP={args.tp} / TP=1 throughput: median {result['median_ratio']:.3f} over {len(ratios)} pairs "
          f"({', '.join(f'{r:.3f}' for r in ratios)})")
    write_result(args.json, result)
    return result


if __name__ == "__main__":
    main()
