"""`llmbench kernels bench-sample --smoke`: the sampling microbenchmark on tiny shapes (the
interpreter on CPU) times every chunk size at a temperature and greedy, marks the engine's chunk
choice once per point, and checks that every chunk size draws the same ids.
Run: pytest tests/harness/test_bench_sample.py"""

from __future__ import annotations

import csv

import pytest

from engine.kernels.sample import BLOCK, chunk_size
from harness.kernels.bench_sample import main


def test_smoke_times_each_chunk_and_marks_the_engines(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert main(["--smoke", "--temperature", "0.8"]) == 0
    with open(tmp_path / "bench_sample.csv") as f:
        rows = list(csv.DictReader(f))
    points = {(r["temperature"], r["B"]) for r in rows}
    assert points == {(t, b) for t in ("0.8", "0.0") for b in ("1", "3")}
    assert {r["chunk"] for r in rows} == {"1000", str(BLOCK)}
    for t, b in points:
        marked = [r["chunk"] for r in rows if (r["temperature"], r["B"]) == (t, b) and r["engine"] == "True"]
        assert marked == [str(chunk_size(int(b), 3000, 132))]
    assert all(float(r["us"]) > 0 for r in rows)


def test_bad_arguments_exit_with_a_message():
    with pytest.raises(SystemExit, match="temperature"):
        main(["--smoke", "--temperature", "0"])
    with pytest.raises(SystemExit, match="batches"):
        main(["--smoke", "--batches", "1,x"])
