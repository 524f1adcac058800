"""Compile the engine's Triton kernels, in the specializations the GPU path uses, for a CUDA
target on a machine without a GPU (Triton's ahead-of-time path: its bundled ptxas, no driver). The interpreter runs the kernels'
logic on CPU but never lowers them, so a construct the compiler rejects, or a specialization the
CPU tests never take (bf16, 128-key decode tiles), would otherwise first fail on
a GPU. Prints one line per kernel and exits 1 if any failed.

    llmbench kernels compile-check [--arch 90] [--resources]     (or python -m harness.kernels.compile_check)

Triton versions differ in what they accept (3.6, on the GPU machines, type-checks branches that
3.9 folds away), so `nox -s tests` also runs it under the GPU machines' version, installed to a
side directory put first on PYTHONPATH.

Must run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

FLOAT_ARGS = {"eps", "scale_log2", "k_scale", "v_scale"}
# decode_attention's register cap on fp8 caches (DECODE_MAXNREG_FP8, off: reports/PERF.md row 45):
# 3 programs an SM at 4 warps
FP8_MAXNREG_PROBE = 168


@dataclass
class Case:
    module: str
    kernel: str
    constexprs: dict[str, Any]
    pointers: dict[str, str]  # argument -> Triton pointer type, e.g. "*bf16"
    options: dict[str, int] = field(default_factory=lambda: {"num_warps": 4})
    # integer arguments the JIT sees as multiples of 16 (strides and sizes of the engine's shapes),
    # with every pointer then 16-byte aligned (torch's allocations are), as the JIT specializes
    # them: loads vectorize and, on tensor cores, pipeline. Empty: no such hints.
    divisible: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        shown = {k: v for k, v in self.constexprs.items()
                 if k in ("BLOCK_N", "BITS", "DOT_PRECISION", "LONG", "STORE", "NUM_SPLITS", "PARTS", "NORM",
                           "NORM_FIRST", "GATED", "SPLIT_K", "BLOCK_M", "PREFETCH", "PDL", "ROTARY", "MERGE")}
        cache = self.pointers.get("k_cache_ptr", self.pointers.get("k_out_ptr", ""))
        if cache.startswith("*fp8"):  # the kv_cache_dtype=fp8 specializations
            shown["cache"] = cache[1:]
        if "maxnreg" in self.options:
            shown["maxnreg"] = self.options["maxnreg"]
        return f"{self.kernel} {shown}" if shown else self.kernel


def _ptrs(dtype: str, *names: str) -> dict[str, str]:
    return {n: f"*{dtype}" for n in names}


def cases() -> list[Case]:
    rows = ("res_ptr", "w_ptr", "out_ptr", "res_out_ptr")
    fused = {**_ptrs("i64", "buffers"), **_ptrs("bf16", *rows)}
    out = [Case("engine.kernels.allreduce_rmsnorm", "_allreduce_rmsnorm_kernel", dict(RANK=0, WORLD=2, BLOCK=4096),
                {**fused, **_ptrs("i64", "signal_pads"), **_ptrs("i32", "epochs")}, {"num_warps": 8}),
           Case("engine.kernels.allreduce_rmsnorm", "_push_allreduce_rmsnorm_kernel",
                dict(RANK=1, WORLD=2, BLOCK=4096, BITS=16), fused, {"num_warps": 8})]
    out.append(Case("engine.kernels.rmsnorm", "_rmsnorm_kernel", dict(HAS_RESIDUAL=True, BLOCK=4096),
                    _ptrs("bf16", "x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr"), {"num_warps": 8}))
    out.append(Case("engine.kernels.sample", "_gumbel_chunk_kernel", dict(CHUNK=8192, BLOCK=2048, FAST_LOG=True),
                    {**_ptrs("bf16", "logits_ptr"), **_ptrs("fp32", "temp_ptr"), **_ptrs("i64", "seed_ptr"),
                     **_ptrs("i32", "out_ptr")}))
    out.append(Case("engine.kernels.sample", "_pick_chunk_kernel", dict(GROUPS=2, CHUNKS_PAD=32),
                    {**_ptrs("i32", "chunks_ptr"), **_ptrs("i64", "out_ptr")}))
    out.append(Case("engine.kernels.decode_attention", "_decode_reduce_kernel",
                    dict(HEAD_DIM=128, D_PAD=128, NUM_SPLITS=3, SPLITS_PAD=4),
                    {**_ptrs("fp32", "acc_ptr", "lse_ptr"), **_ptrs("bf16", "out_ptr")}))
    for long, (block_m, block_n, warps, stages), cache in ((False, (16, 64, 4, 2), "bf16"),
                                                           (True, (64, 64, 4, 2), "bf16"),
                                                           (False, (16, 64, 4, 2), "fp8e4nv"),
                                                           (True, (64, 64, 4, 2), "fp8e4nv")):
        out.append(Case("engine.kernels.unified_attention", "_unified_attention_kernel",
                        dict(LONG=long, BLOCK_SIZE=16, GROUP=4, HEAD_DIM=128, D_PAD=128, BLOCK_M=block_m,
                             BLOCK_Q=block_m // 4, BLOCK_N=block_n, DOT_PRECISION="tf32"),
                        {**_ptrs("bf16", "q_ptr", "out_ptr"), **_ptrs(cache, "k_cache_ptr", "v_cache_ptr"),
                         **_ptrs("i32", "qsl_ptr", "seq_lens_ptr", "block_tables_ptr")},
                        {"num_warps": warps, "num_stages": stages}, ATTENTION_DIVISIBLE))
    for store, cache in ((False, "bf16"), (True, "bf16"), (True, "fp8e4nv")):
        out.append(Case("engine.kernels.rope", "_qk_norm_rope_kernel",
                        dict(NORM=True, HALF=64, NUM_Q_HEADS=16, NUM_KV_HEADS=8, HQ_PAD=16, HKV_PAD=8, STORE=store,
                             BLOCK_SIZE=16),
                        {**_ptrs("bf16", "q_ptr", "k_ptr", "q_out_ptr", "qw_ptr", "kw_ptr", "v_ptr"),
                         **_ptrs(cache, "k_out_ptr", "v_cache_ptr"),
                         **_ptrs("fp32", "cos_ptr", "sin_ptr"), **_ptrs("i64", "pos_ptr", "slot_ptr")}))
    for cache in ("bf16", "fp8e4nv", "fp8e5"):
        out.append(Case("engine.kernels.store_kv", "_store_kv_kernel",
                        dict(BLOCK_SIZE=16, NUM_KV_HEADS=8, HEAD_DIM=128, H_PAD=8, D_PAD=128),
                        {**_ptrs("bf16", "k_ptr", "v_ptr"), **_ptrs(cache, "k_cache_ptr", "v_cache_ptr"),
                         **_ptrs("i64", "slot_ptr")}))
    out.append(Case("engine.kernels.silu_mul", "_silu_mul_kernel", dict(BLOCK=4096), _ptrs("bf16", "x_ptr", "out_ptr")))
    for dtype, block_n, precision, splits, cache, maxnreg in (
            ("bf16", 128, "tf32", 2, "bf16", 0), ("bf16", 128, "tf32", 1, "bf16", 0), ("bf16", 64, "tf32", 2, "bf16", 0),
            ("fp32", 64, "ieee", 2, "fp32", 0), ("bf16", 128, "tf32", 2, "fp8e4nv", 0),
            ("bf16", 128, "tf32", 1, "fp8e4nv", 0), ("bf16", 128, "tf32", 1, "fp8e4nv", FP8_MAXNREG_PROBE)):
        # one split: the launch passes `out` in place of the fp32 scratch
        scratch = "fp32" if splits > 1 else dtype
        out.append(Case("engine.kernels.decode_attention", "_decode_split_kernel",
                        dict(BLOCK_SIZE=16, GROUP=4, HEAD_DIM=128, D_PAD=128, BLOCK_H=16, BLOCK_N=block_n,
                             NUM_SPLITS=splits, DOT_PRECISION=precision),
                        {**_ptrs(dtype, "q_ptr", "out_ptr"), **_ptrs(cache, "k_cache_ptr", "v_cache_ptr"),
                         **_ptrs(scratch, "acc_ptr", "lse_ptr"), **_ptrs("i32", "seq_lens_ptr", "block_tables_ptr")},
                        {**_decode_options(cache), **({"maxnreg": maxnreg} if maxnreg else {})}, ATTENTION_DIVISIBLE))
    for rotary, norm, merge, group, cache in ((True, True, True, 2, "bf16"), (True, False, False, 4, "bf16"),
                                              (False, False, True, 4, "bf16"), (True, True, True, 2, "fp8e4nv")):
        # the fused small-batch decode (fused_small_batch_rotary / _merge): Qwen3 and Llama-3 groups
        out.append(Case("engine.kernels.decode_attention", "_decode_split_kernel",
                        dict(BLOCK_SIZE=16, GROUP=group, HEAD_DIM=128, D_PAD=128, BLOCK_H=16, BLOCK_N=128,
                             NUM_SPLITS=16, DOT_PRECISION="tf32", ROTARY=rotary, QK_NORM=norm, MERGE=merge,
                             SPLITS_PAD=16, MERGE_HEADS=min(group, 4)),
                        {**_ptrs("bf16", "q_ptr", "out_ptr", "new_k_ptr", "new_v_ptr", "qw_ptr", "kw_ptr"),
                         **_ptrs(cache, "k_cache_ptr", "v_cache_ptr"),
                         **_ptrs("fp32", "acc_ptr", "lse_ptr", "cos_ptr", "sin_ptr"),
                         **_ptrs("i32", "seq_lens_ptr", "block_tables_ptr", "count_ptr"),
                         **_ptrs("i64", "slot_ptr", "pos_ptr")},
                        _decode_options(cache), ATTENTION_DIVISIBLE))
    out += _skinny_gemm_cases()
    out += _persistent_decode_cases()
    return out


def _persistent_decode_cases() -> list[Case]:
    """Every layer of a batch-1 decode step in one kernel, with the plan choose_plan makes for
    qwen3-0.6b on 132 SMs (engine.kernels.persistent_decode), o in a step of its own and inside
    the attention step (fused_o, the chosen plan's), and its plan for a step of 16 sequences."""
    from dataclasses import replace

    from engine.kernels.persistent_decode import DecodeShape, choose_plan, kernel_constants

    shape = DecodeShape(1024, 3072, 16, 8, 128, 28, 1e-6, qk_norm=True, bias=False)
    tables = ("qkv_tab", "o_tab", "gate_up_tab", "down_tab", "norm1_tab", "norm2_tab", "bias_tab", "qn_tab", "kn_tab")
    pointers = {**_ptrs("i64", *tables, "slot_ptr", "pos_ptr", "times_ptr"),
                **_ptrs("bf16", "res_ptr", "qkv_ptr", "act_ptr", "attn_ptr", "k_cache", "v_cache"),
                **_ptrs("fp32", "parts_ptr", "acc_ptr", "lse_ptr", "cos_ptr", "sin_ptr"),
                **_ptrs("i32", "count_ptr", "merge_count_ptr", "seq_lens_ptr", "bt_ptr")}
    out = []
    for plan in [replace(choose_plan(shape, 132), fused_o=f) for f in (0, 1)] + [choose_plan(shape, 132, 16)]:
        out.append(Case("engine.kernels.persistent_decode", "_persistent_decode_kernel",
                        kernel_constants(shape, plan, 16, fp32=False, barrier=True), pointers,
                        {"num_warps": plan.num_warps, "num_stages": 1},
                        ("stride_kc_b", "stride_kc_s", "stride_kc_h", "stride_layer", "stride_cos")))
    return out


def _decode_options(cache: str) -> dict[str, int]:
    """num_warps and num_stages of decode_attention's default tile for a cache of this type."""
    da = importlib.import_module("engine.kernels.decode_attention")  # the package exports the function
    tile = da.DECODE_TILE_FP8 if cache.startswith("fp8") else da.DECODE_TILE
    return {"num_warps": tile[1], "num_stages": tile[2]}


# q/out and K/V cache strides: multiples of 16 at every shape the engine runs (head dims,
# heads x head dim, block size x that), as the JIT specializes them; without the hints the
# attention kernels compile with scalar loads and report spills the real ones do not have
ATTENTION_DIVISIBLE = ("stride_q_t", "stride_q_h", "stride_o_t", "stride_o_h", "stride_kc_b", "stride_kc_s",
                       "stride_kc_h", "stride_vc_b", "stride_vc_s", "stride_vc_h")
SKINNY_DIVISIBLE = ("N", "K", "stride_xs", "stride_xm", "stride_wn", "stride_os", "stride_om", "stride_rm")


def _skinny_gemm_cases() -> list[Case]:
    """The small-batch projections as the decoder layer launches them: M = 1 on CUDA cores (one
    or two weight tiles prefetched), M <= 16 on tensor cores; each norm prologue reading split-K
    partials or a bf16 input, in one pass or with a first pass (norm_first). Specialized as at
    the engine's shapes (SKINNY_DIVISIBLE), so tensor-core tiles compile with their pipeline."""
    mod, out = "engine.kernels.skinny_gemm", []
    # (dtype, parts, norm, norm_first, res, bias, gated, split, block_m, block_n, block_k, warps, stages, pdl)
    for dt, parts, norm, first, res, bias, gated, split, bm, bn, bk, warps, stages, pdl in (
            ("bf16", 2, True, False, True, False, False, 1, 1, 8, 512, 4, 1, False),  # qkv after a split down
            ("bf16", 1, True, False, False, True, False, 1, 1, 8, 512, 4, 2, False),  # layer 0's qkv (Qwen2 bias)
            ("bf16", 1, True, False, True, False, True, 1, 1, 8, 512, 4, 2, False),  # gate_up + SiLU * up
            ("bf16", 1, True, True, True, False, True, 1, 1, 8, 512, 4, 1, False),  # the same, old norm
            ("bf16", 1, False, False, False, False, False, 2, 1, 8, 512, 4, 2, False),  # o / down, split K
            ("bf16", 2, True, False, True, False, True, 1, 16, 64, 128, 4, 3, False),
            ("bf16", 1, True, False, True, False, False, 1, 16, 32, 128, 4, 6, False),
            ("bf16", 2, True, True, True, False, True, 1, 16, 16, 128, 4, 4, False),
            ("bf16", 1, False, False, False, False, False, 2, 16, 32, 128, 4, 6, False),
            ("bf16", 1, False, False, False, False, False, 4, 32, 32, 128, 4, 6, False),  # o / down, 17-32 rows
            ("bf16", 1, False, False, False, False, False, 4, 64, 32, 128, 4, 5, False),  # o / down, 33-64 rows
            ("bf16", 1, False, False, False, False, False, 1, 32, 32, 128, 4, 6, False),  # qkv, row-parallel columns
            ("bf16", 1, False, False, False, False, True, 1, 32, 16, 128, 4, 6, False),  # gate_up, the same
            ("fp32", 2, True, False, True, False, True, 1, 16, 16, 64, 4, 4, False),  # float32 engines: ieee dots
            ("fp16", 1, True, True, True, False, False, 1, 16, 32, 128, 4, 4, False),  # fp16 dots normalize first
            ("bf16", 2, True, False, True, False, True, 1, 1, 8, 512, 4, 2, True),  # fused_small_batch_pdl
            ("bf16", 1, False, False, False, False, False, 2, 16, 32, 128, 4, 6, True)):
        rows = _ptrs(dt, "w_ptr", "bias_ptr", "res_ptr", "nw_ptr", "res_out_ptr")
        ptrs = {**rows, "x_ptr": "*fp32" if parts > 1 else f"*{dt}", "out_ptr": "*fp32" if split > 1 else f"*{dt}"}
        out.append(Case(mod, "_skinny_gemm_kernel",
                        dict(PARTS=parts, NORM=norm, NORM_FIRST=norm and first, HAS_RES=res, HAS_BIAS=bias,
                             GATED=gated, SPLIT_K=split, USE_DOT=bm >= 16,
                             DOT_PRECISION="ieee" if dt == "fp32" else "tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                             PREFETCH=1 if stages <= 1 else 2, PDL=pdl),
                        ptrs, {"num_warps": warps, "num_stages": stages, "launch_pdl": pdl}, SKINNY_DIVISIBLE))
    out.append(Case(mod, "_partials_rmsnorm_kernel", dict(PARTS=2, BLOCK=4096),
                    {**_ptrs("fp32", "x_ptr"), **_ptrs("bf16", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr")},
                    {"num_warps": 8}))
    return out


def compile_case(case: Case, arch: int) -> tuple[Any, str]:
    """(the compiled kernel, '') on success, else (None, the compiler's complaint)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(case.module), case.kernel)
    # a constexpr the case leaves out takes its default, as in a launch that does not pass it
    given = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **case.constexprs}
    signature = {}
    for name in fn.arg_names:
        if name in given:
            signature[name] = "constexpr"
        else:
            signature[name] = case.pointers.get(name, "fp32" if name in FLOAT_ARGS else "i32")
    constexprs = {(fn.arg_names.index(k),): v for k, v in given.items()}
    hinted = set(case.divisible) | ({n for n, t in signature.items() if t.startswith("*")} if case.divisible else set())
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in hinted}
    try:
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                options=case.options)
    except Exception as e:  # noqa: BLE001 - report every kernel, then fail
        return None, f"{type(e).__name__}: {str(e)[:2000]}"
    return kernel, ""


def resources(kernel: Any) -> str:
    """Registers, spills (STACK/LOCAL) and shared memory per block of a compiled kernel, from the
    cuobjdump bundled with Triton: what bounds how many blocks an SM holds, and so how many bytes
    they keep in flight. The second figure, smem, is Triton's own count (dynamic shared memory)."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = next((ln.strip() for ln in text.splitlines() if "REG:" in ln), text.strip()[-200:])
    return f"{usage}  smem {kernel.metadata.shared}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmbench kernels compile-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: Hopper)")
    ap.add_argument("--resources", action="store_true", help="print each kernel's registers, spills and shared memory")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    import triton

    print(f"triton {triton.__version__}", flush=True)  # the GPU machines may run another version
    failed = 0
    for case in cases():
        kernel, err = compile_case(case, args.arch)
        failed += bool(err)
        print(f"{'FAIL' if err else 'ok  '} sm_{args.arch} {case.name}" + (f"\n  {err}" if err else ""), flush=True)
        if args.resources and kernel is not None:
            print(f"     {case.options}: {resources(kernel)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
