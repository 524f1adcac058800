"""Microbenchmark of the one-pass sampling kernel (engine/kernels/sample.py): `gumbel_argmax` over
[B, V] logits, greedy and at a temperature, for each vocabulary-chunk size, against the chunk
size the engine picks (`chunk_size`) and the bytes of logits read.

    llmbench kernels bench-sample [--batches 1,2,4,7,16,64,128,256] [--vocab 151936] [--temperature 0.6]
    TRITON_INTERPRET=1 llmbench kernels bench-sample --smoke      (CPU check of the script)

Each point is 20 calls captured in one CUDA graph, replayed 10 times: µs per call. (do_bench
times each call from the host and measured 31-82 µs for kernels that run 4-35 µs: launch-bound,
reports/PERF.md row 35b.) Every chunk size must give the same ids (the noise is keyed by column,
not by chunk); a mismatch is an error. Writes $OUT/bench_sample.csv when OUT is set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

from engine.kernels.device_info import num_sms
from engine.kernels.sample import BLOCK, CHUNK, chunk_size, gumbel_argmax
from harness.kernels.bench_decode import write_csv

CALLS, REPLAYS = 20, 10


def graph_us(fn: Callable[[], object]) -> float:
    """µs per call of `fn`: CALLS calls in one CUDA graph, replayed REPLAYS times (CPU: one call,
    wall clock, for the smoke run)."""
    fn()  # compiles outside the capture
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (CALLS * REPLAYS)


def rows_for(batch: int, vocab: int, temperature: float, chunks: list[int], device: str,
             dtype: torch.dtype) -> list[dict]:
    """One row per chunk size at this batch; raises if two chunk sizes draw different ids."""
    gen = torch.Generator(device=device).manual_seed(batch)
    logits = (torch.randn(batch, vocab, device=device, generator=gen) * 3).to(dtype)
    temps = torch.full((batch,), temperature, device=device)
    seeds = torch.arange(batch, device=device, dtype=torch.int64) + 7
    chosen = chunk_size(batch, vocab, num_sms(logits.device))
    want = gumbel_argmax(logits, temps, seeds, chunk=chosen)
    rows = []
    for chunk in chunks:
        got = gumbel_argmax(logits, temps, seeds, chunk=chunk)
        if not torch.equal(got, want):
            raise RuntimeError(f"bench_sample: chunk {chunk} drew other ids than chunk {chosen} at batch {batch}")
        us = graph_us(lambda chunk=chunk: gumbel_argmax(logits, temps, seeds, chunk=chunk))
        rows.append(dict(B=batch, vocab=vocab, temperature=temperature, chunk=chunk, engine=chunk == chosen,
                         us=us, GBps=logits.numel() * logits.element_size() / us / 1e3))
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmbench kernels bench-sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,2,4,7,16,28,64,128,256", help="rows, comma-separated")
    ap.add_argument("--vocab", type=int, default=151_936, help="columns (qwen3's vocabulary)")
    ap.add_argument("--temperature", type=float, default=0.6, help="> 0; greedy rows are timed too")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in fp32 (CPU: with TRITON_INTERPRET=1)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not (args.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
        sys.exit("bench_sample needs a CUDA device (or --smoke with TRITON_INTERPRET=1)")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        sys.exit(f"bench_sample: --batches takes comma-separated integers, got {args.batches!r}")
    if args.temperature <= 0 or min(batches) < 1 or args.vocab < 1:
        sys.exit("bench_sample: --temperature must be > 0, batches and --vocab >= 1")
    if args.smoke:
        batches, vocab, chunks, dtype = [1, 3], 3000, [1000, BLOCK], torch.float32
    else:
        vocab, chunks, dtype = args.vocab, [BLOCK, 4096, CHUNK], torch.bfloat16
    device = "cuda" if cuda else "cpu"
    rows = []
    for temperature in (args.temperature, 0.0):
        for b in batches:
            rows += rows_for(b, vocab, temperature, chunks, device, dtype)
            shown = "  ".join(f"{r['chunk']}: {r['us']:7.1f}{'*' if r['engine'] else ' '}" for r in rows[-len(chunks):])
            print(f"T={temperature:<4} B={b:<4} us by chunk ({shown})  [* = the engine's]", flush=True)
    write_csv(rows, "bench_sample.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
