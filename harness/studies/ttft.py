"""Time to first token at low load, with prefill CUDA graphs on and off (issue 18).

    llmbench studies ttft --model qwen3-0.6b --input-len 128 --output-len 64 --num-prompts 40 \\
        --limits 512,0

For each max_graph_prefill_tokens value in --limits, in turn in this process: an engine (its
construction time includes capturing the graphs), its warm-up, then one request at a time, the
next added when the last has finished (as `--max-concurrency 1`), each prompt fresh random ids
(no prefix hits). TTFT = first token delta - add_request; TPOT = the rest of the request over
its other tokens. Then one more prompt's prefill step alone is taken apart ("anatomy"): host
time of prepare_inputs, the model forward (eager: launching every kernel) and sampling inside
execute_model_async, its launch and launch-to-result times, and in a second such step under
torch.profiler the kernels it ran on the GPU and the aten ops it dispatched. Runs on CPU too
(no graphs there; the host times are then compute).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from engine import LLM, SamplingParams
from engine.config_args import add_engine_args, engine_kwargs
from engine.model_runner import ModelRunner
from harness.studies import write_result
from harness.studies.latency import time_request
from harness.studies.step_profile import model_runner


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmbench studies ttft", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--limits", default="512,0", help="max_graph_prefill_tokens values, in this order")
    ap.add_argument("--prompt-seed", type=int, default=0, help="seeds the prompt ids")
    ap.add_argument("--json", help="write the results here")
    # a fixed KV size: the engines are built one after the other in this process
    add_engine_args(ap.add_argument_group("engine (EngineConfig fields)"), defaults={"num_kv_blocks": 4096},
                    skip=("max_graph_prefill_tokens",))
    return ap


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HostTimers:
    """Wall time spent in a few runner methods, wrapped on the instances while it is open."""

    def __init__(self, runner: ModelRunner):
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list[Callable[[], None]] = []
        for name, obj, attr in (("prepare_inputs", runner, "prepare_inputs"), ("model_forward", runner.model, "forward"),
                                ("sample", runner, "_sample")):
            self._wrap(name, obj, attr)

    def _wrap(self, name: str, obj: Any, attr: str) -> None:
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        setattr(obj, attr, timed)
        self._undo.append(lambda: delattr(obj, attr))

    def close(self) -> None:
        for undo in self._undo:
            undo()


def _run_prefill(llm: LLM, prompt: list[int], rid: str) -> tuple[float, float, HostTimers, bool]:
    """Schedule one prompt alone and run its prefill step by hand: (launch s, launch-to-result s,
    the runner's host times, whether a graph ran it)."""
    engine, runner = llm.engine, model_runner(llm)
    engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False))
    out = engine.scheduler.schedule()
    graphed = runner.graphs is not None and runner.graphs.lookup(out) is not None
    _sync(runner.device)
    timers = HostTimers(runner)
    try:
        t0 = time.perf_counter()
        pending = runner.execute_model_async(out)
        t1 = time.perf_counter()
        sampled = pending.result()
        t2 = time.perf_counter()
    finally:
        timers.close()
    engine.scheduler.update_from_output(out, sampled)  # max_tokens 1: the request finishes
    return t1 - t0, t2 - t0, timers, graphed


def _count_launches(prof: torch.profiler.profile) -> dict[str, int | None]:
    """GPU kernels and copies (None on CPU), and the aten ops called from outside other ops."""
    events = prof.events()
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = [e for e in gpu if "memcpy" in e.name.lower() or "memset" in e.name.lower()]
    top_ops = [e for e in events if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return {"gpu_kernels": len(gpu) - len(copies) if gpu else None, "gpu_copies": len(copies) if gpu else None,
            "aten_ops": len(top_ops)}


def prefill_anatomy(llm: LLM, prompts: list[list[int]]) -> dict[str, Any]:
    """One prefill step timed by parts, then another (a different prompt: no prefix hit) counted."""
    device = model_runner(llm).device
    launch_s, result_s, timers, graphed = _run_prefill(llm, prompts[0], "anatomy-0")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        _run_prefill(llm, prompts[1], "anatomy-1")
        _sync(device)
    return {"graphed": graphed, "launch_ms": round(launch_s * 1e3, 3), "launch_to_result_ms": round(result_s * 1e3, 3),
            "host_ms": {k: round(v * 1e3, 3) for k, v in timers.seconds.items()}, **_count_launches(prof)}


def measure(kwargs: dict[str, Any], limit: int, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    llm = LLM(**kwargs, max_graph_prefill_tokens=limit)
    init_s = time.perf_counter() - t0
    engine = llm.engine
    engine.warm_up()
    rng, vocab = random.Random(args.prompt_seed), engine.config.model_config.vocab_size  # the same prompts each run
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts + 2)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    ttft, tpot = [], []
    for i, prompt in enumerate(prompts[:-2]):
        timing = time_request(engine, f"r{i}", prompt, params)
        ttft.append(timing.ttft_s * 1e3)
        if timing.tpot_s is not None:
            tpot.append(timing.tpot_s * 1e3)
    anatomy = prefill_anatomy(llm, prompts[-2:])
    llm.shutdown()
    del llm, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    p90 = statistics.quantiles(ttft, n=10, method="inclusive")[8] if len(ttft) > 1 else ttft[0]
    return {"max_graph_prefill_tokens": limit, "engine_init_s": round(init_s, 2),
            "ttft_ms_p50": round(statistics.median(ttft), 3), "ttft_ms_p90": round(p90, 3),
            "ttft_ms_mean": round(statistics.fmean(ttft), 3),
            "tpot_ms_p50": round(statistics.median(tpot), 3) if tpot else None, "prefill_step": anatomy}


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if min(args.input_len, args.output_len, args.num_prompts) < 1:
        ap.error("--input-len, --output-len and --num-prompts must be >= 1")
    try:
        limits = [int(x) for x in args.limits.split(",")]
        kwargs = engine_kwargs(args)
    except ValueError as e:
        ap.error(str(e))
    rows = []
    for limit in limits:
        rows.append(measure(kwargs, limit, args))
        row = rows[-1]
        print(f"max_graph_prefill_tokens={limit}: TTFT p50 {row['ttft_ms_p50']} ms, p90 {row['ttft_ms_p90']} ms; "
              f"TPOT p50 {row['tpot_ms_p50']} ms; engine init {row['engine_init_s']} s; "
              f"prefill step {row['prefill_step']}", flush=True)
    write_result(args.json, {"model": kwargs.get("model", "tiny"), "input_len": args.input_len,
                             "output_len": args.output_len, "num_prompts": args.num_prompts, "runs": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
