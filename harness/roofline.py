"""The bytes-must-move floor of a run, for the summary's roofline_efficiency.

Decode is memory bound: every step must read every weight once and the KV of every token in
the batch. So the floor of a run is

    sum over steps that ran a batch of (weight_bytes + kv_tokens_stored * kv_bytes_per_token)

divided by the memory bandwidth (KV bytes per token: EngineConfig.kv_bytes_per_token, at the KV
cache's element size: 1 byte with kv_cache_dtype="fp8"). ``measure_copy_bandwidth`` is the project's one measurement of that
bandwidth (the roofline, harness.studies.step_profile and .latency, harness.kernels.bench_decode): a
device-to-device copy, counting the bytes read plus the bytes written. Under tensor
parallelism pass the bandwidth of all ranks together.

Prefill is compute bound instead: ``request_flops`` counts a request's matmul and attention
FLOPs, for the effective TFLOP/s of prefill-heavy runs (harness.studies.throughput).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd


def matmul_params_per_layer(mc) -> int:
    """Weights one decoder layer multiplies each token by: q, k, v, o, gate, up and down."""
    h = mc.hidden_size
    q, kv = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim
    return h * q + 2 * h * kv + q * h + 3 * h * mc.intermediate_size


def weight_bytes(mc, itemsize: int) -> int:
    """Bytes of the weights a decode step reads (a ModelConfig's shapes; the input embedding
    is a row gather, so only the LM head reads the whole vocabulary matrix)."""
    h, hd = mc.hidden_size, mc.head_dim
    q, kv = mc.num_attention_heads * hd, mc.num_key_value_heads * hd
    bias = q + 2 * kv if mc.attention_bias else 0
    norms = 2 * h + (2 * hd if mc.qk_norm else 0)
    layer = matmul_params_per_layer(mc) + bias + norms
    return (mc.num_hidden_layers * layer + h + mc.vocab_size * h) * itemsize


@dataclass(frozen=True)
class Flops:
    """Floating-point operations of a forward pass (multiply and add counted apart)."""

    linear: float  # the layers' matmuls and the LM head
    attention: float  # QK^T and PV

    @property
    def total(self) -> float:
        return self.linear + self.attention

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.linear + other.linear, self.attention + other.attention)


def request_flops(mc, prompt_len: int, output_len: int) -> Flops:
    """The useful FLOPs of one request run from scratch: every prompt token and every output
    token but the last goes through the model, n = prompt_len + output_len - 1 tokens, and each
    of the output_len samples runs the LM head once.

        linear    = 2 * n * layers * matmul_params_per_layer + 2 * output_len * hidden * vocab
        attention = 4 * layers * heads * head_dim * n (n + 1) / 2

    (causal: token i attends to i + 1 keys; QK^T and PV are 2 * head_dim FLOPs per query-key
    pair and head each). "Effective" FLOP/s divides these by wall time, so a prefix-cache hit
    counts as work done. Qwen3-0.6B at 4,096-token prompts: 881 MFLOP/token linear + 470
    attention, so 272,112 prompt tok/s is 368 TFLOP/s."""
    n = prompt_len + max(output_len, 1) - 1
    layers = mc.num_hidden_layers
    linear = 2 * n * layers * matmul_params_per_layer(mc) + 2 * output_len * mc.hidden_size * mc.vocab_size
    attention = 4 * layers * mc.num_attention_heads * mc.head_dim * n * (n + 1) / 2
    return Flops(float(linear), float(attention))


def bytes_moved(steps: pd.DataFrame, weight_bytes_per_step: int, kv_bytes_per_tok: int) -> float | None:
    """Weights once per step that ran a batch, plus the KV of every stored token of that step."""
    if steps is None or steps.empty:
        return None
    ran = steps[steps["num_scheduled_seqs"] > 0]
    if ran.empty:
        return None
    return float(len(ran) * weight_bytes_per_step + ran["kv_tokens_stored"].sum() * kv_bytes_per_tok)


def measure_copy_bandwidth(device: str, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a device-to-device copy of ``nbytes`` (read + write), best of ``repeats``.
    On CUDA each copy is timed with events (no host sync in the interval), on the CPU with
    the host clock."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch and warm-up
    best = min(_time_copy(dst, src) for _ in range(repeats))
    del src, dst
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # hand the 2 GiB back before the engine sizes its KV cache
    return 2 * nbytes / best


def _time_copy(dst, src) -> float:
    """Seconds of one dst.copy_(src)."""
    import torch

    if not src.is_cuda:
        start = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - start
    with torch.cuda.device(src.device):  # the events go on the copy's device
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
    return start.elapsed_time(end) / 1e3
