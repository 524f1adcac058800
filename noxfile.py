"""Sessions: `nox -s tests` (CPU test suite), `nox -s bench` (default sweep), `nox -s load`
(shim + locust load test, report written), `nox -s perf` (CPU hot-path benchmarks against a
saved baseline), `nox -s interop` (GuideLLM against the server), `nox -s lint`.

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
    # --benchmark-disable: pytest-benchmark tests (tests/perf, the detokenizer's) run once, as
    # correctness tests; `nox -s perf` times them
    session.run("python", "-m", "pytest", *(session.posargs or ["-q", "--benchmark-disable"]))


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
def interop(session: nox.Session) -> None:
    """Other tools against the server: GuideLLM runs a short synthetic benchmark offline with
    the preset tokenizer `llmbench tokenizer save` writes, and must count the tokens the server
    bills (tests/serve/test_guidellm.py). GuideLLM is installed here only, not in the test
    extra: it pulls sanic, uvloop, httptools and more, and uvicorn would pick the last two up."""
    _install(session, "test")
    session.install("guidellm>=0.8.1")
    session.run("python", "-m", "pytest", "-q", "tests/serve/test_guidellm.py", "tests/serve/test_interop.py",
                *session.posargs)


PERF_STORAGE = "file://reports/baselines/perf"


@nox.session
def perf(session: nox.Session) -> None:
    """Time the engine's CPU hot paths (tests/perf: block manager with prefix hashing, a
    scheduler step at 256 running requests, prepare_inputs at 256 decodes) with pytest-benchmark
    and compare with the latest run saved under reports/baselines/perf/<machine>/ (committed; pytest-benchmark
    names the folder by OS, Python version and bitness, e.g. Linux-CPython-3.11-64bit; without one
    for this machine it only warns).

    The gate is deliberately generous: it fails only when a median is more than 2.5x the saved
    one (--benchmark-compare-fail=median:150%). The baseline was saved on a shared 2-core VM
    where other processes' bursts move medians by tens of percent; a tighter gate would fail on
    noise. It catches an accidental O(n^2) or a Python loop where numpy was, not 10%.

    `nox -s perf -- --benchmark-save=cpu` saves a new baseline instead (commit reports/baselines/perf/);
    other arguments go to pytest."""
    _install(session, "test")
    common = ["python", "-m", "pytest", "tests/perf", "-q", "--benchmark-enable",
              f"--benchmark-storage={PERF_STORAGE}", "--benchmark-max-time=0.5", "--benchmark-min-rounds=20"]
    if any(a.startswith("--benchmark-save") for a in session.posargs):
        session.run(*common, *session.posargs)
        return
    session.run(*common, "--benchmark-compare", "--benchmark-compare-fail=median:150%", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "engine", "harness", "workloads", "tests", "noxfile.py")
