"""The engine's Triton kernels, as the GPU path specializes them, compile for Hopper (sm_90) on
this CPU machine: the interpreter tests run the kernels' logic but never lower them (see
engine/kernels/compile_check.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engine.kernels.compile_check import cases

REPO = str(Path(__file__).resolve().parents[1])


def test_gpu_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # JIT kernels, not interpreted
    env["PYTHONPATH"] = REPO
    proc = subprocess.run([sys.executable, "-m", "engine.kernels.compile_check", "--arch", "90"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ok = [ln for ln in proc.stdout.splitlines() if ln.startswith("ok   sm_90")]
    assert len(ok) == len(cases()) >= 10, proc.stdout
