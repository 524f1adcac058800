"""Two-GPU microbenchmark of the tensor-parallel all-reduce paths of `engine.distributed`, bf16,
hidden 4,096: each step is llama-3-8b's down_proj GEMM at TP=2 ([B, 7,168] x [7,168, 4,096]),
then the sum over the ranks and the residual RMSNorm, either as NCCL + norm, symmetric memory
(torch's one-shot / two-shot) + norm, or the fused all-reduce + RMSNorm kernel. 64 steps, the
residual threaded through them, are captured in one CUDA graph; µs per step are printed next
to the GEMM alone. Before timing, it checks that the fused path gives the same bits as the other
two on every rank, and that the graphs' 64-step chains agree (a barrier race would show there).

    llmbench kernels bench-allreduce [--sizes 1,8,32,72,128,256,512] [--fusion push]
"""

from __future__ import annotations

import argparse
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.distributed import (
    Rendezvous,
    TensorParallel,
    close_tensor_parallel,
    init_tensor_parallel,
)
from engine.kernels.rmsnorm import rmsnorm

HIDDEN, INTER, EPS, STEPS = 4096, 7168, 1e-5, 64


def capture(step: Callable[[int], None]) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the graph
        step(0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(STEPS):
            step(i)
    return graph


def us_per_step(graph: torch.cuda.CUDAGraph, replays: int = 20) -> float:
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / replays / STEPS * 1e6


def bench_rows(tp: TensorParallel, rows: int, w_down: torch.Tensor, weight: torch.Tensor,
               seeded: Callable[[int], torch.Generator]) -> tuple[bool, dict[str, float], list]:
    """(same bits on every path and rank, us per step of each path, what the graphs read)."""
    dev, bf16 = w_down.device, w_down.dtype
    x = torch.randn(rows, INTER, device=dev, dtype=bf16, generator=seeded(1000 * rows + tp.rank))
    res0 = torch.randn(rows, HIDDEN, device=dev, dtype=bf16, generator=seeded(rows))
    chains: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (normed, residual) of the last step

    def fused(i: int) -> None:
        part = tp.partial_out(rows, HIDDEN, bf16, i % 2)  # slots alternate as in the model
        torch.mm(x, w_down.t(), out=part)
        chains["fused"] = tp.all_reduce_rmsnorm(part, chains["fused"][1] if i else res0, weight, EPS)

    def separate(name: str, reduce: Callable[[torch.Tensor], object]) -> Callable[[int], None]:
        def step(i: int) -> None:
            y = x @ w_down.t()
            reduce(y)
            chains[name] = rmsnorm(y, weight, EPS, chains[name][1] if i else res0)
        return step

    diffs: list[str] = []

    def equal(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], what: str) -> bool:
        for name, u, v in zip(("normed", "residual"), a, b):
            if not torch.equal(u, v):
                d = (u.float() - v.float()).abs()
                diffs.append(f"{what} {name}: {int((d > 0).sum())} of {d.numel()} differ, max {d.max().item():.3g}")
        return all(torch.equal(u, v) for u, v in zip(a, b))

    steps = {"gemm": lambda i: x @ w_down.t(), "nccl": separate("nccl", dist.all_reduce),
             "symm": separate("symm", tp.all_reduce), "fused": fused}
    for name in ("nccl", "symm", "fused"):  # one eager step each: the same bits everywhere
        steps[name](0)
    same = equal(chains["fused"], chains["nccl"], "eager fused/nccl")
    same &= equal(chains["fused"], chains["symm"], "eager fused/symm")
    peers = [torch.empty_like(chains["fused"][0]) for _ in range(tp.size)]
    dist.all_gather(peers, chains["fused"][0])
    if not all(torch.equal(p, peers[0]) for p in peers):
        same = False
        diffs.append("ranks' fused outputs differ")
    graphs = {name: capture(step) for name, step in steps.items()}
    outs = {name: chains.get(name) for name in graphs}  # the graphs' last residuals
    times = {name: us_per_step(g) for name, g in graphs.items()}
    same &= equal(outs["fused"], outs["symm"], "graph fused/symm")
    same &= equal(outs["fused"], outs["nccl"], "graph fused/nccl")
    if diffs:
        print(f"rank {tp.rank} B={rows}: " + "; ".join(diffs), flush=True)
    return same, times, [graphs, outs, x, res0]


def run_rank(rank: int, world: int, port: int, sizes: list[int], fusion: str) -> None:
    torch.cuda.set_device(rank)
    dev, bf16 = torch.device("cuda", rank), torch.bfloat16
    tp = init_tensor_parallel(Rendezvous(world, "cpu:gloo,cuda:nccl", 120.0, f"tcp://127.0.0.1:{port}"), rank)
    tp = tp.with_symmetric_memory(dev, bf16, 8192, HIDDEN, fusion)
    seeded = lambda seed: torch.Generator(device=dev).manual_seed(seed)  # noqa: E731
    weight = torch.empty(HIDDEN, device=dev, dtype=bf16).uniform_(0.5, 1.5, generator=seeded(1))
    w_down = torch.randn(HIDDEN, INTER, device=dev, dtype=bf16, generator=seeded(2 + rank)) / INTER ** 0.5
    ok, keep = True, []  # the graphs of every size stay alive to the end (they read their inputs)
    for rows in sizes:
        same, t, held = bench_rows(tp, rows, w_down, weight, seeded)
        ok &= same
        keep.append(held)
        if rank == 0:
            print(f"B={rows:4d} same bits: {same} | us/step gemm {t['gemm']:6.1f}  +nccl+norm {t['nccl']:6.1f}"
                  f"  +symm+norm {t['symm']:6.1f}  +fused {t['fused']:6.1f}", flush=True)
    if rank == 0:
        print("ALL SAME" if ok else "MISMATCH", flush=True)
    tp.symmetric.close()
    del keep
    close_tensor_parallel()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmbench kernels bench-allreduce", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,8,32,72,128,256,512", help="rows (decode batch sizes)")
    ap.add_argument("--fusion", default="barrier", choices=["barrier", "push"],
                    help="the fused kernel's protocol (EngineConfig.all_reduce_norm_fusion)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if torch.cuda.device_count() < 2:
        raise SystemExit("bench_allreduce needs 2 CUDA devices")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_rank, args=(2, port, [int(n) for n in args.sizes.split(",")], args.fusion),
             nprocs=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
