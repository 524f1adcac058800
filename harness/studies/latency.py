"""Decode latency over batch x context against its bytes floor, and TTFT at low load.

    llmbench studies latency                                    # tiny on CPU
    llmbench studies latency --model qwen3-0.6b,llama-3-8b      # a GPU: batch 1..256 x context 128, 4096

Each model (a preset with dummy weights, or a checkpoint) gets one engine, sized for the largest
point that fits and reused for every point of --batch x --context. A point
(harness.studies.step_profile.measure_point) is `batch` requests of `context` prompt tokens,
--warmup-steps untimed decode steps, then --steps timed ones:

  tpot_ms        wall time of one engine step (host clock): every sequence's TPOT
  host_ms        the host's own work in a step: schedule + input prep and launch + postprocess
                 (schedule_ms, launch_ms, postprocess_ms); async scheduling overlaps it with the
                 GPU, wait_ms is the host blocked on the GPU. host_p50_ms / host_max_ms: the
                 median and slowest step's; a mean far above the median is one long step, and
                 these say what happened inside the timed steps: jit_compiles (Triton
                 specializations first met, jit_kernels names them), gc_ms / gc_full (Python's
                 garbage collector; full collections), eager_steps (steps without a CUDA graph)
  gpu_ms         the model part alone: CUDA events around replays of its decode graph
                 (empty on a CPU or without graphs); tpot_minus_gpu_ms is the rest of a step
                 (host work the GPU waited for, sampling, input copies)
  floor_ms       (weight_bytes + kv_bytes) / measured copy bandwidth: harness.roofline's count
                 (every weight once, the KV of every stored token), per step
  tpot_vs_floor  tpot_ms / floor_ms
  fits           False: the point's KV (kv_need_bytes) does not fit the device, or its tokens
                 exceed the model's positions; skipped, skip_reason says which

A sequence that finishes its prompt early decodes while the others still prefill, so the
measured context (kv_tokens_per_seq) can exceed the nominal one by up to the fill's steps.

TTFT: --ttft-requests requests of --prompt-len tokens, one at a time, through the engine's
add_request/step API (prefix cache reset before each, one warm-up request first): p50/p90, and
where it went: the host's own work in the steps up to the first token, the host waiting on the
GPU, and (CUDA) the prefill step's kernel time, from torch.profiler on one more request.

Writes OUT/latency.json (everything), OUT/table.md (the points and TTFT as Markdown tables),
OUT/points.parquet (a row per point) and OUT/ttft.parquet (a row per TTFT request), with the
run's metadata.

An A/B (harness/kernel_constants.py): `--ab MODULE.NAME=VALUE` (kernel constants) and/or
`--ab-engine-arg KEY=VALUE` (EngineConfig fields), each repeatable, make the variant; every model
runs as given, then with the variant, --rounds times (fresh engines each pass), rows and TTFT
labelled by pass (`arm`: 'baseline 1', 'variant 1', ...), and per point the variant's median TPOT
over the rounds divided by the baseline's is printed and written (`ab.tpot_ratio`). The points are
planned on the baseline's config. `--kernel-constant` sets constants for every pass.

    llmbench studies latency --model qwen3-0.6b --batch 8,16,32 --context 640 --rounds 2 \
        --ab-engine-arg fused_row_parallel_columns=True
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from engine import LLM, EngineConfig, LLMEngine, SamplingParams
from engine.config_args import add_engine_args, engine_kwargs
from engine.outputs import StepStats
from harness.kernel_constants import (
    Variant,
    ab_passes,
    add_kernel_constant_args,
    kernel_constants,
    parse_kernel_constants,
    parse_variant,
)
from harness.metrics import latency_stats
from harness.report import write_table
from harness.roofline import measure_copy_bandwidth, weight_bytes
from harness.studies import write_result
from harness.studies.step_profile import (
    GRAPH_REPLAYS,
    drain,
    engine_sizing,
    measure_point,
    tokens_per_seq,
)

ACTIVATION_RESERVE = 4 << 30  # GPU bytes the KV must leave: prefill activations, graph pool, sampler
WARM_UP_BLOCKS = 64  # KV blocks LLMEngine.warm_up's requests take at most
TTFT_MAX_TOKENS = 4  # > 1: the step after the prefill launches a decode before the first token returns
# Rough speeds for the time estimate, not measurements: engine start (s), prefill FLOP/s, the
# shortest step (s)
ASSUMED = {"cuda": (20.0, 3e14, 1e-3), "cpu": (1.0, 2e10, 4e-3)}


@dataclass
class Point:
    batch: int
    context: int
    kv_need_bytes: int  # KV of all its sequences at their longest
    skip_reason: str | None = None


def kv_budget_bytes(cfg: EngineConfig) -> int:
    """KV bytes the device can hold for this model: on a GPU what gpu_memory_utilization leaves
    after other processes, the weights and ACTIVATION_RESERVE (the engine's own profile needs
    the engine built); on a CPU cpu_kv_cache_bytes."""
    if cfg.device_type == "cpu":
        return cfg.cpu_kv_cache_bytes
    mc, itemsize = cfg.model_config, cfg.torch_dtype.itemsize
    resident = weight_bytes(mc, itemsize) + (0 if mc.tie_word_embeddings else mc.vocab_size * mc.hidden_size * itemsize)
    free, total = torch.cuda.mem_get_info(cfg.device_for_rank(0))
    return int(total * cfg.gpu_memory_utilization - (total - free) - resident - ACTIVATION_RESERVE)


def plan_points(cfg: EngineConfig, batches: list[int], contexts: list[int], decode_steps: int,
                kv_budget: int) -> list[Point]:
    """Every batch x context point, each with its KV need and, when it cannot run, why."""
    limit, block = cfg.model_config.max_position_embeddings, cfg.block_size
    points = []
    for batch in batches:
        for context in contexts:
            n = tokens_per_seq(batch, context, decode_steps, cfg.max_num_batched_tokens)
            need = batch * -(-n // block) * block * cfg.kv_bytes_per_token
            reason = None
            if n > limit:
                reason = f"{context} prompt + {n - context} decode tokens exceed the model's {limit} positions"
            elif need > kv_budget:
                reason = (f"KV of {batch} x {n} tokens is {need / 1e9:.3g} GB; the device holds "
                          f"{kv_budget / 1e9:.3g} GB")
            points.append(Point(batch, context, need, reason))
    return points


def estimate_s(cfg: EngineConfig, points: list[Point], decode_steps: int, ttft_requests: int, prompt_len: int,
               bandwidth: float) -> float:
    """A rough time for one model (ASSUMED speeds; decode steps at twice their floor)."""
    start_s, flops, step_s = ASSUMED[cfg.device_type]
    weights = weight_bytes(cfg.model_config, cfg.torch_dtype.itemsize)
    flop_per_token = 2 * weights / cfg.torch_dtype.itemsize
    total = start_s
    for p in (p for p in points if p.skip_reason is None):
        tokens = p.batch * p.context
        fill_steps = -(-tokens // max(1, cfg.max_num_batched_tokens - p.batch))
        floor = (weights + tokens * cfg.kv_bytes_per_token) / bandwidth
        total += tokens * flop_per_token / flops + fill_steps * step_s
        total += (decode_steps + GRAPH_REPLAYS) * max(step_s, 2 * floor)
    return total + (ttft_requests + 2) * (prompt_len * flop_per_token / flops + (TTFT_MAX_TOKENS + 2) * step_s)


def build_engine(cfg: EngineConfig, kwargs: dict[str, Any], points: list[Point], decode_steps: int,
                 prompt_len: int) -> LLM:
    """One engine for every point that fits and the TTFT requests, sized for the largest."""
    runs = [(p.batch, p.context) for p in points if p.skip_reason is None] + [(1, prompt_len)]
    sizing = engine_sizing(cfg, runs, decode_steps, min_blocks=WARM_UP_BLOCKS)
    sizing["max_model_len"] = min(sizing["max_model_len"], cfg.model_config.max_position_embeddings)
    llm = LLM(cfg.model, **{**kwargs, **sizing})
    llm.engine.warm_up()
    return llm


def run_point(llm: LLM, point: Point, warmup: int, steps: int, bandwidth: float) -> dict[str, Any]:
    row = {"batch": point.batch, "context": point.context, "fits": point.skip_reason is None,
           "skip_reason": point.skip_reason, "kv_need_bytes": point.kv_need_bytes, "steps": steps}
    if point.skip_reason is None:
        row.update(measure_point(llm, point.batch, point.context, steps, warmup, bandwidth))
        drain(llm)
    return row


# ---- TTFT -------------------------------------------------------------------------------------
@dataclass
class RequestTiming:
    ttft_s: float  # add_request to the step that returns the first token
    tpot_s: float | None  # the rest of the request over its other tokens (None: one token)
    stats: list[StepStats]  # the steps up to and including the one with the first token


def time_request(engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams) -> RequestTiming:
    """One request alone in the engine, run to its end, timed by the host clock."""
    stats: list[StepStats] = []
    first = None
    t0 = last = time.perf_counter()
    n = 0
    engine.add_request(request_id, prompt, params)
    while engine.has_unfinished_requests():
        deltas = engine.step()
        if first is None:
            stats.append(engine.last_step_stats)
        for d in deltas:
            if d.request_id == request_id and d.new_token_ids:
                last = time.perf_counter()
                first = last if first is None else first
                n += len(d.new_token_ids)
    if first is None:
        raise RuntimeError(f"request {request_id} finished without a token")
    return RequestTiming(first - t0, (last - first) / (n - 1) if n > 1 else None, stats)


def first_token(engine: LLMEngine, request_id: str, prompt: list[int]) -> tuple[float, list[StepStats]]:
    """time_request's TTFT and steps for a few-token greedy request; the prefix cache is reset first."""
    engine.reset_prefix_cache()
    params = SamplingParams(temperature=0.0, max_tokens=TTFT_MAX_TOKENS, ignore_eos=True, detokenize=False)
    timing = time_request(engine, request_id, prompt, params)
    return timing.ttft_s, timing.stats


def prefill_kernel_ms(engine: LLMEngine, prompt: list[int]) -> float | None:
    """CUDA kernel time of a request's prefill step (torch.profiler); None on a CPU or when the
    prompt takes more than one step."""
    if engine.config.device_type != "cuda" or len(prompt) > engine.config.max_num_batched_tokens:
        return None
    engine.reset_prefix_cache()
    params = SamplingParams(temperature=0.0, max_tokens=TTFT_MAX_TOKENS, ignore_eos=True, detokenize=False)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.add_request("ttft-profiled", prompt, params)
        engine.step()  # launches the whole prefill
        torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        engine.step()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in kernels) / 1e3  # a kernel's range is on the GPU


def measure_ttft(llm: LLM, requests: int, prompt_len: int) -> tuple[list[dict[str, Any]], float | None]:
    """One row per request (after an untimed one), and the prefill's kernel time."""
    engine = llm.engine
    vocab = engine.config.model_config.vocab_size
    prompts = [[(1 + 7 * i + 13 * j) % vocab for j in range(prompt_len)] for i in range(requests + 2)]
    first_token(engine, "ttft-warm-up", prompts[0])
    rows = []
    for i in range(requests):
        ttft, stats = first_token(engine, f"ttft-{i}", prompts[i + 1])
        host = sum(s.schedule_s + s.launch_s + s.postprocess_s for s in stats)
        wait = sum(s.execute_s - s.launch_s for s in stats)
        rows.append({"request": i, "prompt_len": prompt_len, "ttft_ms": ttft * 1e3, "steps": len(stats),
                     "host_ms": host * 1e3, "wait_ms": wait * 1e3})
    return rows, prefill_kernel_ms(engine, prompts[-1])


def ttft_summary(rows: list[dict[str, Any]], prefill_gpu_ms: float | None) -> dict[str, Any]:
    frame = pd.DataFrame(rows)
    out: dict[str, Any] = {"requests": len(rows), "prompt_len": rows[0]["prompt_len"]}
    for name, column in (("ttft", "ttft_ms"), ("ttft_host", "host_ms"), ("ttft_wait", "wait_ms")):
        out.update(latency_stats(name, frame[column] / 1e3, (50, 90)))
    out["prefill_gpu_ms"] = prefill_gpu_ms
    return out


# ---- output -----------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def describe(model: str, row: dict[str, Any]) -> str:
    head = f"{model} B={row['batch']:<3} ctx={row['context']:<5}"
    if not row["fits"]:
        return f"{head} skipped: {row['skip_reason']}"
    return (f"{head} TPOT {row['tpot_ms']:.3f} ms  host {row['host_ms']:.3f}  gpu {_ms(row['gpu_ms'])}  "
            f"TPOT-gpu {_ms(row['tpot_minus_gpu_ms'])}  floor {row['floor_ms']:.3f}  "
            f"TPOT/floor {row['tpot_vs_floor']:.2f}{oddities(row)}")


def oddities(row: dict[str, Any]) -> str:
    """What made some timed step slow, when anything did: a host-time outlier, Triton compiles,
    garbage collection, steps without a graph ('' when none)."""
    notes = []
    if row["host_max_ms"] > 3 * max(row["host_p50_ms"], 0.1):
        notes.append(f"host max {row['host_max_ms']:.1f} ms vs median {row['host_p50_ms']:.3f}")
    if row["jit_compiles"]:
        notes.append(f"{row['jit_compiles']} Triton compile(s): {row['jit_kernels']}")
    if row["gc_full"] or row["gc_ms"] > 1.0:
        notes.append(f"GC {row['gc_ms']:.1f} ms ({row['gc_full']} full)")
    if row["eager_steps"]:
        notes.append(f"{row['eager_steps']} eager step(s)")
    return f"  [{'; '.join(notes)}]" if notes else ""


def points_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The points as a table: measured figures of skipped points (and gpu figures without a
    GPU) are NaN."""
    frame = pd.DataFrame(rows)
    numeric = [c for c in frame.columns if c not in ("model", "fits", "skip_reason", "arm")]
    return frame.astype({c: float for c in numeric if frame[c].dtype == object})


def table_markdown(result: dict[str, Any]) -> str:
    """The points and TTFT summaries of a result (latency.json) as Markdown tables."""
    lines = ["| model | batch | context | TPOT ms | host ms | GPU ms | floor ms | TPOT / floor |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["points"]:
        model = f"{row['model']} [{row['arm']}]" if row.get("arm") else row["model"]
        head = f"| {model} | {row['batch']} | {row['context']} |"
        if not row["fits"]:
            lines.append(f"{head} skipped: {row['skip_reason']} | | | | |")
            continue
        lines.append(f"{head} {row['tpot_ms']:.3f} | {row['host_ms']:.3f} | {_ms(row['gpu_ms'])} | "
                     f"{row['floor_ms']:.3f} | {row['tpot_vs_floor']:.2f} |")
    lines += ["", "| model | TTFT requests x prompt tokens | TTFT p50 ms | p90 ms | host p50 ms | prefill kernels ms |",
              "|---|---|---|---|---|---|"]
    for model, t in result["ttft"].items():
        lines.append(f"| {model} | {t['requests']} x {t['prompt_len']} | {t['p50_ttft_ms']:.3f} | "
                     f"{t['p90_ttft_ms']:.3f} | {t['p50_ttft_host_ms']:.3f} | {_ms(t['prefill_gpu_ms'])} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, result: dict[str, Any], points: list[dict[str, Any]],
                  ttft_rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_result(str(out / "latency.json"), result)
    (out / "table.md").write_text(table_markdown(result))
    config = {"study": "latency", **result["config"]}
    write_table(out / "points.parquet", points_frame(points), config)
    write_table(out / "ttft.parquet", pd.DataFrame(ttft_rows), config)


# ---- command line -----------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="llmbench studies latency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b,llama-3-8b" if cuda else "tiny",
                    help="comma-separated presets or checkpoint dirs")
    ap.add_argument("--batch", type=int_list, default=[1, 4, 16, 64, 256] if cuda else [1, 4, 16])
    ap.add_argument("--context", type=int_list, default=[128, 4096] if cuda else [128, 1024])
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per point")
    ap.add_argument("--warmup-steps", type=int, default=4, help="untimed decode steps before them")
    ap.add_argument("--ttft-requests", type=int, default=20)
    ap.add_argument("--prompt-len", type=int, default=128, help="TTFT requests' prompt tokens")
    ap.add_argument("--kv-cache-gb", type=float, help="KV bytes a point may take (default: what the device "
                    "holds: GPU memory left under gpu_memory_utilization, cpu_kv_cache_bytes on a CPU)")
    ap.add_argument("--bandwidth-gbps", type=float, help="memory bandwidth of the floor (default: measured copy)")
    ap.add_argument("--out", help="output folder (default: reports/latency-<time>)")
    ap.add_argument("--no-progress", action="store_true")
    add_engine_args(ap.add_argument_group("engine (EngineConfig fields, for every model)"),
                    skip=("model", "max_num_seqs", "max_model_len", "num_kv_blocks"))
    add_kernel_constant_args(ap, "each point's TPOT ratio")
    return ap


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, EngineConfig], dict[str, Any]]:
    """The arguments (args.kernel_constant parsed into a dict), each model's config (before
    sizing) and the engine kwargs; bad input is a usage error."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if min(args.steps, args.ttft_requests, args.prompt_len, args.rounds) < 1 or args.warmup_steps < 0:
        ap.error("--steps, --ttft-requests, --prompt-len and --rounds must be >= 1, --warmup-steps >= 0")
    try:
        kwargs = engine_kwargs(args)
        configs = {m.strip(): EngineConfig(model=m.strip(), **kwargs) for m in args.model.split(",") if m.strip()}
        args.kernel_constant = parse_kernel_constants(args.kernel_constant)
        args.ab = parse_variant(args)
        variants = [pass_config(cfg, kwargs, args.ab.engine_args) for cfg in configs.values()] if args.ab else []
    except ValueError as e:
        ap.error(str(e))
    if not configs:
        ap.error("--model names no model")
    for name, cfg in [*configs.items(), *((f"{c.model} (variant)", c) for c in variants)]:
        if cfg.tensor_parallel_size != 1:
            ap.error("the latency study times one device: tensor_parallel_size must be 1")
        if args.prompt_len + TTFT_MAX_TOKENS > cfg.model_config.max_position_embeddings:
            ap.error(f"--prompt-len {args.prompt_len} exceeds {name}'s positions")
    return args, configs, kwargs


def pass_config(cfg: EngineConfig, kwargs: dict[str, Any], engine_args: dict[str, Any]) -> EngineConfig:
    """The model's config for an A/B pass: as given, or with the variant's EngineConfig fields."""
    return EngineConfig(model=cfg.model, **{**kwargs, **engine_args}) if engine_args else cfg


def run_model(cfg: EngineConfig, kwargs: dict[str, Any], points: list[Point], args: argparse.Namespace,
              bandwidth: float, bar: tqdm) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Every point of one model on one engine, then its TTFT: (point rows, TTFT rows, TTFT summary)."""
    model = cfg.model
    bar.set_postfix_str(f"{model}: engine")
    llm = build_engine(cfg, kwargs, points, args.warmup_steps + args.steps, args.prompt_len)
    rows = []
    for point in points:
        bar.set_postfix_str(f"{model} B={point.batch} ctx={point.context}")
        rows.append({"model": model, **run_point(llm, point, args.warmup_steps, args.steps, bandwidth)})
        bar.write(describe(model, rows[-1]))
        bar.update()
    bar.set_postfix_str(f"{model}: TTFT")
    ttft_rows, prefill_gpu_ms = measure_ttft(llm, args.ttft_requests, args.prompt_len)
    summary = ttft_summary(ttft_rows, prefill_gpu_ms)
    bar.write(f"{model} TTFT ({args.prompt_len} tokens, one at a time): p50 {summary['p50_ttft_ms']:.3f} ms  "
              f"p90 {summary['p90_ttft_ms']:.3f}  host p50 {summary['p50_ttft_host_ms']:.3f}  wait p50 "
              f"{summary['p50_ttft_wait_ms']:.3f}  prefill kernels {_ms(prefill_gpu_ms)}")
    bar.update()
    llm.shutdown()
    del llm
    gc.collect()
    if cfg.device_type == "cuda":
        torch.cuda.empty_cache()  # the next model's engine sizes itself against what is free
    return rows, [{"model": model, **r} for r in ttft_rows], summary


def tpot_ratios(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each measured point of an A/B: the variant's median TPOT over rounds / the baseline's."""
    tpots: dict[tuple, dict[str, list[float]]] = {}
    for row in points:
        if row["fits"]:
            arm = row["arm"].split()[0]
            tpots.setdefault((row["model"], row["batch"], row["context"]), {}).setdefault(arm, []).append(row["tpot_ms"])
    out = []
    for (model, batch, context), arms in tpots.items():
        base, var = statistics.median(arms["baseline"]), statistics.median(arms["variant"])
        out.append({"model": model, "batch": batch, "context": context, "baseline_ms": base, "variant_ms": var,
                    "ratio": var / base})
    return out


def main(argv: list[str] | None = None) -> int:
    args, configs, kwargs = parse(argv)
    first = next(iter(configs.values()))
    device = str(first.device_for_rank(0))
    bandwidth = (args.bandwidth_gbps * 1e9 if args.bandwidth_gbps else
                 measure_copy_bandwidth(device, 1 << (30 if first.device_type == "cuda" else 26)))
    decode_steps = args.warmup_steps + args.steps
    budgets = {m: int(args.kv_cache_gb * 1e9) if args.kv_cache_gb else kv_budget_bytes(cfg)
               for m, cfg in configs.items()}
    plans = {m: plan_points(cfg, args.batch, args.context, decode_steps, budgets[m]) for m, cfg in configs.items()}
    estimate = sum(estimate_s(cfg, plans[m], decode_steps, args.ttft_requests, args.prompt_len, bandwidth)
                   for m, cfg in configs.items())
    runs = sum(p.skip_reason is None for ps in plans.values() for p in ps)
    print(f"latency: {len(configs)} model(s), {runs} of {sum(map(len, plans.values()))} points fit, "
          f"{args.steps} timed steps each; copy bandwidth {bandwidth / 1e9:.0f} GB/s; estimated ~{estimate:.0f} s")
    out = Path(args.out) if args.out else Path("reports") / time.strftime("latency-%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    points, ttft_rows, ttft = [], [], {}
    # (label, what the pass adds) of each pass over the models: one unlabelled pass, or the A/B's
    passes = [(f"{arm} {r}", extra) for arm, r, extra in ab_passes(args.ab, args.rounds)] if args.ab else [
        ("", Variant())]
    with tqdm(total=len(passes) * sum(len(ps) + 1 for ps in plans.values()), desc="latency", unit="point",
              disable=args.no_progress) as bar:
        for label, extra in passes:
            with kernel_constants({**args.kernel_constant, **extra.constants}):
                for model, cfg in configs.items():
                    rows, requests, summary = run_model(pass_config(cfg, kwargs, extra.engine_args),
                                                        {**kwargs, **extra.engine_args}, plans[model], args,
                                                        bandwidth, bar)
                    for row in rows + requests:
                        row.update({"arm": label} if label else {})
                    ttft[f"{model} [{label}]" if label else model] = summary
                    points += rows
                    ttft_rows += requests
    actual = time.perf_counter() - t0
    config = {"models": list(configs), "batch": args.batch, "context": args.context, "steps": args.steps,
              "warmup_steps": args.warmup_steps, "ttft_requests": args.ttft_requests, "prompt_len": args.prompt_len,
              "engine_args": kwargs, "kernel_constants": args.kernel_constant, "device": device,
              "device_name": torch.cuda.get_device_name(device) if first.device_type == "cuda" else "cpu"}
    result = {"config": config, "copy_bandwidth_bytes_per_s": bandwidth, "kv_budget_bytes": budgets,
              "estimated_s": estimate, "actual_s": actual, "points": points, "ttft": ttft}
    if args.ab:
        result["ab"] = {**args.ab.record(), "rounds": args.rounds, "tpot_ratio": tpot_ratios(points)}
        for r in result["ab"]["tpot_ratio"]:
            print(f"{r['model']} B={r['batch']} ctx={r['context']}: TPOT variant / baseline {r['ratio']:.3f} "
                  f"({r['variant_ms']:.3f} vs {r['baseline_ms']:.3f} ms, medians over rounds)")
    write_outputs(out, result, points, ttft_rows)
    print(f"latency: took {actual:.1f} s (estimated ~{estimate:.0f} s); wrote {out}/latency.json, "
          f"points.parquet, ttft.parquet")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
