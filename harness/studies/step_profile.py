"""Where a decode step's time goes, against its bytes/bandwidth floor.

    llmbench studies step-profile --model qwen3-0.6b --batch 256 --context 1024 [--fused-small-batch-tokens 0 ...]

Fills `batch` sequences to `context` tokens, then (1) times decode steps end to end with the
host clock (what the engine loop sees), split into the host's own work (schedule, input prep
and launch, postprocess) and its wait for the GPU, (2) times the model part alone with CUDA
events (graph replay), and (3) lists the kernels of one eager decode step with torch.profiler.
The floor is (weights + KV read) / measured copy bandwidth, with harness.roofline's byte count.

The measurement of one (batch, context) point (`measure_point`, and the engine sizing it needs,
`engine_sizing`) is shared with harness.studies.latency, which sweeps it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.config_args import add_engine_args, engine_kwargs
from engine.executor import UniprocExecutor
from engine.model_runner import ModelRunner
from engine.outputs import StepStats
from harness.kernels.jit_watch import watch_jit
from harness.roofline import bytes_moved, measure_copy_bandwidth, weight_bytes
from harness.studies import write_result

STEP_MARGIN = 8  # decode tokens past the timed steps (the async lookahead and a replayed step)
GRAPH_REPLAYS = 10


def model_runner(llm: LLM) -> ModelRunner:
    """The engine's one shard: this study times the model itself, so it reaches past the
    Executor interface, which only a single-process (TP=1) engine allows."""
    executor = llm.engine.executor
    if not isinstance(executor, UniprocExecutor):
        raise ValueError("step_profile needs tensor_parallel_size=1")
    return executor.runner


# ---- sizing --------------------------------------------------------------------------------
def decode_max_tokens(batch: int, context: int, steps: int, token_budget: int) -> int:
    """max_tokens that keeps every sequence decoding through the fill and `steps` more steps.
    Under chunked prefill a sequence whose prompt is done decodes (one token a step) while the
    others still prefill, so the first ones gain up to one token per fill step."""
    fill_steps = -(-batch * context // max(1, token_budget - batch)) + 2
    return fill_steps + steps + STEP_MARGIN


def tokens_per_seq(batch: int, context: int, steps: int, token_budget: int) -> int:
    """KV slots one sequence of a point may need at most."""
    return context + decode_max_tokens(batch, context, steps, token_budget)


def engine_sizing(cfg: EngineConfig, points: list[tuple[int, int]], steps: int, min_blocks: int = 0) -> dict[str, int]:
    """max_num_seqs, max_model_len and num_kv_blocks for an engine of `cfg` that runs every
    (batch, context) point of `points` (one at a time, `steps` decode steps each) without
    preemption, and no more."""
    lens = [tokens_per_seq(b, c, steps, cfg.max_num_batched_tokens) for b, c in points]
    blocks = [b * -(-n // cfg.block_size) for (b, _), n in zip(points, lens)]
    return {"max_num_seqs": max(b for b, _ in points), "max_model_len": max(lens),
            "num_kv_blocks": max(max(blocks), min_blocks) + 1}  # + the null block


# ---- one point -----------------------------------------------------------------------------
def fill(llm: LLM, batch: int, context: int, max_tokens: int) -> None:
    """`batch` requests of `context` distinct prompt tokens, stepped until none is prefilling."""
    engine = llm.engine
    vocab = min(1000, engine.config.model_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    for i in range(batch):
        engine.add_request(f"p{i}", [(i * 31 + j) % vocab for j in range(context)], params)
    while engine.last_step_stats is None or engine.last_step_stats.num_prefill_tokens or engine.scheduler.waiting:
        engine.step()


def drain(llm: LLM) -> None:
    """Abort every request and step until the engine is idle (the next point starts clean)."""
    engine = llm.engine
    for request_id in list(engine.scheduler.requests):
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()


@dataclass
class DecodeTiming:
    """Per-step means over `steps` engine steps of one decode batch (seconds; host clock), and
    what can make one step slow: a mean host time far above its median is one long step."""

    steps: int
    step_s: float  # wall time of a step: every sequence's TPOT
    schedule_s: float
    launch_s: float  # input prep, kernel launches
    postprocess_s: float
    wait_s: float  # the host blocked on the GPU (sampled ids of the step before)
    bytes_per_step: float  # harness.roofline.bytes_moved of the steps, per step
    kv_tokens: float  # KV tokens stored, all sequences
    host_p50_s: float = 0.0  # the median step's host work (schedule + launch + postprocess)
    host_max_s: float = 0.0  # the slowest step's
    eager_steps: int | None = None  # steps that found no CUDA graph (None: the engine has none)
    jit: list[str] | None = None  # Triton specializations first met in the steps (None: not knowable)
    gc_s: float = 0.0  # Python's garbage collector, inside the steps
    gc_full: int = 0  # of its collections, the full (generation 2) ones

    @property
    def host_s(self) -> float:
        """The host's own work in a step; under async scheduling it overlaps the GPU's."""
        return self.schedule_s + self.launch_s + self.postprocess_s


@contextlib.contextmanager
def watch_gc() -> Iterator[list[tuple[int, float]]]:
    """(generation, seconds) of each garbage collection inside the block."""
    seen: list[tuple[int, float]] = []
    start = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            seen.append((info["generation"], time.perf_counter() - start[0]))

    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)


def _graph_misses(llm: LLM) -> int | None:
    """StepGraphs.misses of a single-process engine with graphs, else None."""
    executor = llm.engine.executor
    graphs = executor.runner.graphs if isinstance(executor, UniprocExecutor) else None
    return graphs.misses if graphs is not None else None


def time_decode(llm: LLM, batch: int, steps: int) -> DecodeTiming:
    """Run `steps` engine steps and time them; each must be a decode step of all `batch`
    sequences (a prefill or preemption inside would make the figures wrong, so it raises).
    Also notes what could make single steps slow: Triton compiles, garbage collections, steps
    without a CUDA graph."""
    engine = llm.engine
    if engine.config.device_type == "cuda":
        torch.cuda.synchronize()
    stats: list[StepStats] = []
    misses = _graph_misses(llm)
    with watch_jit() as jit, watch_gc() as collections:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
            stats.append(engine.last_step_stats)
        wall = time.perf_counter() - t0
    eager = None if misses is None else _graph_misses(llm) - misses
    bad = [s for s in stats if s.num_prefill_tokens or s.num_preempted or s.num_scheduled_seqs != batch]
    if bad:
        raise RuntimeError(f"{len(bad)} of {steps} timed steps were not decode steps of {batch} sequences "
                           f"(first: {bad[0].num_scheduled_seqs} sequences, {bad[0].num_prefill_tokens} "
                           f"prefill tokens, {bad[0].num_preempted} preempted): the engine is sized wrong")
    cfg = engine.config
    frame = pd.DataFrame([s.counts() for s in stats])
    moved = bytes_moved(frame, weight_bytes(cfg.model_config, cfg.torch_dtype.itemsize), cfg.kv_bytes_per_token)

    def mean(name: str) -> float:
        return sum(getattr(s, name) for s in stats) / steps

    host = sorted(s.schedule_s + s.launch_s + s.postprocess_s for s in stats)
    return DecodeTiming(steps, wall / steps, mean("schedule_s"), mean("launch_s"), mean("postprocess_s"),
                        mean("execute_s") - mean("launch_s"), moved / steps, float(frame["kv_tokens_stored"].mean()),
                        host[len(host) // 2], host[-1], eager, jit.seen if jit.available else None,
                        sum(t for _, t in collections), sum(g == 2 for g, _ in collections))


def graph_replay_ms(llm: LLM, batch: int, replays: int = GRAPH_REPLAYS) -> float | None:
    """GPU time of the model part of the last decode step (attention, LM head), without the
    engine around it: its CUDA graph replayed on the inputs still in the runner's buffers
    (which rewrites the same KV slots with the same values), timed with CUDA events. None
    without a graph (CPU, enforce_eager, a batch above max_num_seqs)."""
    runner = model_runner(llm)
    context = int(runner.buffers.seq_lens.np[0])  # the last step's (batch 1: which graph it took)
    graph = runner.graphs.for_batch(batch, context) if runner.graphs is not None else None
    if graph is None:
        return None
    torch.cuda.synchronize()  # the step in flight is done with the buffers and the logits
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def measure_point(llm: LLM, batch: int, context: int, steps: int, warmup: int, bandwidth: float) -> dict[str, Any]:
    """One (batch, context) point on a running engine: fill, `warmup` untimed decode steps,
    `steps` timed ones, the graph replay; its row. The requests stay running (see drain)."""
    cfg = llm.engine.config
    fill(llm, batch, context, decode_max_tokens(batch, context, warmup + steps, cfg.max_num_batched_tokens))
    for _ in range(warmup):
        llm.engine.step()
    t = time_decode(llm, batch, steps)
    gpu_ms = graph_replay_ms(llm, batch)
    weights = weight_bytes(cfg.model_config, cfg.torch_dtype.itemsize)
    floor_ms = t.bytes_per_step / bandwidth * 1e3
    return {"batch": batch, "context": context, "kv_tokens_per_seq": t.kv_tokens / batch, "steps": steps,
            "tpot_ms": t.step_s * 1e3, "host_ms": t.host_s * 1e3, "schedule_ms": t.schedule_s * 1e3,
            "launch_ms": t.launch_s * 1e3, "postprocess_ms": t.postprocess_s * 1e3, "wait_ms": t.wait_s * 1e3,
            "host_p50_ms": t.host_p50_s * 1e3, "host_max_ms": t.host_max_s * 1e3, "eager_steps": t.eager_steps,
            "jit_compiles": None if t.jit is None else len(t.jit), "jit_kernels": None if t.jit is None else
            ",".join(t.jit), "gc_ms": t.gc_s * 1e3, "gc_full": t.gc_full,
            "gpu_ms": gpu_ms, "tpot_minus_gpu_ms": None if gpu_ms is None else t.step_s * 1e3 - gpu_ms,
            "weight_bytes": weights, "kv_bytes": t.bytes_per_step - weights,
            "floor_ms": floor_ms, "tpot_vs_floor": t.step_s * 1e3 / floor_ms,
            "gpu_vs_floor": None if gpu_ms is None else gpu_ms / floor_ms}


# ---- the step-profile study ----------------------------------------------------------------
def step_kernels(llm: LLM) -> tuple[int, str]:
    """CUDA kernels of one engine step (torch.profiler): their number and the top of the table."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.engine.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18)
    return len([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]), table


# set by the study from --batch, --context and --steps (and once per mode: graphs, then eager)
STUDY_FIELDS = ("model", "max_num_seqs", "enforce_eager", "max_model_len", "num_kv_blocks")


def profile(model: str, batch: int, context: int, steps: int, eager: bool, bw: float, **engine) -> dict:
    """`engine`: other EngineConfig fields (the study's engine flags)."""
    warmup = 2
    sizing = engine_sizing(EngineConfig(model=model, **engine), [(batch, context)], warmup + steps)
    llm = LLM(model, enforce_eager=eager, **{**engine, **sizing})
    result = {"mode": "eager" if eager else "graph", **measure_point(llm, batch, context, steps, warmup, bw)}
    if result["gpu_ms"] is None:  # eager: what the step launches
        result["kernels"], table = step_kernels(llm)
        print(table)
    llm.shutdown()
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
