"""Where a decode step's time goes, against its bytes/bandwidth floor.

    llmbench studies step-profile --model qwen3-0.6b --batch 256 --context 1024 [--fused-small-batch-tokens 0 ...]

Fills `batch` sequences to `context` tokens, then (1) times decode steps end to end with the
host clock (what the engine loop sees), (2) times the model part alone with CUDA events
(graph replay), and (3) lists the kernels of one eager decode step with torch.profiler.
The floor is (weights + KV read) / measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from engine import LLM, SamplingParams
from engine.config_args import add_engine_args, engine_kwargs
from engine.executor import UniprocExecutor
from engine.model_runner import ModelRunner
from harness.roofline import measure_copy_bandwidth
from harness.studies import write_result


def model_runner(llm: LLM) -> ModelRunner:
    """The engine's one shard: this study times the model itself, so it reaches past the
    Executor interface, which only a single-process (TP=1) engine allows."""
    executor = llm.engine.executor
    if not isinstance(executor, UniprocExecutor):
        raise ValueError("step_profile needs tensor_parallel_size=1")
    return executor.runner


def fill(llm: LLM, batch: int, context: int, steps: int) -> None:
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=steps + 64, ignore_eos=True, detokenize=False)
    for i in range(batch):
        engine.add_request(f"p{i}", [(i * 31 + j) % 1000 for j in range(context)], params)
    while engine.last_step_stats is None or engine.last_step_stats.num_prefill_tokens or engine.scheduler.waiting:
        engine.step()


def step_floor_s(llm: LLM, batch: int, context: int, bw: float) -> float:
    weight_bytes = sum(p.numel() * p.element_size() for p in model_runner(llm).model.parameters())
    kv_bytes = batch * context * llm.engine.config.kv_bytes_per_token
    return (weight_bytes + kv_bytes) / bw


# set by the study from --batch, --context and --steps (and once per mode: graphs, then eager)
STUDY_FIELDS = ("model", "max_num_seqs", "enforce_eager", "max_model_len", "num_kv_blocks")


def profile(model: str, batch: int, context: int, steps: int, eager: bool, bw: float, **engine) -> dict:
    """`engine`: other EngineConfig fields (the study's engine flags)."""
    max_len = context + steps + 128
    llm = LLM(model, max_num_seqs=batch, enforce_eager=eager, max_model_len=max_len,
              num_kv_blocks=batch * (-(-max_len // 16)) + 16, **engine)
    fill(llm, batch, context, steps)
    engine = llm.engine
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    host = 0.0
    for _ in range(steps):
        engine.step()
        s = engine.last_step_stats
        host += s.schedule_s + s.postprocess_s
    wall = (time.perf_counter() - t0) / steps
    floor_ms = step_floor_s(llm, batch, context + steps // 2, bw) * 1e3
    result = {"mode": "eager" if eager else "graph", "batch": batch, "context": context,
              "step_ms": round(wall * 1e3, 3), "host_sched_post_ms": round(host / steps * 1e3, 3),
              "floor_ms": round(floor_ms, 3), "step_vs_floor": round(wall * 1e3 / floor_ms, 2)}
    runner = model_runner(llm)
    out = engine.scheduler.schedule()  # one more decode step, model part alone
    graph = runner.graphs.lookup(out) if runner.graphs else None
    if graph is not None:
        runner.prepare_inputs(out, pad_to=graph.batch_size)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        result["graph_replay_ms"] = round(start.elapsed_time(end) / 10, 3)
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            runner.execute_model(out)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18)
        result["kernels"] = len([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA])
        print(table)
    engine.scheduler.update_from_output(out, [0] * len(out.seqs))
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmbench studies step-profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json", help="write the summary here")
    add_engine_args(ap.add_argument_group("engine (other EngineConfig fields)"), skip=STUDY_FIELDS)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        engine = engine_kwargs(args)
    except ValueError as e:
        ap.error(str(e))
    bw = measure_copy_bandwidth("cuda")
    rows = []
    for eager in (False, True):
        rows.append(profile(args.model, args.batch, args.context, args.steps, eager, bw, **engine))
        gc.collect()
        torch.cuda.empty_cache()
    summary = {"copy_bw_gbs": round(bw / 1e9), "engine": engine, "runs": rows}
    print(json.dumps(summary, indent=1))
    write_result(args.json, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
