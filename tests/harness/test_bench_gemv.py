"""`llmbench kernels bench-gemv --smoke`: the GPU microbenchmark's script on a tiny shape (the
interpreter on CPU): every projection and the layer chain are timed fused and unfused, and with
the first kernel's tiles and norm pass (legacy, default+first: the old-vs-new A/B), and each
fused variant agrees with the unfused result it is compared against; the GEMM alone (cuBLAS) is
timed too.
Run: pytest tests/harness/test_bench_gemv.py"""

from __future__ import annotations

import csv
from dataclasses import replace

import torch

from harness.kernels.bench_gemv import Env, copies_for, main, weight_copies


def test_smoke_run_times_every_op_and_checks_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert main(["--smoke", "--no-sweep", "--rows", "1,3", "--reps", "1"]) == 0
    with open(tmp_path / "bench_gemv.csv") as f:
        rows = list(csv.DictReader(f))
    got = {(r["op"], r["M"], r["variant"]) for r in rows}
    for m in ("1", "3"):
        for op in ("qkv", "o", "gate_up", "down"):
            assert {(op, m, "unfused"), (op, m, "cublas"), (op, m, "default"), (op, m, "legacy")} <= got
        assert {("qkv", m, "default+first"), ("gate_up", m, "default+first")} <= got
        assert {("layer", m, "unfused"), ("layer", m, "fused"), ("layer", m, "fused-legacy")} <= got
    assert all(float(r["rel_err"]) < 1e-5 for r in rows if r["variant"] != "unfused" and r["op"] != "layer")
    assert all(r["config"].endswith(",first") for r in rows if r["variant"] in ("legacy", "default+first")
               and r["op"] in ("qkv", "gate_up"))
    assert all(float(r["us"]) > 0 for r in rows)
    assert "best config" in capsys.readouterr().out


def test_l2_hot_repeats_one_weight_copy():
    """--l2-hot: as many launches as the cold run, all on one weight (read from L2 after the
    first); cold: distinct copies that overflow the L2."""
    env = Env("cuda", torch.bfloat16, 132, 60 << 20, 1, False, l2_hot=True)
    made = []
    hot = weight_copies(env, lambda: made.append(1) or torch.zeros(2), 8 << 20)
    assert len(hot) == copies_for(env, 8 << 20) > 1 and len(made) == 1 and all(w is hot[0] for w in hot)
    cold = weight_copies(replace(env, l2_hot=False), lambda: torch.zeros(2), 8 << 20)
    assert len({id(w) for w in cold}) == len(cold) == len(hot)
