"""Seeded workload generators. Each returns ``list[TraceRequest]`` sorted by arrival.

    generate(kind, **params) -> list[TraceRequest]     kind in GENERATORS (ValueError otherwise)
    assign_arrivals(requests, rate, burstiness, seed)  gamma inter-arrival times

Kinds:
    bench         nano-vllm's bench.py, exactly (256 requests, 142,827 prompt / 133,966 output
                  tokens with the defaults); smaller variants by parameters
    random        vLLM's random dataset: lengths uniform in [len*(1-r), len*(1+r)]
    prefix        groups of requests sharing a random prefix (exercises the prefix cache)
    long-context  a few long prompts (4k-16k tokens) with short outputs
    sharegpt-like random ids with ShareGPT's prompt/output length distribution (lognormal,
                  no dataset file needed; see sharegpt_like)
    smoke         a handful of short text prompts with greedy sampling (CPU smoke tests)

Every generator takes ``rate`` (requests/s, ``inf`` = all arrive at t=0) and ``burstiness``
(gamma shape; 1.0 = Poisson). Token-id generators take ``vocab_size``: pass the model's
vocabulary size so every id is valid.

The shipped traces in workloads/traces/ are regenerated with ``python -m workloads.generators``
(see SHIPPED_TRACES).
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from workloads.trace import TraceRequest, save_trace

BENCH_VOCAB = 10001  # bench.py draws ids with randint(0, 10000): inclusive, so 10001 values


def assign_arrivals(requests: list[TraceRequest], rate: float = math.inf, burstiness: float = 1.0,
                    seed: int = 0) -> list[TraceRequest]:
    """Set arrival_s from gamma inter-arrival times; the first request arrives at t=0.

    shape = burstiness, scale = 1 / (rate * burstiness): the mean gap is 1/rate for every
    burstiness, and the coefficient of variation is 1/sqrt(burstiness) (1.0 = Poisson,
    < 1 burstier, > 1 more regular). rate = inf puts every request at t=0 (offline throughput).
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (inf = all at once), got {rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a finite number > 0 (1.0 = Poisson), got {burstiness}")
    if math.isinf(rate):
        return [replace(r, arrival_s=0.0) for r in requests]
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    t, out = 0.0, []
    for i, req in enumerate(requests):
        # The first request starts the clock, so the run's wall time is not padded by an idle gap.
        t += rng.gammavariate(burstiness, scale) if i > 0 else 0.0
        out.append(replace(req, arrival_s=t))
    return out


def _check_range(name: str, low: int, high: int, minimum: int = 1) -> None:
    if not minimum <= low <= high:
        raise ValueError(f"{name}: need {minimum} <= min <= max, got min={low}, max={high}")


def _check_vocab(vocab_size: int) -> None:
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")


def bench(num_seqs: int = 256, max_input_len: int = 1024, max_output_len: int = 1024,
          min_input_len: int = 100, min_output_len: int = 100, vocab_size: int | None = None,
          seed: int = 0, rate: float = math.inf, burstiness: float = 1.0) -> list[TraceRequest]:
    """nano-vllm bench.py: ids U[0,10000], lengths U[100,1024], max_tokens U[100,1024], ignore_eos.

    The draws happen in bench.py's order (every prompt first, then every max_tokens) from a
    Random(seed), which yields the same numbers as ``random.seed(seed)`` + module functions.
    Ids are mapped with ``% vocab_size`` only when vocab_size <= 10000, so the default is exact.
    """
    _check_range("bench input length", min_input_len, max_input_len)
    _check_range("bench output length", min_output_len, max_output_len)
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(min_input_len, max_input_len))]
               for _ in range(num_seqs)]
    max_tokens = [rng.randint(min_output_len, max_output_len) for _ in range(num_seqs)]
    if vocab_size is not None:
        _check_vocab(vocab_size)
        if vocab_size < BENCH_VOCAB:
            prompts = [[t % vocab_size for t in p] for p in prompts]
    requests = [TraceRequest(arrival_s=0.0, max_tokens=m, prompt_token_ids=p, request_id=f"bench-{i:05d}",
                             temperature=0.6, ignore_eos=True)
                for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
    return assign_arrivals(requests, rate, burstiness, seed)


def _ratio_bounds(length: int, range_ratio: float) -> tuple[int, int]:
    # vLLM's RandomDataset: floor(len * (1 - r)) .. ceil(len * (1 + r)), both inclusive.
    return max(1, math.floor(length * (1 - range_ratio))), math.ceil(length * (1 + range_ratio))


def random_dataset(input_len: int = 1024, output_len: int = 128, range_ratio: float = 0.0,
                   num_prompts: int = 1000, vocab_size: int = 32000, seed: int = 0,
                   ignore_eos: bool = True, rate: float = math.inf,
                   burstiness: float = 1.0) -> list[TraceRequest]:
    """vLLM's random dataset: uniform lengths around input_len/output_len, random token ids.

    ignore_eos defaults to True so that output lengths are what the trace says (as in vLLM
    throughput runs); a random-weight model would otherwise stop at arbitrary points.
    """
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    _check_range("random input_len", input_len, input_len)
    _check_range("random output_len", output_len, output_len)
    _check_vocab(vocab_size)
    rng = random.Random(seed)
    in_lo, in_hi = _ratio_bounds(input_len, range_ratio)
    out_lo, out_hi = _ratio_bounds(output_len, range_ratio)
    requests = []
    for i in range(num_prompts):
        n_in, n_out = rng.randint(in_lo, in_hi), rng.randint(out_lo, out_hi)
        ids = [rng.randrange(vocab_size) for _ in range(n_in)]
        requests.append(TraceRequest(arrival_s=0.0, max_tokens=n_out, prompt_token_ids=ids,
                                     request_id=f"random-{i:05d}", ignore_eos=ignore_eos))
    return assign_arrivals(requests, rate, burstiness, seed)


def prefix(num_groups: int = 8, prefix_len: int = 512, suffix_len: int = 128, output_len: int = 128,
           num_prompts: int = 256, vocab_size: int = 32000, seed: int = 0, rate: float = math.inf,
           burstiness: float = 1.0) -> list[TraceRequest]:
    """Requests in groups that share a random prefix of prefix_len ids, each with its own suffix.

    Groups are dealt round-robin then shuffled: every group gets the same share of requests,
    and same-group requests are interleaved, so the cache must keep several prefixes alive.
    """
    _check_range("prefix num_groups", num_groups, num_prompts)
    _check_range("prefix prefix_len", prefix_len, prefix_len)
    _check_range("prefix output_len", output_len, output_len)
    if suffix_len < 0:
        raise ValueError(f"suffix_len must be >= 0, got {suffix_len}")
    _check_vocab(vocab_size)
    rng = random.Random(seed)
    prefixes = [[rng.randrange(vocab_size) for _ in range(prefix_len)] for _ in range(num_groups)]
    groups = [i % num_groups for i in range(num_prompts)]
    rng.shuffle(groups)
    requests = []
    for i, g in enumerate(groups):
        suffix = [rng.randrange(vocab_size) for _ in range(suffix_len)]
        requests.append(TraceRequest(arrival_s=0.0, max_tokens=output_len, prompt_token_ids=prefixes[g] + suffix,
                                     prefix_group=f"group-{g}", request_id=f"prefix-{i:05d}", ignore_eos=True))
    return assign_arrivals(requests, rate, burstiness, seed)


def long_context(num_prompts: int = 8, min_input_len: int = 4096, max_input_len: int = 16384,
                 output_len: int = 64, vocab_size: int = 32000, seed: int = 0, rate: float = math.inf,
                 burstiness: float = 1.0) -> list[TraceRequest]:
    """A few long prompts (lengths uniform in [min_input_len, max_input_len]), short outputs."""
    _check_range("long-context input length", min_input_len, max_input_len)
    _check_range("long-context output_len", output_len, output_len)
    _check_vocab(vocab_size)
    rng = random.Random(seed)
    requests = []
    for i in range(num_prompts):
        ids = [rng.randrange(vocab_size) for _ in range(rng.randint(min_input_len, max_input_len))]
        requests.append(TraceRequest(arrival_s=0.0, max_tokens=output_len, prompt_token_ids=ids,
                                     request_id=f"long-{i:05d}", ignore_eos=True))
    return assign_arrivals(requests, rate, burstiness, seed)


# ShareGPT-like lengths. Means: vLLM's `vllm bench serve` on ShareGPT_Vicuna_unfiltered, Llama-3.1-8B
# tokenizer, 1000 requests, reported 229,711 input and 203,068 output tokens (vllm-project/vllm
# PR #18566): 229.7 and 203.1 a request after vLLM's ShareGPT filter (prompt and output >= 4
# tokens, prompt <= 1024, prompt + output <= 2048). The spread is our choice, not a fit: sigma 1.0
# (ShareGPT's lengths are heavy-tailed: many short turns, a few pasted documents). The medians
# (171, 130) make the filtered means match: 229.5 and 203.8 over 200,000 draws.
SHAREGPT_MEDIANS = (171.0, 130.0)  # (prompt, output) tokens
SHAREGPT_SIGMA = 1.0
SHAREGPT_MIN_LEN = 4


def sharegpt_like_lengths(num_prompts: int, rng: random.Random, input_median: float = SHAREGPT_MEDIANS[0],
                          output_median: float = SHAREGPT_MEDIANS[1], sigma: float = SHAREGPT_SIGMA,
                          max_prompt_len: int = 1024, max_total_len: int = 2048) -> list[tuple[int, int]]:
    """(prompt, output) lengths: lognormal draws, redrawn until they pass vLLM's ShareGPT filter
    (both >= 4, prompt <= max_prompt_len, prompt + output <= max_total_len)."""
    if not (input_median > 0 and output_median > 0 and sigma > 0):
        raise ValueError(f"sharegpt-like: medians and sigma must be > 0, got {input_median}, {output_median}, {sigma}")
    _check_range("sharegpt-like max_prompt_len", SHAREGPT_MIN_LEN, max_prompt_len)
    _check_range("sharegpt-like max_total_len", 2 * SHAREGPT_MIN_LEN, max_total_len)
    out: list[tuple[int, int]] = []
    mu_in, mu_out = math.log(input_median), math.log(output_median)
    tries = 100 * num_prompts + 1000  # the filter keeps ~97% of draws with the defaults
    while len(out) < num_prompts and tries:
        tries -= 1
        n_in, n_out = round(rng.lognormvariate(mu_in, sigma)), round(rng.lognormvariate(mu_out, sigma))
        if min(n_in, n_out) >= SHAREGPT_MIN_LEN and n_in <= max_prompt_len and n_in + n_out <= max_total_len:
            out.append((n_in, n_out))
    if len(out) < num_prompts:
        raise ValueError(f"sharegpt-like: medians {input_median}/{output_median} rarely fit max_prompt_len="
                         f"{max_prompt_len}, max_total_len={max_total_len}; raise the limits or lower the medians")
    return out


def sharegpt_like(num_prompts: int = 256, input_median: float = SHAREGPT_MEDIANS[0],
                  output_median: float = SHAREGPT_MEDIANS[1], sigma: float = SHAREGPT_SIGMA,
                  max_prompt_len: int = 1024, max_total_len: int = 2048, vocab_size: int = 32000,
                  seed: int = 0, rate: float = math.inf, burstiness: float = 1.0) -> list[TraceRequest]:
    """A stand-in for vLLM's ShareGPT benchmark without the file: random ids, lengths from
    sharegpt_like_lengths (no request is longer than max_total_len), and ignore_eos so outputs
    have the drawn length, as vLLM's ShareGPT runs fix them to the dataset's answers."""
    _check_vocab(vocab_size)
    rng = random.Random(seed)
    lengths = sharegpt_like_lengths(num_prompts, rng, input_median, output_median, sigma, max_prompt_len,
                                    max_total_len)
    requests = []
    for i, (n_in, n_out) in enumerate(lengths):
        ids = [rng.randrange(vocab_size) for _ in range(n_in)]
        requests.append(TraceRequest(arrival_s=0.0, max_tokens=n_out, prompt_token_ids=ids,
                                     request_id=f"sharegpt-like-{i:05d}", ignore_eos=True))
    return assign_arrivals(requests, rate, burstiness, seed)


_SMOKE_SUBJECTS = ("The engine", "A paged cache", "The scheduler", "Every request", "A small model",
                   "The benchmark", "Our harness", "The GPU")
_SMOKE_VERBS = ("streams", "batches", "measures", "stores", "explains", "prefers", "counts", "reports")
_SMOKE_OBJECTS = ("tokens one at a time", "blocks of sixteen slots", "the first token latency",
                  "a story about rivers", "prime numbers below fifty", "the weather in spring")


def smoke(num_prompts: int = 16, min_tokens_out: int = 8, max_tokens_out: int = 32, seed: int = 0,
          rate: float = 4.0, burstiness: float = 1.0) -> list[TraceRequest]:
    """Short English text prompts with greedy sampling; for quick end-to-end checks on CPU."""
    _check_range("smoke max_tokens", min_tokens_out, max_tokens_out)
    rng = random.Random(seed)
    requests = []
    for i in range(num_prompts):
        text = f"{rng.choice(_SMOKE_SUBJECTS)} {rng.choice(_SMOKE_VERBS)} {rng.choice(_SMOKE_OBJECTS)}."
        requests.append(TraceRequest(arrival_s=0.0, max_tokens=rng.randint(min_tokens_out, max_tokens_out),
                                     prompt=text, request_id=f"smoke-{i:05d}", temperature=0.0))
    return assign_arrivals(requests, rate, burstiness, seed)


GENERATORS: dict[str, Callable[..., list[TraceRequest]]] = {
    "bench": bench,
    "random": random_dataset,
    "prefix": prefix,
    "long-context": long_context,
    "sharegpt-like": sharegpt_like,
    "smoke": smoke,
}


def generate(kind: str, **params) -> list[TraceRequest]:
    """Run the generator named ``kind``; unknown kinds or parameters raise ValueError."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown workload kind {kind!r}; valid kinds: {', '.join(GENERATORS)}")
    fn = GENERATORS[kind]
    allowed = list(inspect.signature(fn).parameters)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for kind {kind!r}; allowed: {', '.join(allowed)}")
    return fn(**params)


# name -> (kind, params). The tiny CPU model has a 512-token vocabulary, hence vocab_size=512.
SHIPPED_TRACES: dict[str, tuple[str, dict]] = {
    "smoke.jsonl": ("smoke", {"num_prompts": 16, "rate": 4.0}),
    "prefix_small.jsonl": ("prefix", {"num_groups": 2, "prefix_len": 64, "suffix_len": 16, "output_len": 16,
                                      "num_prompts": 16, "vocab_size": 512, "rate": 8.0}),
    "bench_tiny.jsonl": ("bench", {"num_seqs": 16, "min_input_len": 16, "max_input_len": 128,
                                   "min_output_len": 8, "max_output_len": 64, "vocab_size": 512}),
}


def write_shipped_traces(directory: str | Path = Path(__file__).parent / "traces") -> list[Path]:
    """(Re)generate the traces shipped in workloads/traces/."""
    return [save_trace(generate(kind, **params), Path(directory) / name)
            for name, (kind, params) in SHIPPED_TRACES.items()]


if __name__ == "__main__":
    for written in write_shipped_traces():
        print(written)
