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
