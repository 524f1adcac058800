"""harness/served.py: the tiny model served over HTTP and in process, on a tiny bench workload."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from harness.backends.served import engine_arg_flags, server_flags
from harness.served import main

TINY_BENCH = ["--param", "num_seqs=6", "--param", "min_input_len=8", "--param", "max_input_len=32",
              "--param", "min_output_len=8", "--param", "max_output_len=16"]


def test_server_flags_pass_the_pairs_to_the_servers_own_parser():
    from engine.serve.cli import build_parser, engine_config

    pairs = ["max_num_seqs=8", "enforce_eager=true", "enable_prefix_caching=false", "dtype=float32"]
    config = engine_config(build_parser().parse_args(server_flags(pairs)))
    assert (config.max_num_seqs, config.enforce_eager, config.enable_prefix_caching, config.dtype) == (
        8, True, False, "float32")
    # the served backend's engine_args dict reads back the same way (values as JSON)
    config = engine_config(build_parser().parse_args(engine_arg_flags(
        {"max_num_seqs": 8, "enforce_eager": True, "num_kv_blocks": 48, "dtype": "float32", "max_model_len": 512})))
    assert (config.max_num_seqs, config.enforce_eager, config.num_kv_blocks, config.dtype, config.max_model_len) == (
        8, True, 48, "float32", 512)


def test_repeats_of_a_generator_get_their_own_seeds():
    from harness.served import request_sets
    from workloads.spec import WorkloadSpec

    sets = request_sets(WorkloadSpec(kind="bench", params={"num_seqs": 3, "seed": 5}), "tiny", 3)
    prompts = [[r.prompt_token_ids for r in one] for one in sets]
    assert prompts[0] == [r.prompt_token_ids for r in WorkloadSpec(kind="bench", params={"num_seqs": 3, "seed": 5}).build(512)]
    assert prompts[0] != prompts[1] != prompts[2]


def test_served_vs_in_process(tmp_path, capsys):
    out = tmp_path / "served"
    rc = main(["--model", "tiny", "--workload", "bench", *TINY_BENCH, "--engine-arg", "max_num_seqs=4",
               "--processes", "2", "--repeat", "2", "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.out + printed.err + (out / "server.log").read_text()
    result = json.loads((out / "served.json").read_text())
    assert result["served_ok"] == result["in_process_ok"] == 12
    assert len(result["served_runs_tok_s"]) == len(result["in_process_runs_tok_s"]) == 2
    assert result["ratio"] == pytest.approx(result["served_output_tok_s"] / result["in_process_output_tok_s"])
    assert result["client"] == "openai" and result["client_processes"] == 2
    assert result["stream_interval"] == 1 and result["server_engine"] == "core-process"  # read off /v1/models
    assert result["server_args"] == ["--engine-arg=max_num_seqs=4"]
    sweep = pd.read_parquet(out / "sweep.parquet")
    assert list(sweep["backend"]) == ["served-openai"] * 2 + ["engine"] * 2
    # both sides generated the same tokens for the same requests, repeat by repeat
    served, local = sweep[sweep["backend"] == "engine"], sweep[sweep["backend"] != "engine"]
    assert list(served["total_output_tokens"]) == list(local["total_output_tokens"])
    assert "served / in-process output throughput" in printed.out
    with pytest.raises(SystemExit):  # a folder that holds a served run is not overwritten
        main(["--model", "tiny", "--out", str(out)])


def test_bad_arguments_exit_2(tmp_path):
    for argv in (["--engine-arg", "no_such_field=1"], ["--param", "oops"], ["--processes", "0"]):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", str(tmp_path / "x")])
        assert e.value.code == 2


def test_a_server_that_does_not_start_is_an_error(tmp_path, capsys):
    rc = main(["--model", "tiny", *TINY_BENCH, "--server-arg=--no-such-flag", "--out", str(tmp_path / "s")])
    assert rc == 1 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_served_with_locust(tmp_path, capsys):
    out = tmp_path / "served-locust"
    rc = main(["--model", "tiny", "--workload", "bench", *TINY_BENCH, "--client", "locust", "--run-time", "3s",
               "--max-concurrency", "2", "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.out + printed.err
    result = json.loads((out / "served.json").read_text())
    assert result["client"] == "locust" and result["served_ok"] >= 1 and result["ratio"] > 0
    assert list(pd.read_parquet(out / "sweep.parquet")["backend"]) == ["served-locust", "engine"]


def test_locust_replays_each_request_once_over_its_processes(tmp_path, capsys):
    """One user per request, spread over two locust processes: every request of the workload is
    sent exactly once, so both sides generate the same tokens."""
    out = tmp_path / "served-locust-once"
    rc = main(["--model", "tiny", "--workload", "bench", *TINY_BENCH, "--client", "locust", "--run-time", "6s",
               "--processes", "2", "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.out + printed.err
    result = json.loads((out / "served.json").read_text())
    assert result["served_ok"] == result["served_requests"] == result["in_process_ok"] == 6
    sweep = pd.read_parquet(out / "sweep.parquet")
    assert sweep["total_output_tokens"].nunique() == 1
    prompts = sorted(pd.read_parquet(out / "bench-served" / "requests.parquet")["prompt_tokens"])
    assert prompts == sorted(pd.read_parquet(out / "bench-engine" / "requests.parquet")["prompt_tokens"])
