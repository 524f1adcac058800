"""Greedy token agreement of an 8-bit KV cache with the model-dtype cache: the bench workload's
prompts through two engines in turn, `kv_cache_dtype="auto"` and the one named, greedy, every
request `--output-len` tokens (ignore_eos).

    llmbench studies kv-agreement --model qwen3-0.6b --kv-cache-dtype fp8 --num-prompts 64 --output-len 256

Per request, the first position where the two token streams differ (the output length if none);
reported: identical requests, the median and smallest first difference, and the share of
tokens generated before each request's first difference. After a difference the streams go
separate ways, so later positions say nothing. The presets carry random weights, whose logits
are near-flat: there, differences come early and bound a real checkpoint's agreement from below.
"""

from __future__ import annotations

import argparse
import statistics

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.config_args import add_engine_args, engine_kwargs
from harness.studies import write_result
from harness.studies.throughput import free_memory, workload_requests


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmbench studies kv-agreement", description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-input-len", type=int, default=1024, help="bench prompts are U[100, this] tokens")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--json", help="write the results here")
    add_engine_args(ap.add_argument_group("engine (EngineConfig fields; --kv-cache-dtype is the one compared)"))
    return ap


def first_differences(a: list[list[int]], b: list[list[int]]) -> list[int]:
    """Per request, the first index where a and b differ, or the shorter length if none."""
    return [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), min(len(s), len(t))) for s, t in zip(a, b)]


def greedy_tokens(kwargs: dict, kv_cache_dtype: str, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    llm = LLM(**{**kwargs, "kv_cache_dtype": kv_cache_dtype})
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.shutdown()
    del llm
    free_memory()  # the second engine sizes its cache from free memory
    return tokens


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if min(args.num_prompts, args.output_len) < 1 or args.max_input_len < 100:
        ap.error("--num-prompts and --output-len must be >= 1 and --max-input-len >= 100")
    try:
        kwargs = engine_kwargs(args)
    except ValueError as e:
        ap.error(str(e))
    other = kwargs.pop("kv_cache_dtype", "auto")
    if other == "auto":
        ap.error("name the cache to compare with --kv-cache-dtype (e.g. fp8)")
    config = EngineConfig(**kwargs)
    # the bench's prompts; its output lengths are not used (every request gets --output-len)
    reqs = workload_requests("bench", args.num_prompts, args.max_input_len, 1024, config.model_config.vocab_size,
                             seed=0)
    prompts = [r.prompt_token_ids for r in reqs]
    want = greedy_tokens(kwargs, "auto", prompts, args.output_len)
    got = greedy_tokens(kwargs, other, prompts, args.output_len)
    first = first_differences(want, got)
    n, total = len(first), sum(map(len, want))
    result = {"model": config.model, "kv_cache_dtype": other, "requests": n, "output_len": args.output_len,
              "identical": sum(f == len(w) for f, w in zip(first, want)),
              "first_difference_median": statistics.median(first), "first_difference_min": min(first),
              "tokens_before_first_difference": sum(first) / total, "first_differences": first}
    print(f"{other} vs the model-dtype cache, {n} requests x {args.output_len} greedy tokens: "
          f"{result['identical']}/{n} identical; first difference at token {result['first_difference_median']} "
          f"(median), {result['first_difference_min']} (min); {result['tokens_before_first_difference']:.1%} of "
          f"tokens come before their request's first difference")
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
