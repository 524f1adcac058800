"""Offline throughput: nano-vllm's bench workload (seed 0, token-id prompts, ignore_eos) through
the engine, and optionally HF transformers `generate` on the same prompts in the same process.

    llmbench studies throughput                          # tiny on CPU, scaled-down workload
    llmbench studies throughput --model qwen3-0.6b --hf  # the full workload on a GPU (133,966 tokens)

Throughput = output tokens / wall time, prefill included. Every EngineConfig field is a flag
(`--enforce-eager`, `--tensor-parallel-size 2`, or `--engine-arg KEY=VALUE`); `--policy` is
`--scheduling-policy`. `python -m harness.studies.throughput` is the same command. Output is detokenized
incrementally (as `LLM.generate` does) unless --no-detokenize.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.config_args import add_engine_args, engine_kwargs
from harness.backends.hf import hf_model_from_config, left_pad  # the HF baseline lives there
from harness.kernels.jit_watch import watch_jit
from harness.studies import write_result
from workloads.generators import bench as bench_requests


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


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="llmbench studies throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-seqs", type=int, default=256 if cuda else 64)
    ap.add_argument("--max-input-len", type=int, default=1024 if cuda else 256)
    ap.add_argument("--max-output-len", type=int, default=1024 if cuda else 128)
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
                    defaults={"model": "qwen3-0.6b" if cuda else "tiny"},
                    spellings={"scheduling_policy": ("--scheduling-policy", "--policy")})
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        kwargs = engine_kwargs(args)
    except ValueError as e:
        ap.error(str(e))
    cuda = torch.cuda.is_available()
    llm = LLM(**kwargs)
    cfg = llm.engine.config
    reqs = bench_requests(num_seqs=args.num_seqs, max_input_len=args.max_input_len,
                          max_output_len=args.max_output_len, vocab_size=cfg.model_config.vocab_size)
    prompts = [r.prompt_token_ids for r in reqs]
    detokenize = not args.no_detokenize
    params = [SamplingParams(temperature=0.6, max_tokens=r.max_tokens, ignore_eos=True, detokenize=detokenize)
              for r in reqs]
    tokens, elapsed, breakdown, jit_seen = run_engine(llm, prompts, params, profile=args.profile and cuda)
    result = {"model": cfg.model, "policy": cfg.scheduling_policy, "detokenize": detokenize, "requests": len(reqs),
              "output_tokens": tokens, "engine_s": round(elapsed, 3), "engine_tok_s": round(tokens / elapsed, 1),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "steps": breakdown,
              "jit_in_timed_run": jit_seen}
    mode = "on" if detokenize else "off"
    print(f"engine ({cfg.scheduling_policy}, detokenize {mode}): {tokens} tokens in {elapsed:.2f} s = "
          f"{tokens / elapsed:,.0f} tok/s")
    if args.hf:
        # HF runs where the engine's rank 0 ran, at the engine's dtype
        dtype, device = cfg.torch_dtype, str(cfg.device_for_rank(0))
        llm.shutdown()
        del llm
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        n = args.hf_num_seqs or len(prompts)
        hf_tokens, hf_s = run_hf(cfg, prompts[:n], [p.max_tokens for p in params[:n]], args.hf_batch_size,
                                 dtype, device)
        result.update(hf_tokens=hf_tokens, hf_s=round(hf_s, 3), hf_tok_s=round(hf_tokens / hf_s, 1),
                      speedup_vs_hf=round((tokens / elapsed) / (hf_tokens / hf_s), 2))
        print(f"HF generate (batch {args.hf_batch_size}, {n} requests): {hf_tokens} tokens in {hf_s:.2f} s = "
              f"{hf_tokens / hf_s:,.0f} tok/s; engine speed-up {result['speedup_vs_hf']}x")
    print(json.dumps(result))
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
