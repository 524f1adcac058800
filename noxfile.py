"""Sessions: `nox -s tests` (CPU test suite), `nox -s bench` (default sweep), `nox -s load`
(shim + locust load test, report written), `nox -s lint`.

On a machine without CUDA, torch is pinned to the CPU build (torch==2.13.0) so that no
multi-GB CUDA wheel is pulled.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

CPU_TORCH = "torch==2.13.0"
# The GPU machines' Triton: tests compile the kernels for sm_90 with it too (engine.kernels.compile_check)
DEVICE_TRITON = "triton==3.6.0"


def _has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None


def _install(session: nox.Session, extras: str) -> None:
    if not _has_cuda():
        session.install(CPU_TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the CPU test suite (GPU tests skip cleanly without CUDA)."""
    _install(session, "test")
    device_triton = Path(session.create_tmp()) / DEVICE_TRITON.replace("==", "-")
    if not (device_triton / "triton").is_dir():
        session.run("python", "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(device_triton),
                    DEVICE_TRITON)
    session.env["ENGINE_COMPILE_CHECK_TRITON"] = str(device_triton)
    session.run("python", "-m", "pytest", *(session.posargs or ["-q"]))


@nox.session
def bench(session: nox.Session) -> None:
    """Default sweep (harness/bench.py): static vs continuous (and HF on CPU) on a scaled-down
    bench workload offline, then a random workload at 3 request rates; reports under
    reports/bench-<timestamp>/, comparison table printed, HTML written. Extra arguments go to
    `python -m harness bench` (e.g. `nox -s bench -- --ci`)."""
    _install(session, "test")
    session.run("python", "-m", "harness", "bench", *session.posargs)


@nox.session
def load(session: nox.Session) -> None:
    """Load test: the OpenAI shim on the tiny model, locust against it, a report from what it saw.
    Arguments go to harness.loadtest, e.g. `nox -s load -- --users 16 --run-time 60s`."""
    _install(session, "serve,load")
    session.run("python", "-m", "harness.loadtest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "engine", "harness", "workloads", "tests", "noxfile.py")
