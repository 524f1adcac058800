"""H100 microbenchmark: split-K decode and unified attention, bf16, Qwen3-0.6B layer shape.

Run on the GPU machine:  llmbench kernels bench-decode [--llama-tp | --fused | --ragged | --mid | --prefill | --kv-dtype fp8]
CPU check of the script: TRITON_INTERPRET=1 llmbench kernels bench-decode --smoke [--llama-tp | --fused | --ragged | --mid | --prefill | --kv-dtype fp8]
(`python -m harness.kernels.bench_decode` is the same command.)
--llama-tp: llama-3-8b's per-rank attention shapes at TP=1 and TP=2 instead (see llama_tp_rows).
--fused: the fused small-batch decode kernel (rotary, KV store and split merge inside) against
the kernels it replaces, per layer of a captured 28-layer chain (see fused_rows).
--ragged: bench-like mixed lengths at 16-256 sequences and 1-16 splits, programs in batch order
and longest first (the `order` the engine passes with one split), 3 rounds each (see ragged_rows).
--prefill: only the unified kernel's prefill cases (the bench's prompt lengths, 4 x 2,048, 8 x 512,
a prefix hit, a mixed step) at each large tile, the engine's default first.
--kv-dtype fp8: decode on a bf16 cache and on an fp8 (e4m3) cache of the same values, same shapes:
us, GB/s of KV read at each element size and the speedup (see kv_dtype_rows).
--tiles '128,4,5;128,4,5,168': the decode tiles to time (BLOCK_N, warps, stages[, a register cap
a thread]) instead of the plan's (the default mode, --kv-dtype, --llama-tp; --ragged: each at the
engine's split count and order); tiles that do not fit shared memory are skipped in --kv-dtype.
--ragged --kv-dtype fp8: the mixed-length cases over an fp8 cache.
--mid: 16-136 sequences of uniform length (qwen's and llama's heads), every tile x 1-8 splits,
each timed in a CUDA graph that runs 4 layers' caches in turn: no L2 reuse between calls and no
flush, which timed the engine's 64 x 656 decode kernel as its own profile did (see mid_rows).
Writes $OUT/bench_decode.csv when OUT is set; prints a compact table last.

Decode bytes = K+V of every context token (Hkv x D x 2 B each) + q read + out written; split
scratch traffic is not counted, so it shows up as lost efficiency. The roof is a measured
device-to-device copy (bytes read + written). do_bench flushes L2 before every repetition, so
small shapes are timed cold, as in a real step where 27 other layers pass between reads.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass, replace
from functools import partial

import torch
import triton
import triton.testing

from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_backend import dequantize_ref, paged_attention_ref
from engine.dtypes import KV_CACHE_DTYPES
from engine.kernels.decode_attention import (
    alloc_decode_scratch,
    choose_num_splits,
    decode_attention,
    default_tile,
)
from engine.kernels.unified_attention import unified_attention
from harness.roofline import measure_copy_bandwidth

HQ, HKV, D = 16, 8, 128
Tile = tuple[int, ...]  # decode (BLOCK_N, num_warps, num_stages[, registers a thread at most])
Cfg = tuple[int, int, int, int]  # unified large tile (BLOCK_M, BLOCK_N, num_warps, num_stages)
# name: (context lengths, query lengths) for the unified kernel
Prefill = dict[str, tuple[list[int], list[int]]]


@dataclass(frozen=True)
class Plan:
    device: str
    dtype: torch.dtype
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    block_sizes: tuple[int, ...]
    decode_tiles: tuple[Tile, ...]  # the first is the default
    prefill_cfgs: tuple[Cfg, ...]  # the first is the default
    prefill: Prefill
    smoke: bool = False  # tiny shapes for the interpreter: every mode scales itself down


def bench_prompt_lens(n: int = 14, seed: int = 0) -> list[int]:
    """n prompt lengths as the bench workload draws them (U[100, 1,024]): ~8k tokens, one of
    its prefill steps."""
    return torch.randint(100, 1025, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


FULL = Plan(
    "cuda", torch.bfloat16, (1, 16, 64, 256), (256, 1024, 2048), (16, 64, 256),
    ((128, 4, 2), (64, 4, 2), (32, 4, 2), (64, 4, 3), (128, 8, 2)),
    ((64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3)),
    {"bench_prompts_14": (bench_prompt_lens(), bench_prompt_lens()),
     "prefill_4x2048": ([2048] * 4, [2048] * 4),
     "prefill_8x512": ([512] * 8, [512] * 8),
     "prefix_hit_8x128_on_1536": ([1664] * 8, [128] * 8),
     "mixed_512+128dec_1k": ([512] + [1024] * 128, [512] + [1] * 128)},
)
SMOKE = Plan(  # checks the script itself in the interpreter: tiny shapes, fp32
    "cuda" if torch.cuda.is_available() else "cpu", torch.float32, (1, 3), (40,), (16,),
    ((64, 4, 2), (32, 4, 2)), ((32, 32, 4, 2),),
    {"prefill_2x20": ([20, 33], [20, 33]), "mixed": ([30, 40], [1, 20])}, smoke=True,
)


@dataclass
class Batch:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, bs, Hkv, D]
    v_cache: torch.Tensor
    meta: AttentionMetadata
    ref: torch.Tensor  # [T, Hq, D] fp32 torch reference


def make_batch(plan: Plan, ctx_lens: list[int], q_lens: list[int], bs: int,
               heads: tuple[int, int] = (HQ, HKV)) -> Batch:
    """Random cache holding exactly the blocks the batch needs, in shuffled order; heads = (Hq, Hkv)."""
    hq, hkv = heads
    dev, need = plan.device, [triton.cdiv(c, bs) for c in ctx_lens]
    ids = (torch.randperm(sum(need)) + 1).to(torch.int32)  # block 0 stays the null block
    table = torch.zeros(len(ctx_lens), max(need), dtype=torch.int32)
    for i, n in enumerate(need):
        table[i, :n] = ids[sum(need[:i]):sum(need[:i]) + n]
    kc = torch.randn(1 + sum(need), bs, hkv, D, device=dev, dtype=plan.dtype)
    vc = torch.randn_like(kc)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], hq, D, device=dev, dtype=plan.dtype)
    meta = AttentionMetadata(
        torch.full((qsl[-1],), -1, dtype=torch.int64, device=dev),
        torch.tensor(qsl, dtype=torch.int32, device=dev),
        torch.tensor(ctx_lens, dtype=torch.int32, device=dev), table.to(dev),
        max(q_lens), max(ctx_lens), qsl, list(ctx_lens))
    ref = paged_attention_ref(q.float(), kc.float(), vc.float(), meta, D ** -0.5)
    return Batch(q, kc, vc, meta, ref)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def bench_ms(fn, plan: Plan) -> float:
    if plan.device != "cuda":  # smoke run: one call, host clock
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def tile_args(tile: Tile) -> dict:
    """decode_attention's keyword arguments for a tile."""
    return dict(block_n=tile[0], num_warps=tile[1], num_stages=tile[2], max_registers=tile[3] if len(tile) > 3 else None)


def tile_fields(tile: Tile) -> dict:
    """A tile as CSV row fields (maxnreg 0: the compiler's choice, or the engine's default cap on fp8)."""
    return dict(block_n=tile[0], warps=tile[1], stages=tile[2], maxnreg=tile[3] if len(tile) > 3 else 0)


def decode_rows(plan: Plan, bsz: int, ctx: int, bs: int, copy_gbs: float, scratch) -> list[dict]:
    b = make_batch(plan, [ctx] * bsz, [1] * bsz, bs)
    out = torch.empty_like(b.q)
    auto = choose_num_splits(bsz, HKV, ctx)
    nbytes = bsz * ctx * HKV * D * 2 * b.q.element_size() + 2 * b.q.numel() * b.q.element_size()
    variants = [(t, auto) for t in plan.decode_tiles]
    extra = sorted({1, max(1, auto // 2), min(16, 2 * auto)} - {auto})
    variants += [(plan.decode_tiles[0], s) for s in extra]
    rows = []
    for tile, splits in variants:
        run = partial(decode_attention, b.q, b.k_cache, b.v_cache, out, b.meta.seq_lens,
                      b.meta.block_tables, D ** -0.5, splits, scratch, check=False, **tile_args(tile))
        out.fill_(float("nan"))  # every variant must write every element
        run()
        err = rel_err(out, b.ref)
        ms = bench_ms(run, plan)
        gbs = nbytes / ms / 1e6
        rows.append(dict(kernel="decode", B=bsz, ctx=ctx, bs=bs, block_m=16, **tile_fields(tile),
                         splits=splits, default=not rows, us=ms * 1e3,
                         GBps=gbs, TFLOPs=float("nan"), frac_copy=gbs / copy_gbs, rel_err=err))
    return rows


def prefill_rows(plan: Plan, name: str, ctx_lens: list[int], q_lens: list[int], bs: int,
                 cfgs: tuple[Cfg, ...], heads: tuple[int, int] = (HQ, HKV)) -> list[dict]:
    """Unified kernel; TFLOP/s counts causal QK and PV (4 x D x Hq per query-key pair)."""
    b = make_batch(plan, ctx_lens, q_lens, bs, heads)
    m, out = b.meta, torch.empty_like(b.q)
    pairs = sum(n * (c - n) + n * (n + 1) // 2 for c, n in zip(ctx_lens, q_lens))
    rows = []
    for i, cfg in enumerate(cfgs):
        run = partial(unified_attention, b.q, b.k_cache, b.v_cache, out, m.query_start_loc,
                      m.seq_lens, m.block_tables, m.max_query_len, m.max_seq_len, D ** -0.5,
                      check=False, large_cfg=cfg)
        out.fill_(float("nan"))
        run()
        err = rel_err(out, b.ref)
        ms = bench_ms(run, plan)
        rows.append(dict(kernel=f"unified:{name}", B=len(q_lens), ctx=max(ctx_lens), bs=bs,
                         heads=f"{heads[0]}/{heads[1]}", block_m=cfg[0], block_n=cfg[1], warps=cfg[2],
                         stages=cfg[3], splits=1,
                         default=i == 0, us=ms * 1e3, GBps=float("nan"),
                         TFLOPs=4 * D * heads[0] * pairs / ms / 1e9, frac_copy=float("nan"), rel_err=err))
    return rows


def print_table(copy_gbs: float, rows: list[dict]) -> None:
    print(f"\ncopy BW {copy_gbs:.0f} GB/s (read+write). decode default = first tile, auto splits; "
          "best = fastest variant; maxerr over all variants")
    print(f"{'B':>4} {'ctx':>5} {'bs':>4} {'sp':>3} {'us':>8} {'GB/s':>6} {'%copy':>6} | "
          f"{'best us':>8} {'%copy':>6} {'maxerr':>8}  best (BLOCK_N,warps,stages,splits)")
    dec = [r for r in rows if r["kernel"] == "decode"]
    for shape in dict.fromkeys((r["B"], r["ctx"], r["bs"]) for r in dec):
        rs = [r for r in dec if (r["B"], r["ctx"], r["bs"]) == shape]
        d, best = rs[0], min(rs, key=lambda r: r["us"])
        print(f"{shape[0]:>4} {shape[1]:>5} {shape[2]:>4} {d['splits']:>3} {d['us']:>8.1f} "
              f"{d['GBps']:>6.0f} {100 * d['frac_copy']:>5.1f}% | {best['us']:>8.1f} "
              f"{100 * best['frac_copy']:>5.1f}% {max(r['rel_err'] for r in rs):>8.1e}  "
              f"({best['block_n']},{best['warps']},{best['stages']},{best['splits']})")
    print("\nunified: causal TFLOP/s; best cfg = large tile (BLOCK_M,BLOCK_N,warps,stages)")
    for name in dict.fromkeys(r["kernel"] for r in rows if r["kernel"] != "decode"):
        rs = [r for r in rows if r["kernel"] == name]
        d, best = rs[0], min(rs, key=lambda r: r["us"])
        print(f"{name:<34} default {d['us']:>8.1f} us {d['TFLOPs']:>6.1f} TF | best "
              f"{best['us']:>8.1f} us {best['TFLOPs']:>6.1f} TF ({best['block_m']},"
              f"{best['block_n']},{best['warps']},{best['stages']}) maxerr "
              f"{max(r['rel_err'] for r in rs):.1e}")


def write_csv(rows: list[dict], name: str = "bench_decode.csv") -> None:
    """The rows as $OUT/name (the device tool's output folder), when OUT is set."""
    if not os.environ.get("OUT") or not rows:
        return
    path = os.path.join(os.environ["OUT"], name)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


# Tiles for --llama-tp: (BLOCK_N, warps, stages). When a batch has fewer programs than the GPU
# holds, each program's bytes in flight (BLOCK_N x stages) bound its rate, and the longest
# sequences finish last; deeper pipelines and wider tiles test that.
LLAMA_TP_TILES = ((64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 8, 2), (128, 4, 3))


def llama_tp_rows(plan: Plan, batches: tuple[int, ...], min_ctx: int, max_ctx: int,
                  tiles: tuple[Tile, ...] | None = None) -> None:
    """llama-3-8b's decode attention per rank at TP=1 (Hq 32, Hkv 8) and TP=2 (16, 4), context
    lengths spread like `harness.studies.throughput`'s mid-run batches (U[min_ctx, max_ctx]): us and GB/s over
    the K+V bytes for each split count and tile, to see whether TP's halved program count needs
    more splits (or deeper tiles) than the engine's defaults give."""
    rng = torch.Generator().manual_seed(0)
    tiles = tiles or (plan.decode_tiles if plan.smoke else LLAMA_TP_TILES)
    for bsz in batches:
        ctx = torch.randint(min_ctx, max_ctx + 1, (bsz,), generator=rng).tolist()
        for heads in ((32, 8), (16, 4)):
            b = make_batch(plan, ctx, [1] * bsz, 16, heads)
            out, scratch = torch.empty_like(b.q), alloc_decode_scratch(bsz, heads[0], D, plan.device)
            nbytes = sum(ctx) * heads[1] * D * 2 * b.q.element_size()
            auto = choose_num_splits(bsz, heads[1], max(ctx))
            for tile in tiles:
                cells = []
                for splits in (1, 2, 3, 4):
                    run = partial(decode_attention, b.q, b.k_cache, b.v_cache, out, b.meta.seq_lens,
                                  b.meta.block_tables, D ** -0.5, splits, scratch, check=False, **tile_args(tile))
                    run()
                    err = rel_err(out, b.ref)
                    ms = bench_ms(run, plan)
                    cells.append(f"s{splits}{'*' if splits == auto else ''} {ms * 1e3:6.1f}us "
                                 f"{nbytes / ms / 1e6:5.0f}GB/s err {err:.0e}")
                print(f"Hq{heads[0]} Hkv{heads[1]} B{bsz} tile{tile}: "
                      + " | ".join(cells), flush=True)


# --fused: EngineConfig.fused_small_batch_rotary / _merge, each on and off
FUSED_VARIANTS = {"unfused": (False, False), "rotary": (True, False), "merge": (False, True), "both": (True, True)}


def _layer_inputs(plan: Plan, bsz: int, ctx: int, heads: tuple[int, int]) -> dict:
    """One layer's decode step: a raw qkv projection output [B, (Hq + 2 Hkv) D], caches holding
    ctx - 1 keys a sequence, the slots of the newest key (position ctx - 1)."""
    hq, hkv = heads
    dev, bs, need = plan.device, 16, triton.cdiv(ctx, 16)
    table = (torch.randperm(bsz * need) + 1).to(torch.int32).view(bsz, need)
    slots = table[:, (ctx - 1) // bs].long() * bs + (ctx - 1) % bs
    kc = torch.randn(1 + bsz * need, bs, hkv, D, device=dev, dtype=plan.dtype)
    return dict(qkv=torch.randn(bsz, (hq + 2 * hkv) * D, device=dev, dtype=plan.dtype), k_cache=kc,
                v_cache=torch.randn_like(kc), table=table.to(dev), slots=slots.to(dev),
                seq_lens=torch.full((bsz,), ctx, dtype=torch.int32, device=dev),
                positions=torch.full((bsz,), ctx - 1, dtype=torch.int64, device=dev))


def _attend(x: dict, heads: tuple[int, int], rotary, splits: int, scratch, on: tuple[bool, bool]) -> torch.Tensor:
    """The attention of a decode step as the fused path runs it, with the variant's kernels."""
    from engine.kernels.rope import KVStore, qk_norm_rope

    hq, hkv = heads
    bsz = x["qkv"].shape[0]
    q, k, v = (t.view(bsz, -1, D) for t in x["qkv"].split([hq * D, hkv * D, hkv * D], dim=-1))
    out = torch.empty(bsz, hq, D, device=q.device, dtype=q.dtype)
    args = (x["k_cache"], x["v_cache"], out, x["seq_lens"], x["table"], D ** -0.5, splits, scratch)
    if on[0]:
        return decode_attention(q, *args, check=False, rotary=rotary, new_kv=(k, v, x["slots"]), merge=on[1])
    q, _ = qk_norm_rope(q, k, x["positions"], rotary.cos, rotary.sin, rotary.q_weight, rotary.k_weight, rotary.eps,
                        KVStore(v, x["k_cache"], x["v_cache"], x["slots"]))
    return decode_attention(q, *args, check=False, merge=on[1])


def fused_rows(plan: Plan) -> None:
    """us a layer of the fused small-batch path's attention for each FUSED_VARIANTS entry: every
    layer of a 28-layer chain has its own qkv and caches (KV reads cold, as in a step), and the
    chain is one CUDA graph, so the gaps between kernels count as in the engine. Splits as a
    captured graph picks them (max_model_len 8192). Qwen3-0.6B (Hq 16) and Llama-3-8B (Hq 32)
    heads, q/k norm on; rel_err: each variant's last layer against the unfused one."""
    from engine.layers.norm import RMSNorm
    from engine.layers.rotary import RotaryEmbedding

    layers, batches, contexts = (2, (1, 3), (40,)) if plan.smoke else (28, (1, 4, 16), (512, 4096))
    norm = RMSNorm(D).to(plan.device, plan.dtype)
    rotary = RotaryEmbedding(D, 8192, 1e6).to(plan.device).prologue(None, norm, norm)
    for heads in ((16, 8), (32, 8)):
        for bsz in batches:
            for ctx in contexts:
                xs = [_layer_inputs(plan, bsz, ctx, heads) for _ in range(layers)]
                splits = choose_num_splits(bsz, heads[1], 8192)
                scratch = alloc_decode_scratch(bsz, heads[0], D, plan.device)
                cells, base = [], None
                for name, on in FUSED_VARIANTS.items():
                    chain = partial(_chain, xs, heads, rotary, splits, scratch, on)
                    us = _graph_us(chain, plan) / layers
                    out = chain()
                    base = out if base is None else base
                    cells.append(f"{name} {us:6.1f}us err {rel_err(out, base.float()):.0e}")
                print(f"Hq{heads[0]} B{bsz} ctx{ctx} splits{splits}: " + " | ".join(cells), flush=True)


def _chain(xs: list[dict], heads: tuple[int, int], rotary, splits: int, scratch, on: tuple[bool, bool]) -> torch.Tensor:
    """Every layer's attention in turn; the last layer's output."""
    return [_attend(x, heads, rotary._replace(positions=x["positions"]), splits, scratch, on) for x in xs][-1]


def _graph_us(fn, plan: Plan, replays: int = 20) -> float:
    """us of one fn() captured in a CUDA graph (median of `replays` replays); CPU: host clock."""
    if plan.device != "cuda":
        return bench_ms(fn, plan) * 1e3
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def in_cache_dtype(b: Batch, cache_dtype: torch.dtype) -> Batch:
    """The batch with its caches cast to an 8-bit cache_dtype (scales 1.0) and its reference over
    what they dequantize to."""
    k, v = b.k_cache.to(cache_dtype), b.v_cache.to(cache_dtype)
    ref = paged_attention_ref(b.q.float(), *(dequantize_ref(c, 1.0, torch.float32) for c in (k, v)), b.meta,
                              D ** -0.5)
    return replace(b, k_cache=k, v_cache=v, ref=ref)


def kv_dtype_rows(plan: Plan, cache_dtype: torch.dtype, copy_gbs: float) -> list[dict]:
    """Split-K decode (bs 16, auto splits) over a model-dtype cache and over the same values in
    cache_dtype (EngineConfig.kv_cache_dtype="fp8"), for every decode tile: GB/s counts K+V at each
    cache's element size (q and out are noise at these shapes). rel_err: the fp8 run against the
    reference over its dequantized cache (the kernel's own error), and against the model-dtype
    cache's reference (what fp8 costs in accuracy)."""
    rows = []
    for bsz in plan.batches:
        for ctx in plan.contexts:
            b = make_batch(plan, [ctx] * bsz, [1] * bsz, 16)
            f = in_cache_dtype(b, cache_dtype)
            splits = choose_num_splits(bsz, HKV, ctx)
            scratch = alloc_decode_scratch(bsz, HQ, D, plan.device)
            out = torch.empty_like(b.q)
            for name, (kc, vc), ref in (("model", (b.k_cache, b.v_cache), b.ref), ("fp8", (f.k_cache, f.v_cache), f.ref)):
                nbytes = bsz * ctx * HKV * D * 2 * kc.element_size()
                for i, tile in enumerate(plan.decode_tiles):
                    run = partial(decode_attention, b.q, kc, vc, out, b.meta.seq_lens, b.meta.block_tables, D ** -0.5,
                                  splits, scratch, check=False, **tile_args(tile))
                    out.fill_(float("nan"))
                    try:
                        run()
                    except triton.runtime.errors.OutOfResources as e:  # e.g. a 256-key tile on bf16
                        print(f"kv B{bsz} ctx{ctx} {name} tile {tile} skipped: {e}", flush=True)
                        continue
                    err, err_model = rel_err(out, ref), rel_err(out, b.ref)
                    ms = bench_ms(run, plan)
                    rows.append(dict(kernel=f"decode:{name}", B=bsz, ctx=ctx, bs=16, **tile_fields(tile),
                                     splits=splits, default=i == 0, us=ms * 1e3,
                                     GBps=nbytes / ms / 1e6, frac_copy=nbytes / ms / 1e6 / copy_gbs, rel_err=err,
                                     rel_err_vs_model_cache=err_model))
            print(f"kv B{bsz} ctx{ctx}", flush=True)
    return rows


def ragged_rows(plan: Plan, copy_gbs: float, rounds: int = 3, tiles: tuple[Tile, ...] | None = None,
                cache_dtype: torch.dtype | None = None) -> list[dict]:
    """Decode over bench-like mixed lengths (prompt U[100,1024] + output so far U[0,1024]) at
    1-16 splits, programs launched in batch order and longest first (`order`). `engine` marks
    what the engine runs: its split count for the batch (hint 4,096), longest first with one
    split only. Every variant of a batch is timed `rounds` times, round-robin (one launch variant
    timed 62 and 125 us in two calls at 32 sequences, PERF row 32: the spread is part of the
    result). `tiles`: instead, each tile at what the engine runs (the uniform-length --kv-dtype
    table chose bf16 tiles that were slower in the engine, PERF rows 38 and 44b). `cache_dtype`:
    over an 8-bit cache of the same values (GB/s at its element size)."""
    rows, gen = [], torch.Generator().manual_seed(0)
    batches = (2, 5) if plan.smoke else (16, 32, 64, 96, 128, 192, 256)
    for bsz in batches:
        lo, hi = (1, 24) if plan.smoke else (100, 1024)
        lens = torch.randint(lo, hi + 1, (bsz,), generator=gen) + torch.randint(0, hi + 1, (bsz,), generator=gen)
        b = make_batch(plan, lens.tolist(), [1] * bsz, 16)
        b = in_cache_dtype(b, cache_dtype) if cache_dtype else b
        auto = choose_num_splits(bsz, HKV, 4096)
        scratch = alloc_decode_scratch(bsz, HQ, D, plan.device)
        order = torch.argsort(b.meta.seq_lens, descending=True, stable=True).to(torch.int32)
        nbytes = int(lens.sum()) * HKV * D * 2 * b.k_cache.element_size()
        out = torch.empty_like(b.q)
        if tiles:
            variants = [(auto, auto == 1, tile) for tile in tiles]
        else:
            variants = [(sp, o, None) for sp in sorted({1, auto} if plan.smoke else {1, 2, 4, 8, 16, auto})
                        for o in (False, True)]
        runs, errs = {v: [] for v in variants}, {}
        for v in variants:
            out.fill_(float("nan"))
            _ragged_run(b, out, v, scratch, order)()
            errs[v] = rel_err(out, b.ref)
        for _ in range(rounds):
            for v in variants:
                runs[v].append(bench_ms(_ragged_run(b, out, v, scratch, order), plan) * 1e3)
        for (splits, ordered, tile), us in runs.items():
            med = sorted(us)[len(us) // 2]
            engine = splits == auto and ordered == (splits == 1)
            name = ",".join(map(str, tile)) if tile else "default"
            rows.append(dict(kernel="decode:ragged", B=bsz, cache=str(b.k_cache.dtype).removeprefix("torch."),
                             splits=splits, ordered=ordered, engine=engine, tile=name,
                             us=med, us_min=min(us), us_max=max(us), GBps=nbytes / med / 1e3,
                             frac_copy=nbytes / med / 1e3 / copy_gbs, rel_err=errs[(splits, ordered, tile)]))
            print(f"ragged B{bsz} sp{splits} {'longest first' if ordered else 'batch order':13} tile {name:12} "
                  f"{med:8.1f} us ({min(us):.1f}-{max(us):.1f}) {100 * nbytes / med / 1e3 / copy_gbs:5.1f}% of copy, "
                  f"err {errs[(splits, ordered, tile)]:.1e}" + (" (engine)" if engine else ""), flush=True)
    return rows


# --mid: ((Hq, Hkv), sequences, cached tokens) and the tiles it times, the engine's first
MID_SHAPES = (((32, 8), 64, 656), ((16, 8), 64, 656), ((16, 8), 32, 656), ((16, 8), 16, 656),
              ((32, 8), 16, 656), ((16, 8), 16, 4110), ((16, 8), 136, 700))
MID_TILES = ((128, 4, 2), (64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 2), (32, 4, 4))


def mid_rows(plan: Plan, copy_gbs: float, tiles: tuple[Tile, ...] | None = None) -> list[dict]:
    """Decode at mid-size batches of uniform length, every tile at 1-8 splits. Each variant runs
    over `caches` separate caches in turn inside one CUDA graph (us = a replay / calls): a call
    finds none of its KV in L2, as in the engine where a layer's other kernels pass between two
    attention calls, and no flush stands between them (do_bench's flush times small shapes
    colder than the engine: PERF rows 38, 44b). `engine` marks the tile and split count the
    engine picks (default_tile, choose_num_splits). On an H200 this timed llama's 64 x 656 kernel
    at 61.1 us against 60.65 in the engine's profile (PERF row 58)."""
    shapes = (((4, 2), 3, 40), ((8, 2), 2, 33)) if plan.smoke else MID_SHAPES
    tiles = tiles or (plan.decode_tiles if plan.smoke else MID_TILES)
    caches, rows = (2 if plan.smoke else 4), []
    split_counts = (1, 2) if plan.smoke else (1, 2, 4, 8)
    for heads, bsz, ctx in shapes:
        batches = [make_batch(plan, [ctx] * bsz, [1] * bsz, 16, heads) for _ in range(caches)]
        outs = [torch.empty_like(b.q) for b in batches]
        scratch = [alloc_decode_scratch(bsz, heads[0], D, plan.device) for _ in batches]
        auto = choose_num_splits(bsz, heads[1], ctx)
        engine_tile = default_tile(batches[0].k_cache.element_size(), max(16, triton.next_power_of_2(D)),
                                   pairs=bsz * heads[1])
        nbytes = bsz * ctx * heads[1] * D * 2 * batches[0].q.element_size()
        for tile in tiles:
            for splits in split_counts:
                calls = [partial(decode_attention, b.q, b.k_cache, b.v_cache, o, b.meta.seq_lens,
                                 b.meta.block_tables, D ** -0.5, splits, sc, check=False, **tile_args(tile))
                         for b, o, sc in zip(batches, outs, scratch)]
                outs[0].fill_(float("nan"))
                calls[0]()
                err = rel_err(outs[0], batches[0].ref)
                us = _graph_us(lambda calls=calls: [c() for c in calls], plan) / caches
                rows.append(dict(kernel="decode:mid", Hq=heads[0], Hkv=heads[1], B=bsz, ctx=ctx,
                                 tile=",".join(map(str, tile)), splits=splits,
                                 engine=tuple(tile[:3]) == engine_tile and splits == auto, us=us,
                                 GBps=nbytes / us / 1e3, frac_copy=nbytes / us / 1e3 / copy_gbs, rel_err=err))
        shape_rows = rows[-len(tiles) * len(split_counts):]
        engine = [r for r in shape_rows if r["engine"]]
        best = sorted(shape_rows, key=lambda r: r["us"])[:3]
        print(f"mid Hq{heads[0]} B{bsz} ctx{ctx}: engine " + (
            f"({engine[0]['tile']}) s{auto} {engine[0]['us']:.1f} us" if engine else "(not timed)") + " | fastest "
            + ", ".join(f"({r['tile']}) s{r['splits']} {r['us']:.1f} us {100 * r['frac_copy']:.0f}%" for r in best),
            flush=True)
    return rows


def _ragged_run(b: Batch, out: torch.Tensor, variant: tuple[int, bool, Tile | None], scratch, order: torch.Tensor):
    splits, ordered, tile = variant
    return partial(decode_attention, b.q, b.k_cache, b.v_cache, out, b.meta.seq_lens, b.meta.block_tables,
                   D ** -0.5, splits, scratch, check=False, order=order if ordered else None,
                   **(tile_args(tile) if tile else {}))


def print_kv_table(rows: list[dict]) -> None:
    print("\ndecode, model-dtype vs fp8 KV cache (bs 16, auto splits): default tile | fastest tile; "
          "GB/s of K+V read; err: fp8 vs its own dequantized cache / vs the model-dtype cache")
    print(f"{'B':>4} {'ctx':>5} {'sp':>3} | {'model us':>8} {'GB/s':>6} {'%copy':>6} | {'fp8 us':>8} {'GB/s':>6} "
          f"{'%copy':>6} | {'speedup':>7} {'best':>7} | {'err':>7} {'vs model':>8}")
    for shape in dict.fromkeys((r["B"], r["ctx"]) for r in rows):
        m = [r for r in rows if (r["B"], r["ctx"]) == shape and r["kernel"] == "decode:model"]
        f = [r for r in rows if (r["B"], r["ctx"]) == shape and r["kernel"] == "decode:fp8"]
        bm, bf = min(m, key=lambda r: r["us"]), min(f, key=lambda r: r["us"])
        print(f"{shape[0]:>4} {shape[1]:>5} {m[0]['splits']:>3} | {m[0]['us']:>8.1f} {m[0]['GBps']:>6.0f} "
              f"{100 * m[0]['frac_copy']:>5.1f}% | {f[0]['us']:>8.1f} {f[0]['GBps']:>6.0f} "
              f"{100 * f[0]['frac_copy']:>5.1f}% | {m[0]['us'] / f[0]['us']:>6.2f}x {bm['us'] / bf['us']:>6.2f}x | "
              f"{max(r['rel_err'] for r in f):>7.1e} {max(r['rel_err_vs_model_cache'] for r in f):>8.1e}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmbench kernels bench-decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a few small shapes (CPU: with TRITON_INTERPRET=1)")
    ap.add_argument("--llama-tp", action="store_true",
                    help="llama-3-8b's per-rank attention shapes at TP=1 and TP=2 instead")
    ap.add_argument("--fused", action="store_true",
                    help="the fused small-batch decode kernel (rotary, KV store, split merge) vs the kernels it replaces")
    ap.add_argument("--ragged", action="store_true",
                    help="bench-like mixed lengths at 1-16 splits: programs in batch order vs longest first")
    ap.add_argument("--mid", action="store_true",
                    help="16-136 sequences of uniform length, every tile x 1-8 splits, timed in CUDA graphs "
                         "over 4 caches in turn (closest to the engine at these sizes)")
    ap.add_argument("--prefill", action="store_true",
                    help="only the unified (prefill) attention cases, at every large tile")
    ap.add_argument("--heads", default=f"{HQ},{HKV}", metavar="HQ,HKV",
                    help="query and KV heads of the --prefill cases (llama-3-8b: 32,8)")
    ap.add_argument("--kv-dtype", choices=("fp8", "fp8_e5m2"),
                    help="decode on a model-dtype cache vs an 8-bit one (kv_cache_dtype) at the same shapes")
    ap.add_argument("--tiles", type=parse_tiles, metavar="N,W,S;...",
                    help="decode tiles (BLOCK_N, warps, stages[, registers a thread at most]) to time instead of "
                         "the plan's, the first as the default, e.g. '128,4,5;128,4,5,168'")
    return ap


def parse_tiles(text: str) -> tuple[Tile, ...]:
    """'128,4,5;128,4,5,168' -> ((128, 4, 5), (128, 4, 5, 168)): powers of two, at least 16 keys;
    a fourth number caps the registers a thread (ptxas' maxnreg)."""
    try:
        tiles = tuple(tuple(int(v) for v in part.split(",")) for part in text.split(";") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"tiles must be 'BLOCK_N,WARPS,STAGES;...' integers; got {text!r}") from None
    for t in tiles:
        if (len(t) not in (3, 4) or t[0] < 16 or t[0] & (t[0] - 1) or t[1] < 1 or t[1] & (t[1] - 1) or t[2] < 1
                or (len(t) == 4 and not 24 <= t[3] <= 255)):
            raise argparse.ArgumentTypeError(f"tile {t}: BLOCK_N a power of two >= 16, warps a power of two, "
                                             "stages >= 1, registers (if given) in [24, 255]")
    if not tiles:
        raise argparse.ArgumentTypeError("--tiles names no tile")
    return tiles


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.tiles and (args.fused or args.prefill):
        ap.error("--tiles names decode tiles: not for --fused or --prefill")
    plan = SMOKE if args.smoke else FULL
    if args.llama_tp:  # * marks the split count the engine picks
        llama_tp_rows(plan, *(((3,), 5, 40) if plan.smoke else ((48, 80, 128), 100, 1536)), tiles=args.tiles)
        return 0
    if args.tiles:
        plan = replace(plan, decode_tiles=args.tiles)
    if args.fused:
        fused_rows(plan)
        return 0
    if plan.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("bench_decode needs a CUDA device (or --smoke with TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    t0 = time.time()
    copy_gbs = measure_copy_bandwidth(plan.device, 1 << (30 if plan.device == "cuda" else 22)) / 1e9
    name = torch.cuda.get_device_name() if plan.device == "cuda" else "cpu"
    print(f"{name}: copy {copy_gbs:.0f} GB/s, {plan.dtype}", flush=True)
    if args.ragged:
        write_csv(ragged_rows(plan, copy_gbs, 2 if plan.smoke else 3, args.tiles,
                              KV_CACHE_DTYPES[args.kv_dtype] if args.kv_dtype else None), "bench_decode_ragged.csv")
        return 0
    if args.mid:
        write_csv(mid_rows(plan, copy_gbs, args.tiles), "bench_decode_mid.csv")
        return 0
    if args.kv_dtype:
        rows = kv_dtype_rows(plan, KV_CACHE_DTYPES[args.kv_dtype], copy_gbs)
        write_csv(rows, "bench_decode_kv_dtype.csv")
        print_kv_table(rows)
        return 0
    rows: list[dict] = []
    if args.prefill:
        hq, hkv = (int(h) for h in args.heads.split(","))
        for case, (ctx_lens, q_lens) in plan.prefill.items():
            rows += prefill_rows(plan, case, ctx_lens, q_lens, 16, plan.prefill_cfgs, (hq, hkv))
        write_csv(rows, "bench_decode_prefill.csv")
        print_table(copy_gbs, rows)
        return 0
    scratch = alloc_decode_scratch(max(plan.batches), HQ, D, plan.device)
    for bsz in plan.batches:
        for ctx in plan.contexts:
            for bs in plan.block_sizes:
                shape_rows = decode_rows(plan, bsz, ctx, bs, copy_gbs, scratch)
                rows += shape_rows
                r = shape_rows[0]
                print(f"decode B{bsz} ctx{ctx} bs{bs}: {r['us']:.1f} us "
                      f"{100 * r['frac_copy']:.0f}% [{time.time() - t0:.0f}s]", flush=True)
    for case, (ctx_lens, q_lens) in plan.prefill.items():
        rows += prefill_rows(plan, case, ctx_lens, q_lens, 16, plan.prefill_cfgs)
        print(f"unified {case} [{time.time() - t0:.0f}s]", flush=True)
    # Decode through the unified kernel (16-row tile, no splits), to compare with the above.
    bsz, ctx = plan.batches[-1], plan.contexts[-1]
    rows += prefill_rows(plan, f"decode_{bsz}x{ctx}", [ctx] * bsz, [1] * bsz, 16,
                         plan.prefill_cfgs[:1])
    write_csv(rows)
    print(f"total {time.time() - t0:.0f}s")
    print_table(copy_gbs, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
