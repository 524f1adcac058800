"""The flagship job end to end on the tiny preset (CPU, scaled down): every sweep runs, no
request is lost, the published copy holds the summaries, plots and the table, and the table
command reads the committed-style sweep.parquet back. Run: pytest tests/test_flagship.py"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from harness.cli import main
from harness.studies import flagship


@pytest.fixture(scope="module")
def flagship_run(tmp_path_factory):
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flagship, "MODEL", "tiny")
        mp.setattr(flagship, "FLAGSHIP_KV_BLOCKS", 48)
        mp.setattr(flagship, "BENCH_PARAMS", {"num_seqs": 12, "min_input_len": 8, "max_input_len": 32,
                                              "min_output_len": 4, "max_output_len": 24})
        mp.setattr(flagship, "RANDOM_PARAMS", {"num_prompts": 12, "input_len": 24, "output_len": 8})
        mp.setattr(flagship, "RANDOM_FRACTIONS", (0.5, 2.0))
        mp.setattr(flagship, "PREFIX_PARAMS", {"num_groups": 2, "prefix_len": 32, "suffix_len": 8,
                                               "output_len": 4, "num_prompts": 24})  # > the KV: later ones hit
        return flagship.run_flagship(tmp_path_factory.mktemp("fl"), telemetry=False, progress=False)


def test_every_sweep_ran_and_nothing_was_lost(flagship_run):
    sweep = pd.read_parquet(flagship_run / "sweep.parquet")
    runs = set(zip(sweep["workload"], sweep["backend"], sweep["point"]))
    assert {("bench", "engine", "offline"), ("bench", "static", "offline"), ("bench", "static-max", "offline"),
            ("random", "static", "x2"),
            ("prefix", "engine", "offline"), ("prefix-nocache", "engine", "offline"),
            ("bench-32", "hf", "offline")} <= runs
    bursty = sweep[sweep["workload"] == "random-bursty"]
    offline = sweep[(sweep["workload"] == "random") & (sweep["point"] == "offline") & (sweep["backend"] == "engine")]
    assert list(bursty["rate"]) == [pytest.approx(0.75 * offline["request_throughput"].iloc[0], rel=0.01)] * 2
    assert (sweep["num_ok"] == sweep["num_requests"]).all()
    hit = sweep.set_index(["workload", "backend"])["prefix_cache_hit_rate"]
    assert hit[("prefix", "engine")] > 0.1 and not hit[("prefix-nocache", "engine")] > 0
    assert hit[("prefix", "static")] > 0.1  # later static batches hit blocks of earlier ones
    waste = sweep[sweep["workload"] == "bench"].set_index("backend")["kv_waste_reserved_mean"]
    assert waste["static-max"] > waste["static"] > waste["engine"]
    assert sweep["goodput"].notna().all()  # the flagship states SLOs


def test_publish_and_table(flagship_run, tmp_path, capsys):
    dest = tmp_path / "published"
    assert main(["flagship", "--publish", str(flagship_run), "--dest", str(dest)]) == 0
    sweep = pd.read_parquet(dest / "sweep.parquet")
    assert sorted(p.stem for p in (dest / "summaries").iterdir()) == sorted(sweep["run_dir"])
    for png in ("bench_kv_over_time.png", "bench_latency_cdfs.png", "random_load_curve.png"):
        assert (dest / png).read_bytes()[:4] == b"\x89PNG"
    table = (dest / "table.md").read_text()
    assert table.count("\n| ") == len(sweep) + 1  # header + one row per run
    capsys.readouterr()
    assert main(["flagship", "--table", str(dest / "sweep.parquet")]) == 0
    out = capsys.readouterr().out
    ratio = sweep.set_index(["workload", "backend"]).loc["bench", "output_throughput"]
    for static in ("static", "static-max"):
        assert f"bench offline: continuous / {static} = {ratio['engine'] / ratio[static]:.2f}x" in out
    assert math.isfinite(ratio["engine"])
