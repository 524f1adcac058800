"""The flagship on the tiny plan (CPU, toy sizes), run the way the GPU runs are: in pieces that
append to one folder (--only/--out), the bursty and served-random rates read from the random
sweep of the earlier piece, served rows from a real server beside the in-process ones, a
failing server recorded loudly, and the published copy per model. Run:
pytest tests/harness/test_flagship.py"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from harness.cli import main
from harness.studies import flagship
from harness.studies.flagship_plans import LLAMA, PLANS, TINY

FLAGS = ["--model", "tiny", "--no-telemetry", "--no-progress"]
PIECE_1 = "bench,random,prefix,prefix-nocache,sharegpt-like"  # hf: its spec below (transformers is slow to import)
PIECE_2 = "random-bursty,served-random"


@pytest.fixture(scope="module")
def pieces(tmp_path_factory):
    """Two pieces into one folder, as two device calls would run them."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("fl") / "run"
    assert main(["flagship", *FLAGS, "--only", PIECE_1, "--out", str(out)]) == 0
    first = pd.read_parquet(out / "sweep.parquet")
    assert main(["flagship", *FLAGS, "--only", PIECE_2, "--out", str(out)]) == 0
    return out, first


def test_the_second_piece_appends_and_takes_randoms_rate_from_the_first(pieces):
    out, first = pieces
    sweep = pd.read_parquet(out / "sweep.parquet")
    assert sweep.iloc[:len(first)]["run_dir"].tolist() == first["run_dir"].tolist()  # appended, not rewritten
    runs = set(zip(sweep["workload"], sweep["backend"], sweep["point"]))
    assert {("bench", "static-max", "offline"), ("random", "static", "x2"), ("prefix-nocache", "engine", "offline"),
            ("sharegpt-like", "static-max", "offline"),
            ("random", "served", "offline"), ("random", "served", "x1")} <= runs
    offline = first.set_index(["workload", "backend", "point"]).loc[("random", "engine", "offline"), "request_throughput"]
    rates = sweep.set_index(["workload", "backend", "point"])["rate"]
    assert rates[("random", "served", "x1")] == offline  # exactly the in-process x1 rate
    bursty = sweep[sweep["workload"] == "random-bursty"]
    assert list(bursty["rate"]) == [round(0.75 * offline, 2)] * 2
    assert (sweep["num_ok"] == sweep["num_requests"]).all() and sweep["goodput"].notna().all()
    manifest = json.loads((out / "flagship.json").read_text())
    assert (manifest["model"], manifest["kv_blocks"]) == ("tiny", TINY.kv_blocks)
    assert [s["status"] for s in manifest["sweeps"].values()] == ["ok"] * 7


def test_served_rows_are_the_same_requests_through_a_server(pieces):
    out, _ = pieces
    sweep = pd.read_parquet(out / "sweep.parquet").set_index(["workload", "backend", "point"])
    for point in ("offline", "x1"):
        served = sweep.loc[("random", "served", point)]
        assert served["server_scrapes"] > 0  # its /metrics was scraped: the † columns have a source
    assert sweep.loc[("random", "served", "offline"), "total_output_tokens"] == \
        sweep.loc[("random", "engine", "offline"), "total_output_tokens"]
    config = pd.read_parquet(out / "random-served-x1" / "summary.parquet")  # a report like any other
    assert config["num_ok"].iloc[0] == TINY.random["num_prompts"]
    logs = sorted((out / "server-logs").iterdir())
    assert len(logs) == 2  # one server per point: a reset restarts it (its prefix cache is not ours)


def test_policies_bind_at_the_plans_kv_size(pieces):
    out, _ = pieces
    sweep = pd.read_parquet(out / "sweep.parquet")
    for workload in ("bench", "sharegpt-like"):
        waste = sweep[sweep["workload"] == workload].set_index("backend")["kv_waste_reserved_mean"]
        assert waste["static-max"] > waste["static"] > waste["engine"] == 0
    hit = sweep.set_index(["workload", "backend"])["prefix_cache_hit_rate"]
    assert hit[("prefix", "engine")] > 0.1 and hit[("prefix", "static")] > 0.1 and not hit[("prefix-nocache", "engine")] > 0


def test_publish_per_model(pieces, tmp_path, monkeypatch, capsys):
    out, _ = pieces
    monkeypatch.chdir(tmp_path)
    assert main(["flagship", "--publish", str(out)]) == 0
    dest = tmp_path / "reports" / "flagship" / "tiny"
    sweep = pd.read_parquet(dest / "sweep.parquet")
    assert sorted(p.stem for p in (dest / "summaries").iterdir()) == sorted(sweep["run_dir"])
    for png in ("bench_kv_over_time.png", "bench_latency_cdfs.png", "random_load_curve.png"):
        assert (dest / png).read_bytes()[:4] == b"\x89PNG"
    table = (dest / "table.md").read_text()
    assert "- served-bench: NOT RUN" in table and "- hf: NOT RUN" in table and "- bench: ok" in table
    assert f"{len(sweep)} runs, {sweep['num_requests'].sum()} requests: {sweep['num_requests'].sum()} ok, 0 errors" in table
    rows = [line for line in table.splitlines() if line.startswith("| random | offline |")]
    assert [line.split(" | ")[2] for line in rows] == ["engine", "served", "static"]  # side by side
    ratio = sweep.set_index(["workload", "backend", "point"])["output_throughput"]
    served = ratio[("random", "served", "x1")]
    capsys.readouterr()
    assert main(["flagship", "--table", str(dest / "sweep.parquet")]) == 0
    printed = capsys.readouterr().out
    for line in (f"bench offline: continuous / static-max = {ratio[('bench', 'engine', 'offline')] / ratio[('bench', 'static-max', 'offline')]:.2f}x",
                 f"random x1: served / in-process = {served / ratio[('random', 'engine', 'x1')]:.2f}x"):
        assert line in printed and line in table


def test_a_piece_is_refused_before_any_model_loads(pieces, tmp_path, capsys):
    out, _ = pieces
    cases = [(["--only", "prefix-nocache", "--out", str(out)], "already holds prefix-nocache (1 runs)"),
             (["--only", "prefix-nocache", "--kv-blocks", "64", "--out", str(out)], "tiny at 48 KV blocks"),
             (["--only", "random-bursty", "--out", str(tmp_path / "new")], "run `--only random`"),
             (["--only", "bench,nope", "--out", str(tmp_path / "new")], "unknown flagship sweep(s) ['nope']"),
             (["--model", "gpt-5", "--out", str(tmp_path / "new")], "no flagship plan for 'gpt-5'")]
    for argv, message in cases:
        capsys.readouterr()
        assert main(["flagship", *FLAGS, *argv]) == 2
        assert message in capsys.readouterr().err.replace("\n", " ")


def test_redo_replaces_a_sweep_in_place(pieces):
    out, _ = pieces
    before = pd.read_parquet(out / "sweep.parquet")
    assert main(["flagship", *FLAGS, "--only", "prefix-nocache", "--redo", "--out", str(out)]) == 0
    after = pd.read_parquet(out / "sweep.parquet")
    assert sorted(after["run_dir"]) == sorted(before["run_dir"]) and len(after) == len(before)
    assert after["run_dir"].iloc[-1] == "prefix-nocache-engine-offline"  # its row went to the end


def test_a_server_that_does_not_start_fails_its_sweep_loudly(pieces, tmp_path, monkeypatch, capsys):
    """The other sweeps of the piece still run; the failed one is recorded, and published as such."""
    import harness.backends.served as served_mod

    def dying_server(model, port, args, log_path, env=None):
        with log_path.open("wb") as log:
            return subprocess.Popen([sys.executable, "-c", "print('no module named fastapi'); raise SystemExit(3)"],
                                    stdout=log, stderr=subprocess.STDOUT)

    monkeypatch.setattr(served_mod, "start_server", dying_server)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["flagship", *FLAGS, "--only", "prefix-nocache,served-bench", "--out", str(out)]) == 1
    printed = capsys.readouterr()
    text = (printed.out + printed.err).replace("\n", " ")
    assert "FAILED served-bench" in text and "exited with status 3" in text and "no module named fastapi" in text
    manifest = json.loads((out / "flagship.json").read_text())["sweeps"]
    assert manifest["prefix-nocache"]["status"] == "ok" and manifest["served-bench"]["status"] == "failed"
    assert "- served-bench: FAILED (RuntimeError" in (flagship_publish_table(out, tmp_path / "pub"))


def flagship_publish_table(out, dest) -> str:
    from harness.studies.flagship_publish import publish

    return (publish(out, dest) / "table.md").read_text()


def test_served_sweeps_need_the_servers_modules(tmp_path, monkeypatch, capsys):
    import harness.backends.served as served_mod

    monkeypatch.setattr(served_mod, "SERVER_MODULES", ("fastapi", "no_such_module_here"))
    assert main(["flagship", *FLAGS, "--only", "served-bench", "--out", str(tmp_path / "x")]) == 2
    assert "needs no_such_module_here" in capsys.readouterr().err


def test_served_bench_gets_the_bench_sweeps_model_and_engine_args(tmp_path):
    for plan in PLANS.values():
        bench, served = (flagship.build_sweep(plan, x, tmp_path) for x in ("bench", "served-bench"))
        assert served.backends == ["served"] and served.model == bench.model == plan.model
        assert served.engine_args == bench.engine_args and served.workload == bench.workload
        assert bench.engine_args["num_kv_blocks"] == plan.kv_blocks
        hf = flagship.build_sweep(plan, "hf", tmp_path)
        assert hf.backends == ["engine", "static", "hf"] and hf.backend_args["hf"]["batch_size"] == plan.hf_requests
        assert len(hf.workload.build(None)) == plan.hf_requests and hf.workload.name == f"bench-{plan.hf_requests}"


def test_every_plan_splits_every_sweep_into_affordable_pieces(tmp_path, capsys):
    for plan in PLANS.values():
        assert sorted(x for piece in plan.pieces for x in piece) == sorted(flagship.SWEEPS)
    guess = flagship.estimates(LLAMA, flagship.SWEEPS, tmp_path)
    assert all(sum(guess[x] for x in piece) < 8 * 60 for piece in LLAMA.pieces)
    assert main(["flagship", "--model", "llama-3-8b", "--estimate", "--out", "reports/fl-llama"]) == 0
    printed = capsys.readouterr().out
    assert f"--model llama-3-8b --only {','.join(LLAMA.pieces[0])} --out reports/fl-llama" in printed


def test_a_piece_run_from_the_published_copy_publishes_into_it(pieces, tmp_path):
    """Another machine starts from reports/flagship/<model>/ (sweep.parquet, flagship.json), runs
    one more sweep and publishes back: the earlier summaries and plots stay, the new ones join."""
    import shutil

    from harness.studies.flagship_publish import publish

    out, _ = pieces
    dest = publish(out, tmp_path / "pub")
    plot = (dest / "bench_kv_over_time.png").read_bytes()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("sweep.parquet", "flagship.json"):
        shutil.copy(dest / name, resumed / name)
    assert main(["flagship", *FLAGS, "--only", "hf", "--out", str(resumed)]) == 0
    assert not (resumed / "bench-engine-offline").exists()  # only the new runs are here
    publish(resumed, dest)
    sweep = pd.read_parquet(dest / "sweep.parquet")
    assert {"hf"} <= set(sweep["backend"]) and len(sweep) > len(pd.read_parquet(out / "sweep.parquet"))
    assert sorted(p.stem for p in (dest / "summaries").iterdir()) == sorted(sweep["run_dir"])
    assert (dest / "bench_kv_over_time.png").read_bytes() == plot
    table = (dest / "table.md").read_text()
    assert "- hf: ok" in table and "- bench: ok" in table and "Device: unknown" not in table
