"""Triton tooling without a GPU: the engine's kernels, as the GPU path specializes them, compile
for Hopper (sm_90) on this CPU machine (the interpreter tests run the kernels' logic but never
lower them; see harness/kernels/compile_check.py), and harness.studies.throughput's watch on new
specializations (harness/kernels/jit_watch.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.kernels.compile_check import cases

REPO = str(Path(__file__).resolve().parents[2])


# `nox -s tests` installs the GPU machines' Triton here (noxfile.DEVICE_TRITON): the kernels must
# compile under it as well as under this environment's
DEVICE_TRITON = os.environ.get("ENGINE_COMPILE_CHECK_TRITON")


@pytest.mark.parametrize("triton_dir", [None] + ([DEVICE_TRITON] if DEVICE_TRITON else []),
                         ids=lambda d: "installed-triton" if d is None else "device-triton")
def test_gpu_kernels_compile_for_sm90(triton_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # JIT kernels, not interpreted
    env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_dir, REPO) if p)
    proc = subprocess.run([sys.executable, "-m", "harness.kernels.compile_check", "--arch", "90"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    version = proc.stdout.splitlines()[0]
    if triton_dir is not None:  # the side directory's Triton, not the environment's, did the compiling
        dist = next(Path(triton_dir).glob("triton-*.dist-info")).name  # triton-3.6.0.dist-info
        assert version == "triton " + dist.removeprefix("triton-").removesuffix(".dist-info"), version
    ok = [ln for ln in proc.stdout.splitlines() if ln.startswith("ok   sm_90")]
    assert len(ok) == len(cases()) >= 10, proc.stdout


def test_watch_jit_records_chains_and_restores_the_hook():
    """harness.studies.throughput's watch on Triton's jit_cache_hook (Triton calls it for each specialization a
    process meets): names recorded inside the block, a hook already installed still called (and
    its answer kept), the old hook back afterwards."""
    from types import SimpleNamespace

    from triton import knobs

    from harness.kernels.jit_watch import watch_jit

    calls = []
    previous = knobs.runtime.jit_cache_hook

    def outer(**kw):
        calls.append(kw["fn"].name)
        return None

    knobs.runtime.jit_cache_hook = outer
    try:
        with watch_jit() as jit:
            assert jit.available
            assert knobs.runtime.jit_cache_hook(fn=SimpleNamespace(module="engine.kernels.sample", name="_pick"),
                                                key=()) is None
        assert jit.seen == ["engine.kernels.sample._pick"] and calls == ["_pick"]
        assert knobs.runtime.jit_cache_hook is outer
    finally:
        knobs.runtime.jit_cache_hook = previous


def _run_probe(script: str, triton_dir: str | None):
    """The JSON a compile probe prints last, run in a subprocess without TRITON_INTERPRET (this
    process's kernels are interpreted), with `triton_dir`'s Triton first on the path."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_dir, REPO) if p)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


_STAGING_PROBE = r"""
import json, re
from harness.kernels.compile_check import cases, compile_case, resources
out = []
for c in cases():
    if (c.kernel in ("_decode_split_kernel", "_unified_attention_kernel") and c.constexprs.get("NUM_SPLITS", 1) == 1
            and c.constexprs.get("LONG", True) and c.constexprs["DOT_PRECISION"] == "tf32"):
        kernel, err = compile_case(c, 90)
        out.append(dict(name=c.name, kernel=c.kernel, cache=c.pointers["k_cache_ptr"], err=err,
                        maxnreg=c.options.get("maxnreg", 0),
                        cp_async=not err and "cp.async" in kernel.asm["ptx"],
                        resources=resources(kernel) if not err else "",
                        # shared-memory buffers of a [keys, D] K/V tile (the leading dim of its allocation)
                        kv_buffers=sorted({int(n) for n in re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x\d+x\d+x",
                                                                       kernel.asm["ttgir"])}) if not err else []))
print(json.dumps(out))
"""


@pytest.mark.parametrize("triton_dir", [None] + ([DEVICE_TRITON] if DEVICE_TRITON else []),
                         ids=lambda d: "installed-triton" if d is None else "device-triton")
def test_attention_kernels_stage_kv_through_shared_memory_without_spills(triton_dir):
    """The decode and prefill attention kernels, on a bf16 and on an fp8 cache, as the engine
    specializes them (strides multiples of 16): K/V tiles go global -> shared memory by cp.async
    (the pipeline that keeps bytes in flight) and nothing spills to local memory. A decode program
    on an fp8 cache keeps two K/V tiles in flight (two shared-memory buffers): its converted tiles
    take enough registers that only 2 programs fit an SM, and with one buffer each it read 55% of
    copy bandwidth (reports/PERF.md row 44); capped at 168 registers (3 programs an SM, row 45)
    it keeps both and, under the GPU machines' Triton, spills nothing (3.9 spills 128 bytes). A
    subprocess: this one's kernels are interpreted."""
    rows = _run_probe(_STAGING_PROBE, triton_dir)
    assert sorted(r["cache"] for r in rows) == ["*bf16", "*bf16", "*fp8e4nv", "*fp8e4nv", "*fp8e4nv"], rows
    for r in rows:
        assert not r["err"] and r["cp_async"], r
        assert "STACK:0 " in r["resources"] or (r["maxnreg"] and triton_dir is None), r
    buffers = {(r["kernel"], r["cache"], r["maxnreg"]): r["kv_buffers"] for r in rows}
    assert buffers["_decode_split_kernel", "*fp8e4nv", 0] == [2], buffers
    # the register cap (DECODE_MAXNREG_FP8, off: row 45): held without spilling, the two buffers kept
    capped = next(r for r in rows if r["maxnreg"])
    assert f"REG:{capped['maxnreg']} " in capped["resources"] and capped["kv_buffers"] == [2], capped


_PERSISTENT_PROBE = r"""
import json, re
from harness.kernels.compile_check import _persistent_decode_cases, compile_case
out = []
for case in _persistent_decode_cases():  # o in its own step, with fused_o, 16 sequences
    kernel, err = compile_case(case, 90)
    ttgir = kernel.asm["ttgir"] if not err else ""
    # staged weight tiles: [stages - 1, features, K step] bf16 buffers in shared memory
    tiles = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x(\d+)x(\d+)xbf16", ttgir)
    out.append(dict(err=err, tiles=sorted({tuple(map(int, t)) for t in tiles}), stages=case.constexprs["QKV_STAGES"],
                    block_k=case.constexprs["BLOCK_K"], fused_o=case.constexprs["FUSED_O"], seqs=case.constexprs["SEQS"]))
print(json.dumps(out))
"""


@pytest.mark.parametrize("triton_dir", [None] + ([DEVICE_TRITON] if DEVICE_TRITON else []),
                         ids=lambda d: "installed-triton" if d is None else "device-triton")
def test_persistent_decode_stages_its_weight_loads(triton_dir):
    """The persistent decode kernel's projections (with o in the attention step too, and for 16
    sequences) keep STAGES - 1 weight tiles in flight through shared memory (Triton's pipeline,
    which needs the table's pointers hinted as 16-byte aligned: without the hint no weight load
    was staged, reports/PERF.md row 52)."""
    cases = _run_probe(_PERSISTENT_PROBE, triton_dir)
    assert [(c["fused_o"], c["seqs"]) for c in cases] == [(False, 1), (True, 1), (False, 16)], cases
    for got in cases:
        assert not got["err"], got
        weight_tiles = [t for t in got["tiles"] if t[0] == got["stages"] - 1 and t[2] == got["block_k"]]
        assert weight_tiles, got
