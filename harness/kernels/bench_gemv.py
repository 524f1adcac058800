"""GPU microbenchmark: the small-batch skinny GEMM (engine/kernels/skinny_gemm.py) against what
it replaces (the RMSNorm kernel + cuBLAS + the SiLU * up kernel), per projection of a decoder
layer and for a chain of whole layers, at the qwen3-0.6b and llama-3-8b shapes, bf16.

    llmbench kernels bench-gemv [--models qwen3-0.6b,llama-3-8b] [--rows 1,4,16] [--ops qkv,o,gate_up,down]
                                [--configs "1,8,512,4,3;16,16,256,4,4,2" | --no-sweep] [--lm-head] [--l2-hot]
    TRITON_INTERPRET=1 llmbench kernels bench-gemv --smoke     (checks the script on a CPU)

A config is block_m,block_n,block_k,warps,stages[,split_k[,first]] (GemvConfig.parse); block_m >= 16
runs on tensor cores; `first`: the norm's rstd from a first pass over K (the old kernel) instead
of along the K loop. Without --configs each op sweeps a small built-in list around the default
(choose_config). Projections that feed a norm (o, down) may split K; the ops after them (gate_up,
qkv) then read that many fp32 partials in their norm prologue, as in the engine.

Old vs new: every op and layer chain also runs "legacy", the tile the first version of the kernel
chose (`legacy_config`: 16-row tensor-core tiles 16 features wide, the norm in a first pass), and
ops with a norm run "default+first", today's tile with the old norm pass.

Timing: a variant runs once per copy of its weights (enough copies to overflow L2 four times, as
in a step where 27 other layers pass between two reads of one weight) inside one CUDA graph,
replayed; us = graph time / copies / replays, so the gaps between kernels in a graph count as
they do in the engine's decode graph. GB/s counts weight bytes only; %copy is against a measured
device-to-device copy (read + write), ~4.28 TB/s on an H200. --l2-hot: the same launches, all on
one weight copy, so every read after the first is an L2 hit (what a kernel costs when its weights
do not come from HBM; reports/PERF.md row 47). "cublas" rows time the GEMM alone (F.linear).
Kernels compile (and are checked against the unfused result) before any capture. On sm_90+ the default config and the layer
chain are also timed with programmatic dependent launch ("+pdl", EngineConfig.fused_small_batch_pdl):
within one graph each launch then overlaps the one before it. Writes $OUT/bench_gemv.csv when OUT
is set.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from engine.kernels.gemv_config import SMEM_BUDGET, GemvConfig, GemvProblem, choose_config
from engine.kernels.rmsnorm import rmsnorm
from engine.kernels.silu_mul import silu_mul
from engine.kernels.skinny_gemm import NormIn, skinny_gemm
from engine.models.config import PRESETS, ModelConfig
from harness.kernels.bench_decode import write_csv
from harness.roofline import measure_copy_bandwidth

EPS = 1e-6


@dataclass(frozen=True)
class Op:
    """One projection of a decoder layer: weight [n, k]; `norm`: RMSNorm(x + residual) before it
    (reading the partials of `after`); `gated`: SiLU * up after it; `split_ok`: may split K."""

    name: str
    n: int
    k: int
    norm: bool = False
    gated: bool = False
    split_ok: bool = False
    after: str | None = None


def layer_ops(mc: ModelConfig) -> list[Op]:
    h, d = mc.hidden_size, mc.head_dim
    q, kv, inter = mc.num_attention_heads * d, mc.num_key_value_heads * d, mc.intermediate_size
    return [Op("qkv", q + 2 * kv, h, norm=True, after="down"), Op("o", h, q, split_ok=True),
            Op("gate_up", 2 * inter, h, norm=True, gated=True, after="o"), Op("down", h, inter, split_ok=True)]


def lm_head_op(mc: ModelConfig) -> Op:
    return Op("lm_head", mc.vocab_size, mc.hidden_size)


@dataclass(frozen=True)
class Env:
    device: str
    dtype: torch.dtype
    sms: int
    l2_bytes: int
    reps: int
    pdl: bool  # also time programmatic dependent launch (sm_90+)
    l2_hot: bool = False  # every launch reads the same weight copy (from L2 after the first)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def default_problem(env: Env, op: Op, m: int, parts: int = 1) -> GemvProblem:
    """`op` at m rows as the engine calls it, its norm reading `parts` partials."""
    item = env.dtype.itemsize
    x_bytes = (4 * parts if parts > 1 else item) + (item if op.norm else 0)
    return GemvProblem(m, op.n // 2 if op.gated else op.n, op.k, item, x_bytes, op.gated, op.split_ok)


def default_config(env: Env, op: Op, m: int, parts: int = 1) -> GemvConfig:
    return choose_config(default_problem(env, op, m, parts), env.sms)


def legacy_config(env: Env, op: Op, m: int, parts: int = 1) -> GemvConfig:
    """The tile choose_config gave before the one-pass norm (commit f05ae6d), with its norm pass:
    one row 8 x 512 on CUDA cores, more rows 16 x 16 x 128 on tensor cores with up to 4 stages in
    SMEM_BUDGET, split K while the tiles fill under half the SMs."""
    p = default_problem(env, op, m, parts)
    if m == 1:
        cfg = GemvConfig(1, 8, min(512, 1 << (p.k - 1).bit_length()), 4, 1, norm_first=True)
    else:
        cfg = GemvConfig(max(16, 1 << (m - 1).bit_length()), 16, 256 // p.itemsize, 4, 4, norm_first=True)
        while cfg.num_stages > 2 and cfg.pipelined_bytes(p) > SMEM_BUDGET:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
    tiles, split = -(-p.n_out // cfg.block_n), 1
    while p.can_split and tiles * split < env.sms // 2 and p.k // (2 * split) >= 2 * cfg.block_k:
        split *= 2
    return replace(cfg, split_k=split)


# CUDA-core tiles (block_n, block_k, warps): one row's accumulator and W tiles (this one and the
# prefetched next one or two) stay in registers, so bigger tiles need more warps; each at
# prefetch 1 and 2 (stages 1, 2)
ONE_ROW_TILES = ((4, 512, 4), (4, 1024, 4), (8, 256, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8),
                 (32, 256, 8))
FEW_ROW_TILES = ((4, 256, 4), (8, 128, 4), (8, 256, 8), (16, 128, 8))  # block_m 4
SMEM_LIMIT = 200 << 10  # tensor-core tiles past this would not launch


def sweep_configs(env: Env, op: Op, m: int, parts: int) -> list[GemvConfig]:
    """A small list around the defaults: CUDA-core tiles for one row (and a few), tensor-core tiles
    that fit shared memory; o and down also at split K 2 and 4."""
    out = []
    if m == 1:
        out += [GemvConfig(1, bn, bk, w, st) for bn, bk, w in ONE_ROW_TILES for st in (1, 2)]
    elif m <= 4:
        out += [GemvConfig(4, bn, bk, w, st) for bn, bk, w in FEW_ROW_TILES for st in (1, 2)]
    problem = default_problem(env, op, m, parts)
    dots = ((16, 32), (128, 256), (3, 5)) if m == 1 else ((16, 32, 64, 128), (128, 256), (3, 4, 6))
    out += [c for c in (GemvConfig(16, bn, bk, 4, st) for bn in dots[0] for bk in dots[1] for st in dots[2])
            if c.pipelined_bytes(problem) <= SMEM_LIMIT]
    if op.split_ok:
        out += [replace(c, split_k=s) for c in out for s in (2, 4) if op.k // s >= c.block_k]
    return out


def copies_for(env: Env, nbytes: int, cap: int = 64) -> int:
    """Weight copies whose total is 4x the L2 (at least 2), so each launch reads from HBM."""
    return 1 if not env.cuda else max(2, min(cap, math.ceil(4 * env.l2_bytes / nbytes)))


def weight_copies(env: Env, make: Callable[[], object], nbytes: int, cap: int = 64) -> list:
    """copies_for's count of weights from `make`: distinct ones, or with --l2-hot one repeated
    (the same launches a graph, every read after the first from L2)."""
    count = copies_for(env, nbytes, cap)
    return [make()] * count if env.l2_hot else [make() for _ in range(count)]


def time_per_call(env: Env, run: Callable[[], object], calls: int) -> float:
    """Seconds per launch group: `run` (which makes `calls` launches) in one CUDA graph, replayed."""
    run()  # compiles outside the capture
    if not env.cuda:
        t = time.perf_counter()
        run()
        return (time.perf_counter() - t) / calls
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(env.reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / 1e3 / env.reps / calls


class OpBench:
    """One op at m rows: its weight copies and inputs, the unfused path, fused variants."""

    def __init__(self, env: Env, op: Op, m: int, parts: int):
        self.env, self.op, self.m = env, op, m
        dev, dt = env.device, env.dtype
        self.wbytes = op.n * op.k * dt.itemsize
        self.weights = weight_copies(env, lambda: torch.randn(op.n, op.k, device=dev, dtype=dt) * op.k ** -0.5,
                                     self.wbytes)
        self.g = torch.empty(op.k, device=dev, dtype=dt).uniform_(0.5, 1.5)
        self.res = torch.randn(m, op.k, device=dev, dtype=dt)
        self.parts = torch.randn(parts, m, op.k, device=dev, dtype=torch.float32) if parts > 1 else None
        self.x = self.parts.sum(0).to(dt) if parts > 1 else torch.randn(m, op.k, device=dev, dtype=dt)
        self.want = self.unfused(self.weights[0]).float()

    def unfused(self, w: torch.Tensor) -> torch.Tensor:
        x = rmsnorm(self.x, self.g, EPS, self.res)[0] if self.op.norm else self.x
        y = F.linear(x, w)
        return silu_mul(y) if self.op.gated else y

    def fused(self, w: torch.Tensor, cfg: GemvConfig, pdl: bool = False) -> torch.Tensor:
        x = self.parts if self.parts is not None and self.op.norm else self.x
        norm = NormIn(self.g, EPS, self.res) if self.op.norm else None
        return skinny_gemm(x, w, norm=norm, gated=self.op.gated, split_ok=self.op.split_ok, config=cfg, pdl=pdl)[0]

    def error(self, cfg: GemvConfig, pdl: bool = False) -> float:
        y = self.fused(self.weights[0], cfg, pdl).float()
        y = y.sum(0) if y.dim() == 3 else y
        return ((y - self.want).norm() / self.want.norm()).item()

    def time(self, fn: Callable[[torch.Tensor], object]) -> float:
        return time_per_call(self.env, lambda: [fn(w) for w in self.weights], len(self.weights))


def op_rows(env: Env, model: str, op: Op, m: int, parts: int, configs: list[GemvConfig] | None,
            copy_gbs: float) -> list[dict]:
    b = OpBench(env, op, m, parts)
    default = default_config(env, op, m, parts)
    swept = configs if configs is not None else sweep_configs(env, op, m, parts)
    variants = [(default, False, "default")] + ([(default, True, "default+pdl")] if env.pdl else [])
    variants += [(legacy_config(env, op, m, parts), False, "legacy")]
    variants += [(replace(default, norm_first=True), False, "default+first")] if op.norm else []
    variants += [(c, False, "sweep") for c in swept if c != default and (c.split_k == 1 or op.split_ok)]
    rows = []
    for name, fn in (("unfused", b.unfused), ("cublas", lambda w: F.linear(b.x, w))):
        s = b.time(fn)
        rows.append(dict(model=model, op=op.name, M=m, parts=parts, variant=name, config="", us=s * 1e6,
                         GBps=b.wbytes / s / 1e9, frac_copy=b.wbytes / s / 1e9 / copy_gbs, rel_err=0.0))
    for cfg, pdl, name in variants:
        try:
            err = b.error(cfg, pdl)
            s = b.time(lambda w, cfg=cfg, pdl=pdl: b.fused(w, cfg, pdl))
        except Exception as e:  # noqa: BLE001 - a tile that does not compile or fit: report, go on
            print(f"  {model} {op.name} M{m} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        rows.append(dict(model=model, op=op.name, M=m, parts=parts, variant=name, config=config_text(cfg),
                         us=s * 1e6, GBps=b.wbytes / s / 1e9, frac_copy=b.wbytes / s / 1e9 / copy_gbs, rel_err=err))
    return rows


def config_text(c: GemvConfig) -> str:
    return c.text()


def chain_rows(env: Env, model: str, mc: ModelConfig, m: int, copy_gbs: float) -> list[dict]:
    """Whole layers back to back (attention left out: a fixed tensor stands in for its output):
    norm + qkv, o, norm + gate_up + SiLU * up, down, fused (4 kernels, partials passed on) vs
    unfused (7), per layer."""
    ops = {op.name: op for op in layer_ops(mc)}
    dev, dt = env.device, env.dtype
    layer_bytes = sum(op.n * op.k for op in ops.values()) * dt.itemsize
    layers = weight_copies(env, lambda: {name: torch.randn(op.n, op.k, device=dev, dtype=dt) * op.k ** -0.5
                                         for name, op in ops.items()}, layer_bytes, cap=16)
    g = torch.empty(mc.hidden_size, device=dev, dtype=dt).uniform_(0.5, 1.5)
    h0 = torch.randn(m, mc.hidden_size, device=dev, dtype=dt)
    attn_out = torch.randn(m, ops["o"].k, device=dev, dtype=dt)

    def fused(pdl: bool = False, cfg: dict[str, GemvConfig] | None = None) -> torch.Tensor:
        cfg = cfg or {}  # None per op: the engine's default (choose_config)
        h, res = h0, h0
        for w in layers:
            skinny_gemm(h, w["qkv"], norm=NormIn(g, EPS, res), pdl=pdl, config=cfg.get("qkv"))
            o = skinny_gemm(attn_out, w["o"], split_ok=True, pdl=pdl, config=cfg.get("o"))[0]
            act, res = skinny_gemm(o, w["gate_up"], norm=NormIn(g, EPS, res), gated=True, pdl=pdl,
                                   config=cfg.get("gate_up"))
            h = skinny_gemm(act, w["down"], split_ok=True, pdl=pdl, config=cfg.get("down"))[0]
        return h

    def unfused() -> torch.Tensor:
        h, res = h0, h0
        for w in layers:
            x, res = rmsnorm(h, g, EPS, res)
            F.linear(x, w["qkv"])
            x, res = rmsnorm(F.linear(attn_out, w["o"]), g, EPS, res)
            h = F.linear(silu_mul(F.linear(x, w["gate_up"])), w["down"])
        return h

    rows = []
    legacy = {name: legacy_config(env, ops[name], m) for name in ("o", "down")}
    legacy |= {name: legacy_config(env, ops[name], m, legacy[ops[name].after].split_k) for name in ("qkv", "gate_up")}
    variants = [("unfused", unfused, 7), ("fused", fused, 4), ("fused-legacy", lambda: fused(cfg=legacy), 4)]
    variants += [("fused+pdl", lambda: fused(pdl=True), 4)] if env.pdl else []
    for name, fn, kernels in variants:
        try:
            s = time_per_call(env, fn, len(layers))
        except Exception as e:  # noqa: BLE001 - e.g. the legacy tile does not fit shared memory at many rows
            print(f"  {model} layer M{m} {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        rows.append(dict(model=model, op="layer", M=m, parts=0, variant=name, config=f"{kernels} kernels",
                         us=s * 1e6, GBps=layer_bytes / s / 1e9, frac_copy=layer_bytes / s / 1e9 / copy_gbs,
                         rel_err=float("nan")))
    return rows


def print_summary(rows: list[dict], copy_gbs: float, l2_hot: bool = False) -> None:
    print(f"\ncopy BW {copy_gbs:.0f} GB/s. us per launch (weights from {'L2' if l2_hot else 'HBM'}); "
          "%copy = weight GB/s / copy BW; fused = the default config (layer: 4 kernels vs 7); "
          "+pdl = the same launched as programmatic dependents; legacy = the first kernel's tile and norm pass; "
          "cuBLAS = the GEMM alone")
    print(f"{'model':<11} {'op':<8} {'M':>3} {'parts':>5} | {'unfused':>8} {'%copy':>6} {'cuBLAS':>8} | "
          f"{'fused':>8} {'%copy':>6} {'err':>7} | {'+pdl':>8} | {'legacy':>8} | {'best':>8} {'%copy':>6}  "
          "best config (bm,bn,bk,warps,stages,split[,first]) [variant]")
    for key in dict.fromkeys((r["model"], r["op"], r["M"]) for r in rows):
        rs = [r for r in rows if (r["model"], r["op"], r["M"]) == key]
        base = next(r for r in rs if r["variant"] == "unfused")
        gemm = next((f"{r['us']:>8.2f}" for r in rs if r["variant"] == "cublas"), f"{'-':>8}")
        fused = [r for r in rs if r["variant"] not in ("unfused", "cublas")]
        if not fused:
            continue
        d = next((r for r in fused if r["variant"] in ("default", "fused")), fused[0])
        pdl = next((f"{r['us']:>8.2f}" for r in fused if r["variant"].endswith("+pdl")), f"{'-':>8}")
        old = next((f"{r['us']:>8.2f}" for r in fused if "legacy" in r["variant"]), f"{'-':>8}")
        best = min(fused, key=lambda r: r["us"])
        print(f"{key[0]:<11} {key[1]:<8} {key[2]:>3} {base['parts']:>5} | {base['us']:>8.2f} "
              f"{100 * base['frac_copy']:>5.1f}% {gemm} | {d['us']:>8.2f} {100 * d['frac_copy']:>5.1f}% "
              f"{max(r['rel_err'] for r in fused):>7.1e} | {pdl} | {old} | {best['us']:>8.2f} "
              f"{100 * best['frac_copy']:>5.1f}%  "
              f"{best['config']} [{best['variant']}]")


SMOKE_MODEL = ModelConfig(architecture="qwen3", vocab_size=300, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmbench kernels bench-gemv", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen3-0.6b,llama-3-8b", help="presets, comma-separated")
    ap.add_argument("--rows", default="1,4,16", help="M values (tokens in the step), comma-separated")
    ap.add_argument("--ops", default="qkv,o,gate_up,down", help="projections to time one by one")
    ap.add_argument("--configs", help="';'-separated GEMV configs to time instead of the built-in sweep")
    ap.add_argument("--no-sweep", action="store_true", help="only the default config (and the chains)")
    ap.add_argument("--lm-head", action="store_true", help="also the LM head (plain GEMM, fused vs cuBLAS)")
    ap.add_argument("--l2-hot", action="store_true",
                    help="every launch reads one weight copy (L2-resident) instead of copies that overflow L2")
    ap.add_argument("--reps", type=int, default=20, help="graph replays per timing")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape in fp32 (CPU: with TRITON_INTERPRET=1)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not (args.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
        sys.exit("bench_gemv needs a CUDA device (or --smoke with TRITON_INTERPRET=1)")
    try:
        configs = [GemvConfig.parse(c) for c in args.configs.split(";")] if args.configs else None
        rows_m = [int(v) for v in args.rows.split(",")]
    except ValueError as e:
        sys.exit(f"bench_gemv: {e}")
    configs = [] if args.no_sweep else configs
    models = {"smoke": SMOKE_MODEL} if args.smoke else {name: PRESETS[name] for name in args.models.split(",")}
    props = torch.cuda.get_device_properties(0) if cuda else None
    env = Env("cuda" if cuda else "cpu", torch.float32 if args.smoke else torch.bfloat16,
              props.multi_processor_count if cuda else 132, props.L2_cache_size if cuda else 0, args.reps,
              cuda and props.major >= 9, args.l2_hot)
    copy_gbs = measure_copy_bandwidth(env.device, 1 << (30 if cuda else 22)) / 1e9
    print(f"{props.name if cuda else 'cpu'}: copy {copy_gbs:.0f} GB/s, {env.sms} SMs, L2 {env.l2_bytes >> 20} MiB, "
          f"{env.dtype}" + (", weights L2-resident (--l2-hot)" if env.l2_hot else ""), flush=True)
    torch.manual_seed(0)
    rows: list[dict] = []
    t0 = time.time()
    for model, mc in models.items():
        ops = {op.name: op for op in layer_ops(mc)}
        chosen = [ops[n] for n in args.ops.split(",") if n in ops] + ([lm_head_op(mc)] if args.lm_head else [])
        for m in rows_m:
            for op in chosen:
                parts = default_config(env, ops[op.after], m).split_k if op.after else 1
                rows += op_rows(env, model, op, m, parts, configs, copy_gbs)
                if cuda:
                    torch.cuda.empty_cache()  # the op's weight copies
                print(f"{model} {op.name} M{m}: done [{time.time() - t0:.0f}s]", flush=True)
            rows += chain_rows(env, model, mc, m, copy_gbs)
    write_csv(rows, "bench_gemv.csv")
    print_summary(rows, copy_gbs, env.l2_hot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
