"""The flagship's per-model settings in one place (harness/studies/flagship.py runs them), and an
estimate of each sweep's duration from the throughputs measured so far.

A plan sizes every sweep for one model: the KV cache every engine backend gets (small enough
that the policies bind: continuous preempts, static batches stay well under max_num_seqs),
the workloads' request counts, and ``pieces``: groups of sweeps that each fit one device call
of under ~8 minutes (`llmbench flagship --model M --only PIECE --out DIR`).

The estimate, per run: offline, output tokens / the backend's tok/s; at a rate, the longer of
the arrival span (requests / rate) and that. Plus each backend's build (weights, CUDA graphs;
a served backend's server and its engine) once per sweep, and again per point for the served
backend (its reset is a restart). The tok/s figures are the bench workload's at the plan's KV
size, used for every workload: a rough guide for splitting the work, not a prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

RANDOM_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # of the continuous engine's offline rate
FLAGSHIP_KV_BLOCKS = 2048  # qwen3-0.6b: 32,768 token slots, about 29 bench requests' static reservations


@dataclass(frozen=True)
class ModelPlan:
    model: str
    kv_blocks: int  # every engine backend (in process and served) gets exactly these
    bench: dict[str, Any]  # workload parameters (workloads/generators.py)
    random: dict[str, Any]
    prefix: dict[str, Any]
    sharegpt: dict[str, Any]
    hf_requests: int  # the bench subset HF generate runs, in one batch
    pieces: tuple[tuple[str, ...], ...]  # sweep labels per device call, in run order
    tok_s: dict[str, float]  # backend -> output tok/s, for the estimate
    build_s: dict[str, float]  # backend -> seconds to build one, for the estimate
    fractions: tuple[float, ...] = RANDOM_FRACTIONS
    served_workers: int = 4  # client processes of the served rows (harness/backends/openai.py)
    device: str = "one H200"  # where the tok_s and build_s figures hold
    engine_args: dict[str, Any] = field(default_factory=dict)  # for every engine backend


# qwen3-0.6b on one H200: tok/s from the 2026-12-01 gate runs (continuous/static 1.14x at 2,048
# blocks) and the H100 flagship's ratios; the whole H100 flagship took 340 s.
QWEN = ModelPlan(
    model="qwen3-0.6b", kv_blocks=FLAGSHIP_KV_BLOCKS,
    bench={},  # nano-vllm's whole bench workload: 256 requests, 133,966 output tokens
    random={"num_prompts": 256, "input_len": 512, "output_len": 256, "range_ratio": 0.5},
    prefix={"num_groups": 8, "prefix_len": 512, "suffix_len": 128, "output_len": 128, "num_prompts": 256},
    sharegpt={"num_prompts": 256},
    hf_requests=32,
    pieces=(("bench", "random", "random-bursty"),
            ("prefix", "prefix-nocache", "sharegpt-like", "hf", "served-bench", "served-random")),
    tok_s={"engine": 9500, "static": 8300, "static-max": 5000, "served": 9200, "hf": 280},
    build_s={"engine": 8, "static": 8, "static-max": 8, "served": 20, "hf": 10},
)

# llama-3-8b (16 GB of bf16 weights: a decode step is weight-bound at small batches). tok/s from
# the first look on one H200 (bench, 128 requests, 2,048 blocks, max_model_len 2,048):
# continuous 4,227 (mean batch 29.8, 83 preemptions), static 2,443, static-max 1,484. Request
# counts halved (bench, random) so every sweep fits a device call.
LLAMA = ModelPlan(
    model="llama-3-8b", kv_blocks=2048,
    bench={"num_seqs": 128},
    random={"num_prompts": 128, "input_len": 512, "output_len": 256, "range_ratio": 0.5},
    prefix={"num_groups": 8, "prefix_len": 512, "suffix_len": 128, "output_len": 128, "num_prompts": 256},
    sharegpt={"num_prompts": 256},
    hf_requests=32,
    pieces=(("bench", "prefix", "prefix-nocache"), ("random", "random-bursty"),
            ("sharegpt-like", "served-bench", "served-random"), ("hf",)),
    tok_s={"engine": 4227, "static": 2443, "static-max": 1484, "served": 4100, "hf": 220},
    build_s={"engine": 25, "static": 25, "static-max": 25, "served": 45, "hf": 30},
)

# The tiny preset on a CPU: every sweep at toy size in well under a minute (a dry run; the tests).
TINY = ModelPlan(
    model="tiny", kv_blocks=48,
    bench={"num_seqs": 12, "min_input_len": 8, "max_input_len": 32, "min_output_len": 4, "max_output_len": 24},
    random={"num_prompts": 12, "input_len": 24, "output_len": 8},
    prefix={"num_groups": 2, "prefix_len": 32, "suffix_len": 8, "output_len": 4, "num_prompts": 24},
    sharegpt={"num_prompts": 12, "input_median": 16, "output_median": 8, "sigma": 0.5, "max_prompt_len": 64,
              "max_total_len": 96},
    hf_requests=8, fractions=(1.0, 2.0), served_workers=1, device="a 2-core CPU",
    pieces=(("bench", "random"),
            ("random-bursty", "prefix", "prefix-nocache", "sharegpt-like", "hf", "served-bench", "served-random")),
    tok_s={"engine": 400, "static": 300, "static-max": 200, "served": 300, "hf": 500},
    build_s={"engine": 1, "static": 1, "static-max": 1, "served": 7, "hf": 1},
)

PLANS = {plan.model: plan for plan in (QWEN, LLAMA, TINY)}


def estimate_s(plan: ModelPlan, spec: Any, vocab_size: int | None) -> float:
    """Seconds a SweepSpec (harness/sweep.py) should take under this plan's figures."""
    requests = spec.workload.build(vocab_size)
    n, tokens = len(requests), sum(r.max_tokens for r in requests)
    offline_s = {b: tokens / plan.tok_s[b] for b in spec.backends}
    rates = [math.inf]
    if spec.profile == "fixed":
        rates = list(spec.profile_params["rates"])
    elif spec.profile == "sweep":
        base = spec.profile_params.get("base_rate") or n / offline_s[spec.backends[0]]
        rates += [f * base for f in spec.profile_params.get("fractions", ())]
    total = 0.0
    for b in spec.backends:
        total += plan.build_s[b] * (len(rates) if b == "served" else 1)  # a served reset restarts
        total += sum(offline_s[b] if math.isinf(r) else max(n / r, offline_s[b]) for r in rates)
    return total


def offline_rate_estimate(plan: ModelPlan, spec: Any, vocab_size: int | None) -> float:
    """Requests/s of the continuous engine on this sweep's workload, offline (for the sweeps
    whose rate comes from the random sweep, before it has run)."""
    requests = spec.workload.build(vocab_size)
    return len(requests) / (sum(r.max_tokens for r in requests) / plan.tok_s["engine"])
