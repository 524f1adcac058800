"""Offline throughput: a workload of token-id prompts (ignore_eos) through the engine, for one or
more attention backends in the same call, and optionally HF transformers `generate` on the same
prompts in the same process.

    llmbench studies throughput                          # tiny on CPU, scaled-down workload
    llmbench studies throughput --model qwen3-0.6b --hf  # the full bench workload on a GPU (133,966 tokens)
    llmbench studies throughput --model qwen3-0.6b --workload prefill --attention-backend triton,flash_attn

Workloads: `bench` is nano-vllm's bench (seed 0, 256 requests, prompts U[100,1024], outputs
U[100,1024]); `prefill` is prefill-heavy: --num-seqs prompts of exactly --max-input-len random
tokens (128 x 4,096 on a GPU) and --max-output-len outputs (1: no decode step at all).

Output tok/s and prompt tok/s are tokens / wall time, prefill and decode included. Effective
TFLOP/s = harness.roofline.request_flops summed over the requests (linear: 2 x tokens x the
layers' matmul weights, plus the LM head per sample; attention: 4 x layers x heads x head_dim
per causal query-key pair) / wall time. --attention-backend takes a comma-separated list: each
backend gets a fresh engine, one after the other, on the same prompts. --repeat R runs each
engine R times on prompts drawn with seeds 0..R-1 (no run hits an earlier one's prefix cache)
and reports the median run by token rate (the seeds' workloads differ in length, so the run of
median wall time need not be the one of median rate); every run's rate is in the JSON.

Every other EngineConfig field is a flag (`--enforce-eager`, `--tensor-parallel-size 2`, or
`--engine-arg KEY=VALUE`); `--policy` is `--scheduling-policy`. `python -m
harness.studies.throughput` is the same command. Output is detokenized incrementally (as
`LLM.generate` does) unless --no-detokenize.

An A/B in one call (harness/kernel_constants.py): `--ab MODULE.NAME=VALUE` (kernel constants)
and/or `--ab-engine-arg KEY=VALUE` (EngineConfig fields), each repeatable, make the variant; the
baseline is the code and flags as given (with any --kernel-constant). Each of --rounds rounds
runs a fresh baseline engine, then a fresh variant engine, --repeat seeds each; printed and in
the JSON: the variant's wall time over the baseline's for every seed of every round (< 1: the
variant is faster) and their median.

    llmbench studies throughput --model qwen3-0.6b --kv-cache-dtype fp8 --repeat 3 --rounds 2 \
        --ab decode_attention.DECODE_MAXNREG_FP8=168
    llmbench studies throughput --model qwen3-0.6b --repeat 3 --ab-engine-arg max_num_batched_tokens=16384
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.config import ATTENTION_BACKENDS
from engine.config_args import add_engine_args, engine_kwargs
from harness.backends.hf import hf_model_from_config, left_pad  # the HF baseline lives there
from harness.kernel_constants import (
    Variant,
    ab_passes,
    add_kernel_constant_args,
    check_single_process,
    kernel_constants,
    parse_kernel_constants,
    parse_variant,
)
from harness.kernels.jit_watch import watch_jit
from harness.roofline import Flops, request_flops
from harness.studies import write_result
from workloads.generators import bench as bench_requests
from workloads.generators import random_dataset
from workloads.trace import TraceRequest

# (num_seqs, input length, output length) by workload, on a GPU and on the CPU
WORKLOADS = {
    "bench": {True: (256, 1024, 1024), False: (64, 256, 128)},
    "prefill": {True: (128, 4096, 1), False: (8, 256, 1)},
}


def run_hf(config: EngineConfig, prompts: list[list[int]], max_tokens: list[int], batch_size: int,
           dtype: torch.dtype, device: str) -> tuple[int, float]:
    """Static batches sorted by prompt length, left padded; counts only each request's own
    max_tokens as useful output."""
    model = hf_model_from_config(config, dtype, device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    useful = 0
    t0 = time.perf_counter()
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in batch])
        new = max(max_tokens[i] for i in batch)
        with torch.inference_mode():
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        useful += sum(max_tokens[i] for i in batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return useful, time.perf_counter() - t0


class PhaseProfiler:
    """torch.profiler over the run, one kernel table per phase: "prefill" while steps carry
    prompt tokens (the start of an offline run), "decode" after. Tracing slows the host, so
    the run's tok/s under --profile is not the figure to report; the kernel times are."""

    def __init__(self, rows: int = 20):
        self.rows, self.tables = rows, {}
        self.phase, self.prof = None, None

    def after_step(self, stats) -> None:
        phase = "prefill" if stats.num_prefill_tokens else "decode"
        if phase != self.phase and (self.phase is None or phase == "decode"):
            self._switch(phase)

    def _switch(self, phase: str | None) -> None:
        if self.prof is not None:
            torch.cuda.synchronize()
            self.prof.stop()
            self.tables[self.phase] = self.prof.key_averages().table(sort_by="cuda_time_total",
                                                                     row_limit=self.rows)
        self.phase, self.prof = phase, None
        if phase is not None:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self.prof.start()

    def finish(self) -> dict[str, str]:
        self._switch(None)
        return self.tables


def run_engine(llm: LLM, prompts, params, profile: bool = False) -> tuple[int, float, dict, list[str] | None]:
    """Run through the step API so each step's host/device split is recorded. Also returns the
    Triton specializations this process first met inside the timed run (each a compile there on a
    fresh machine; see harness.kernels.jit_watch), None where Triton cannot tell."""
    engine = llm.engine
    engine.warm_up()
    stats = []
    phases = PhaseProfiler() if profile else None
    with watch_jit() as jit:
        t0 = time.perf_counter()
        for p, sp in zip(prompts, params):
            engine.add_request(None, p, sp)
        tokens = 0
        while engine.has_unfinished_requests():
            tokens += sum(len(d.new_token_ids) for d in engine.step())
            stats.append(engine.last_step_stats)
            if phases is not None:
                phases.after_step(stats[-1])
        elapsed = time.perf_counter() - t0
    if phases is not None:
        for phase, table in phases.finish().items():
            print(f"--- kernels, {phase} steps ---\n{table}")
    if jit.seen:
        print(f"Triton met {len(jit.seen)} new kernel specializations in the timed run (this process, "
              f"driver rank): {', '.join(jit.seen)}")
    return tokens, elapsed, step_breakdown(stats), jit.seen if jit.available else None


def step_breakdown(stats) -> dict:
    """Mean per-step times (ms) for decode-only and mixed steps: host scheduling, execution
    (input prep + forward + sampling sync) and post-processing."""
    out = {}
    for kind, rows in (("decode", [s for s in stats if not s.num_prefill_tokens]),
                       ("prefill", [s for s in stats if s.num_prefill_tokens])):
        if rows:
            n = len(rows)
            out[kind] = {"steps": n, "batch_mean": round(sum(s.num_scheduled_seqs for s in rows) / n, 1),
                         **{f"{k}_ms": round(1e3 * sum(getattr(s, f"{k}_s") for s in rows) / n, 3)
                            for k in ("schedule", "execute", "postprocess")}}
    return out


def workload_requests(workload: str, num_seqs: int, input_len: int, output_len: int, vocab_size: int,
                      seed: int = 0) -> list[TraceRequest]:
    if workload == "bench":
        return bench_requests(num_seqs=num_seqs, max_input_len=input_len, max_output_len=output_len,
                              vocab_size=vocab_size, seed=seed)
    return random_dataset(input_len=input_len, output_len=output_len, range_ratio=0.0, num_prompts=num_seqs,
                          vocab_size=vocab_size, seed=seed)


def measure(llm: LLM, reqs: list[TraceRequest], detokenize: bool, profile: bool) -> dict:
    """One timed run of `reqs` through the engine: token rates and effective TFLOP/s."""
    prompts = [r.prompt_token_ids for r in reqs]
    params = [SamplingParams(temperature=0.6, max_tokens=r.max_tokens, ignore_eos=True, detokenize=detokenize)
              for r in reqs]
    tokens, elapsed, breakdown, jit_seen = run_engine(llm, prompts, params, profile=profile)
    mc = llm.engine.config.model_config
    flops = sum((request_flops(mc, len(p), sp.max_tokens) for p, sp in zip(prompts, params)), Flops(0.0, 0.0))
    prompt_tokens = sum(map(len, prompts))
    return {"output_tokens": tokens, "prompt_tokens": prompt_tokens, "engine_s": round(elapsed, 6),
            "engine_tok_s": round(tokens / elapsed, 1), "prompt_tok_s": round(prompt_tokens / elapsed, 1),
            "tflop_s": round(flops.total / elapsed / 1e12, 3), "linear_flop": flops.linear,
            "attention_flop": flops.attention, "steps": breakdown, "jit_in_timed_run": jit_seen}


def free_memory() -> None:
    """Hand a released engine's GPU memory back (its objects may sit in reference cycles)
    before the next engine, or HF, sizes itself."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        if torch.cuda.memory_allocated() > 1 << 30:  # the next engine would get a smaller KV cache
            print(f"warning: {torch.cuda.memory_allocated() / 2**30:.1f} GiB still allocated after the engine "
                  f"was released", flush=True)


def describe(backend: str, run: dict) -> str:
    return (f"engine [{backend}]: {run['output_tokens']} output tokens in {run['engine_s']:.2f} s = "
            f"{run['engine_tok_s']:,.0f} tok/s; {run['prompt_tokens']:,} prompt tokens = "
            f"{run['prompt_tok_s']:,.0f} prompt tok/s; effective {run['tflop_s']:,.1f} TFLOP/s "
            f"({run['linear_flop'] / 1e12:,.2f} linear + {run['attention_flop'] / 1e12:,.2f} attention TFLOP)")


def parse_backends(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ATTENTION_BACKENDS]
    if not names or bad:
        raise ValueError(f"--attention-backend {text!r}: give a comma-separated list of {list(ATTENTION_BACKENDS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="llmbench studies throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=list(WORKLOADS), default="bench",
                    help="bench (nano-vllm's) or prefill (prefill-heavy: equal-length prompts, short outputs)")
    ap.add_argument("--num-seqs", type=int, help="requests (default: bench 256, prefill 128; CPU: 64, 8)")
    ap.add_argument("--max-input-len", type=int,
                    help="bench: longest prompt; prefill: every prompt's length (default 1024 / 4096; CPU 256)")
    ap.add_argument("--max-output-len", type=int,
                    help="bench: longest output; prefill: every output's length (default 1024 / 1; CPU 128 / 1)")
    ap.add_argument("--attention-backend", default="auto", metavar="NAME[,NAME...]",
                    help=f"one engine per backend, in this order, on the same prompts: {', '.join(ATTENTION_BACKENDS)}")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per engine (the median is reported)")
    ap.add_argument("--hf", action="store_true", help="also run HF transformers generate on the same prompts")
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--hf-num-seqs", type=int, default=None,
                    help="run HF on the first N requests only (HF is slow; default: all)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--profile", action="store_true",
                    help="print per-phase CUDA kernel tables (torch.profiler; slows the host)")
    ap.add_argument("--no-detokenize", action="store_true",
                    help="skip incremental detokenization (default: on, as LLM.generate does)")
    add_engine_args(ap.add_argument_group("engine (EngineConfig fields)"),
                    defaults={"model": "qwen3-0.6b" if cuda else "tiny"}, skip=("attention_backend",),
                    spellings={"scheduling_policy": ("--scheduling-policy", "--policy")})
    add_kernel_constant_args(ap, "per-seed wall-time ratios")
    return ap


def run_backend(kwargs: dict, backend: str, args: argparse.Namespace, sizes: tuple[int, int, int],
                rate: str = "engine_tok_s") -> dict:
    """A fresh engine on `backend`, args.repeat timed runs, then the engine released; the
    median run by `rate` (a key of measure's result) with the run's settings."""
    cuda = torch.cuda.is_available()
    llm = LLM(**kwargs, attention_backend=backend)
    cfg = llm.engine.config
    runs = [measure(llm, workload_requests(args.workload, *sizes, cfg.model_config.vocab_size, seed=seed),
                    not args.no_detokenize, args.profile and cuda)
            for seed in range(args.repeat)]
    llm.shutdown()
    del llm  # the last reference: free_memory can then return its KV cache and graphs
    free_memory()
    median = sorted(runs, key=lambda r: r[rate])[(len(runs) - 1) // 2]
    return {"model": cfg.model, "attention_backend": backend, "kv_cache_dtype": cfg.kv_cache_dtype,
            "policy": cfg.scheduling_policy,
            "workload": args.workload, "detokenize": not args.no_detokenize, "requests": sizes[0],
            **median, "engine_s_runs": [r["engine_s"] for r in runs], "rate_runs": [r[rate] for r in runs],
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def hf_baseline(kwargs: dict, args: argparse.Namespace, sizes: tuple[int, int, int]) -> dict:
    """HF generate on the first args.hf_num_seqs prompts (seed 0), where and at the dtype the
    engine's rank 0 ran."""
    cfg = EngineConfig(**kwargs)
    reqs = workload_requests(args.workload, *sizes, cfg.model_config.vocab_size)[: args.hf_num_seqs or sizes[0]]
    prompts, max_tokens = [r.prompt_token_ids for r in reqs], [r.max_tokens for r in reqs]
    hf_tokens, hf_s = run_hf(cfg, prompts, max_tokens, args.hf_batch_size, cfg.torch_dtype, str(cfg.device_for_rank(0)))
    prompt_tokens = sum(map(len, prompts))
    print(f"HF generate (batch {args.hf_batch_size}, {len(reqs)} requests): {hf_tokens} tokens in {hf_s:.2f} s = "
          f"{hf_tokens / hf_s:,.0f} tok/s, {prompt_tokens / hf_s:,.0f} prompt tok/s")
    return {"hf_tokens": hf_tokens, "hf_s": round(hf_s, 3), "hf_tok_s": round(hf_tokens / hf_s, 1),
            "hf_prompt_tok_s": round(prompt_tokens / hf_s, 1)}


def run_ab(kwargs: dict, backend: str, args: argparse.Namespace, sizes: tuple[int, int, int], rate: str,
           constants: dict, variant: Variant) -> dict:
    """args.rounds rounds of (baseline, variant), a fresh engine each; per-seed wall-time ratios."""
    arms: dict[str, list[dict]] = {"baseline": [], "variant": []}
    for arm, round_, extra in ab_passes(variant, args.rounds):
        with kernel_constants({**constants, **extra.constants}):
            run = run_backend({**kwargs, **extra.engine_args}, backend, args, sizes, rate)
        arms[arm].append(run)
        print(f"round {round_} {arm}: {describe(backend, run)}", flush=True)
    ratios = [v / b for base, var in zip(arms["baseline"], arms["variant"])
              for b, v in zip(base["engine_s_runs"], var["engine_s_runs"])]
    median = statistics.median(ratios)
    print(f"variant {variant.record()} / baseline, wall time per seed: {' '.join(f'{r:.3f}' for r in ratios)}; "
          f"median {median:.3f} (< 1: the variant is faster)")
    return {"workload": args.workload, "ab": {**variant.record(), "rounds": args.rounds}, **arms,
            "time_ratio_per_seed": [round(r, 4) for r in ratios], "time_ratio_median": round(median, 4)}


def run_backends(kwargs: dict, backends: list[str], args: argparse.Namespace, sizes: tuple[int, int, int],
                 rate: str, constants: dict) -> dict:
    """One engine per backend in turn; with several, their rates against the first's."""
    runs = {}
    with kernel_constants(constants):
        for backend in backends:
            runs[backend] = run = run_backend(kwargs, backend, args, sizes, rate)
            print(describe(backend, run), flush=True)
    first = runs[backends[0]]
    if len(runs) == 1:
        return first
    result = {"workload": args.workload, "runs": runs,
              "ratio_vs_first": {b: round(r[rate] / first[rate], 3) for b, r in runs.items()}}
    for b in backends[1:]:
        print(f"{b} / {backends[0]}: {rate} {result['ratio_vs_first'][b]:.3f}x")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        kwargs = engine_kwargs(args)
        backends = parse_backends(args.attention_backend)
        constants = parse_kernel_constants(args.kernel_constant)
        variant = parse_variant(args)
        check_single_process({**constants, **variant.constants}, {**kwargs, **variant.engine_args})
        if variant.engine_args:
            EngineConfig(**{**kwargs, **variant.engine_args})  # a bad value fails here, not after the baseline
    except ValueError as e:
        ap.error(str(e))
    if args.repeat < 1 or args.rounds < 1:
        ap.error("--repeat and --rounds must be >= 1")
    if variant and (len(backends) > 1 or args.hf):
        ap.error("an A/B compares one backend with itself: not with several --attention-backend values or --hf")
    defaults = WORKLOADS[args.workload][torch.cuda.is_available()]
    sizes = tuple(d if v is None else v for v, d in zip((args.num_seqs, args.max_input_len, args.max_output_len),
                                                         defaults))
    # the headline rate: prompt tokens for the prefill workload, output tokens for bench
    rate = "prompt_tok_s" if args.workload == "prefill" else "engine_tok_s"
    if variant:
        result = run_ab(kwargs, backends[0], args, sizes, rate, constants, variant)
    else:
        result = run_backends(kwargs, backends, args, sizes, rate, constants)
    if constants:
        result["kernel_constants"] = constants
    if args.hf:
        hf = hf_baseline(kwargs, args, sizes)
        hf_rate = hf["hf_prompt_tok_s"] if args.workload == "prefill" else hf["hf_tok_s"]
        runs = result.get("runs", {backends[0]: result})
        hf["speedup_vs_hf"] = {b: round(r[rate] / hf_rate, 2) for b, r in runs.items()}
        result.update(hf)
        print(f"engine speed-up over HF ({rate}): {hf['speedup_vs_hf']}")
    print(json.dumps(result))
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
