"""The studies that run on a CPU (harness/studies/): their outputs, not their speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.studies import detokenize_cost

REPO = str(Path(__file__).resolve().parents[2])


def test_detokenize_cost_times_generate_with_and_without_text(tmp_path):
    out = tmp_path / "detok.json"
    assert detokenize_cost.main(["--model", "tiny", "--streams", "3", "--prompt-len", "5", "--output-len", "6",
                                 "--rounds", "2", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["tok_s_on"]) == len(result["tok_s_off"]) == 2
    assert all(v > 0 for v in result["tok_s_on"] + result["tok_s_off"])
    assert result["ratio_on_off"] == result["median_on"] / result["median_off"]


def test_tp_scaling_reports_pairs_after_the_first(tmp_path, monkeypatch):
    """`harness.studies.tp_scaling` on CPU: fresh TP=1 and TP=2 bench processes, the first pair shown but
    not counted; a bad TP-only engine option fails with the bench's message."""
    from harness.studies import tp_scaling

    monkeypatch.setenv("PYTHONPATH", REPO)
    small = ["--num-seqs", "2", "--max-input-len", "110", "--max-output-len", "100"]
    out = tmp_path / "scaling.json"
    result = tp_scaling.main(["--pairs", "1", "--json", str(out), *small])
    assert [r["counted"] for r in result["runs"]] == [False, True]
    pair = result["runs"][1]
    assert pair["tp1"]["output_tokens"] == pair["tp2"]["output_tokens"] > 0  # the same workload
    assert result["ratios"] == [pair["tp2"]["engine_tok_s"] / pair["tp1"]["engine_tok_s"]]
    assert json.loads(out.read_text())["median_ratio"] == result["median_ratio"]
    with pytest.raises(RuntimeError, match="all_reduce_norm_fusion"):
        tp_scaling.main(["--pairs", "1", "--engine-arg", "all_reduce_norm_fusion=bogus", *small])


def test_throughput_prefill_workload_for_two_backends_in_one_call(tmp_path, capsys):
    """`--workload prefill`: equal-length prompts, one output token; one engine per backend on
    the same prompts, each with token rates and effective TFLOP/s from harness.roofline."""
    from engine.config import PRESETS
    from harness.roofline import request_flops
    from harness.studies import throughput

    out = tmp_path / "prefill.json"
    assert throughput.main(["--workload", "prefill", "--num-seqs", "3", "--max-input-len", "40",
                            "--attention-backend", "torch,auto", "--repeat", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["runs"]) == ["torch", "auto"]
    want = request_flops(PRESETS["tiny"], 40, 1)
    for run in result["runs"].values():
        assert run["prompt_tokens"] == 120 and run["output_tokens"] == 3 and len(run["engine_s_runs"]) == 2
        assert run["prompt_tok_s"] == min(run["rate_runs"])  # the lower middle of two
        assert run["prompt_tok_s"] == pytest.approx(120 / run["engine_s"], rel=1e-3)
        assert (run["linear_flop"], run["attention_flop"]) == (3 * want.linear, 3 * want.attention)
        assert run["tflop_s"] == pytest.approx(3 * want.total / run["engine_s"] / 1e12, abs=1e-3)
    assert result["ratio_vs_first"]["auto"] == round(result["runs"]["auto"]["prompt_tok_s"]
                                                     / result["runs"]["torch"]["prompt_tok_s"], 3)
    assert "engine [auto]" in capsys.readouterr().out


def test_throughput_reports_the_run_of_median_rate(tmp_path):
    """--repeat 3 on the bench workload: seeds 0..2 draw workloads of different lengths, and the
    reported run is the one of median output tok/s, with every run's rate beside it."""
    from harness.studies import throughput

    out = tmp_path / "bench.json"
    assert throughput.main(["--num-seqs", "4", "--max-input-len", "120", "--max-output-len", "120",
                            "--repeat", "3", "--no-detokenize", "--json", str(out)]) == 0
    run = json.loads(out.read_text())
    assert len(run["rate_runs"]) == len(run["engine_s_runs"]) == 3
    assert run["engine_tok_s"] == sorted(run["rate_runs"])[1]
    assert run["engine_tok_s"] == pytest.approx(run["output_tokens"] / run["engine_s"], rel=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["--attention-backend", "triton,nope"], "comma-separated list"),
    (["--engine-arg", "attention_backend=torch"], "--attention-backend"),
])
def test_throughput_backend_list_errors(argv, message, capsys):
    from harness.studies import throughput

    with pytest.raises(SystemExit) as exc:
        throughput.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_request_flops_count_what_torch_counts_in_the_hf_model():
    """Linear: torch's FlopCounterMode over HF's forward (LM head on the last token only).
    Attention: HF's eager attention computes the full n x n scores, (n + 1) / 2n of which are
    the causal pairs request_flops counts."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from engine.config import EngineConfig
    from harness.backends.hf import hf_model_from_config
    from harness.roofline import request_flops

    cfg, n = EngineConfig(model="tiny"), 37
    model = hf_model_from_config(cfg, torch.float32, "cpu")
    model.config._attn_implementation = "eager"  # QK^T and PV as bmm, which the counter sees
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 100, (1, n)), logits_to_keep=1)
    counts = {str(op): v for op, v in counter.get_flop_counts()["Global"].items()}
    flops = request_flops(cfg.model_config, n, 1)
    assert flops.linear == counts["aten.mm"]
    assert flops.attention == counts["aten.bmm"] * (n + 1) / (2 * n)


def test_latency_sweeps_points_floors_them_and_reports_skips(tmp_path):
    """`llmbench studies latency` on the tiny model on CPU: a point past the model's positions
    and one past the KV budget are skipped with their reasons; the others are timed, their
    floor is harness.roofline's byte count over the measured bandwidth; TTFT per request."""
    import numpy as np
    import pandas as pd

    from engine.config import PRESETS
    from harness.roofline import weight_bytes
    from harness.studies import latency

    out = tmp_path / "lat"
    assert latency.main(["--model", "tiny", "--device", "cpu", "--batch", "1,2,4", "--context", "16,3000",
                         "--steps", "3", "--warmup-steps", "1", "--ttft-requests", "3", "--prompt-len", "8",
                         "--kv-cache-gb", "0.00005", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "latency.json").read_text())
    points = pd.read_parquet(out / "points.parquet")
    assert len(points) == len(result["points"]) == 6 and set(points["model"]) == {"tiny"}
    ran, skipped = points[points["fits"]], points[~points["fits"]]
    assert sorted(zip(ran["batch"], ran["context"])) == [(1, 16), (2, 16)]
    budget = result["kv_budget_bytes"]["tiny"]
    assert budget == 50_000 and (ran["kv_need_bytes"] <= budget).all()
    for row in skipped.itertuples():
        if row.context == 3000:
            assert "exceed the model's 2048 positions" in row.skip_reason
        else:
            assert row.batch == 4 and "KV of 4 x" in row.skip_reason and row.kv_need_bytes > budget
    assert skipped[["tpot_ms", "floor_ms", "gpu_ms"]].isna().all().all()
    assert ran["skip_reason"].isna().all()
    table = (out / "table.md").read_text().splitlines()  # a row per point (skips with their reason), TTFT
    rows = [line for line in table if line.startswith("| tiny | ")]
    assert len(rows) == 7 and sum("skipped: " in line for line in rows) == 4, table
    first = next(line for line in rows if line.startswith("| tiny | 1 | 16 |"))
    assert f"{ran['tpot_ms'].iloc[0]:.3f}" in first and "| tiny | 3 x 8 |" in table[-1]
    for column in ("tpot_ms", "host_ms", "schedule_ms", "launch_ms", "postprocess_ms", "floor_ms", "tpot_vs_floor"):
        assert (ran[column] > 0).all(), column
    np.testing.assert_allclose(ran["host_ms"], ran["schedule_ms"] + ran["launch_ms"] + ran["postprocess_ms"])
    assert ran[["gpu_ms", "gpu_vs_floor", "tpot_minus_gpu_ms"]].isna().all().all()  # no GPU: no graph replay
    # the floor: every weight once plus the KV of every stored token, over the copy bandwidth
    mc, bw = PRESETS["tiny"], result["copy_bandwidth_bytes_per_s"]
    assert (ran["weight_bytes"] == weight_bytes(mc, 4)).all()
    assert (ran["kv_tokens_per_seq"] > ran["context"]).all()  # the prompt and the tokens decoded so far
    np.testing.assert_allclose(ran["kv_bytes"], ran["kv_tokens_per_seq"] * ran["batch"] * mc.kv_bytes_per_token(4))
    np.testing.assert_allclose(ran["floor_ms"], (ran["weight_bytes"] + ran["kv_bytes"]) / bw * 1e3)
    np.testing.assert_allclose(ran["tpot_vs_floor"], ran["tpot_ms"] / ran["floor_ms"])
    ttft = pd.read_parquet(out / "ttft.parquet")
    assert len(ttft) == 3 and (ttft["ttft_ms"] > 0).all() and (ttft["host_ms"] > 0).all()
    assert (ttft["host_ms"] + ttft["wait_ms"] <= ttft["ttft_ms"]).all()
    summary = result["ttft"]["tiny"]
    assert summary["p50_ttft_ms"] == pytest.approx(ttft["ttft_ms"].median())
    assert summary["p50_ttft_ms"] <= summary["p90_ttft_ms"] and summary["prefill_gpu_ms"] is None
    assert result["estimated_s"] > 0 and result["actual_s"] > 0


def test_a_point_decodes_its_whole_batch_through_a_chunked_fill():
    """engine_sizing + measure_point: with a small token budget the fill takes several steps
    and the first sequences decode meanwhile; still no sequence finishes or is preempted in the
    timed steps (time_decode raises if one did) in an engine sized to the point, no larger."""
    from engine import LLM, EngineConfig
    from harness.studies import step_profile

    kwargs = {"device": "cpu", "max_num_batched_tokens": 32}
    sizing = step_profile.engine_sizing(EngineConfig(model="tiny", **kwargs), [(4, 40)], 3)
    llm = LLM("tiny", **kwargs, **sizing)
    row = step_profile.measure_point(llm, 4, 40, 2, 1, bandwidth=1e9)
    assert (row["batch"], row["steps"], row["gpu_ms"]) == (4, 2, None)
    # in step with the last prompt the mean would be 40 + 1 + 1 + 1.5 (the fill's last step, the
    # warm-up step, the mean timed step); the early sequences decoded during the fill too
    assert row["kv_tokens_per_seq"] > 40 + 3.5
    step_profile.drain(llm)
    assert not llm.engine.has_unfinished_requests() and llm.engine.block_manager.num_used_blocks == 0
    # what could make one timed step slow: nothing a CPU engine can show but the collector
    assert row["eager_steps"] is None and 0 < row["host_p50_ms"] <= row["host_max_ms"]
    assert row["gc_ms"] >= 0 and row["gc_full"] >= 0 and row["jit_compiles"] in (0, None)


def test_watch_gc_times_each_collection():
    import gc

    from harness.studies.step_profile import watch_gc

    with watch_gc() as seen:
        gc.collect()
        gc.collect(0)
    assert [g for g, _ in seen] == [2, 0] and all(t >= 0 for _, t in seen)
    assert not any(getattr(cb, "__name__", "") == "callback" for cb in gc.callbacks)  # removed again


def test_latency_flags_what_made_a_step_slow():
    """One line per point: the notes appear only when something happened in the timed steps
    (the B=2 point of PERF row 20: 10 ms of mean host time against a 1.7 ms graph)."""
    from harness.studies.latency import oddities

    quiet = {"host_p50_ms": 0.2, "host_max_ms": 0.3, "jit_compiles": 0, "jit_kernels": "", "gc_ms": 0.1,
             "gc_full": 0, "eager_steps": 0}
    assert oddities(quiet) == ""
    loud = oddities({**quiet, "host_max_ms": 160.0, "jit_compiles": 1, "jit_kernels": "engine.kernels.x._k",
                     "gc_ms": 40.0, "gc_full": 1, "eager_steps": 16})
    for note in ("host max 160.0 ms", "1 Triton compile(s): engine.kernels.x._k", "GC 40.0 ms (1 full)",
                 "16 eager step(s)"):
        assert note in loud


@pytest.mark.gpu
def test_latency_on_a_gpu_times_the_graph_and_the_prefill_kernels(tmp_path):
    """The CUDA parts of the latency study: graph replays (gpu_ms), the prefill's kernel time
    from torch.profiler, and the device's own KV budget."""
    import pandas as pd

    from harness.studies import latency

    out = tmp_path / "lat"
    assert latency.main(["--model", "tiny", "--batch", "1,8", "--context", "64", "--steps", "8",
                         "--ttft-requests", "3", "--prompt-len", "32", "--out", str(out), "--no-progress"]) == 0
    points = pd.read_parquet(out / "points.parquet")
    assert points["fits"].all() and (points["gpu_ms"] > 0).all()
    assert (points["gpu_ms"] < points["tpot_ms"]).all()  # the model part is inside the step
    assert (points["eager_steps"] == 0).all()  # every timed decode step replayed its graph
    result = json.loads((out / "latency.json").read_text())
    assert result["ttft"]["tiny"]["prefill_gpu_ms"] > 0 and result["kv_budget_bytes"]["tiny"] > 1e9


def test_ttft_study_times_requests_and_takes_a_prefill_step_apart(tmp_path):
    from harness.studies import ttft

    out = tmp_path / "ttft.json"
    assert ttft.main(["--model", "tiny", "--device", "cpu", "--input-len", "20", "--output-len", "3",
                      "--num-prompts", "3", "--limits", "16,0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["max_graph_prefill_tokens"] for r in result["runs"]] == [16, 0]
    for run in result["runs"]:
        assert 0 < run["ttft_ms_p50"] <= run["ttft_ms_p90"] and run["tpot_ms_p50"] > 0
        step = run["prefill_step"]
        assert step["graphed"] is False  # no CUDA graphs on the CPU
        assert step["gpu_kernels"] is None and step["aten_ops"] > 0
        assert set(step["host_ms"]) == {"prepare_inputs", "model_forward", "sample"}
        assert 0 < step["host_ms"]["model_forward"] < step["launch_ms"] <= step["launch_to_result_ms"]


def test_kv_agreement_compares_fp8_with_the_model_dtype_cache(tmp_path):
    """Two engines on the same bench prompts, greedy: the report's counts agree with its own
    per-request first differences, which lie within the output length."""
    from harness.studies import kv_agreement

    out = tmp_path / "agree.json"
    assert kv_agreement.main(["--model", "tiny", "--kv-cache-dtype", "fp8", "--num-prompts", "3",
                              "--max-input-len", "120", "--output-len", "6", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    first = r["first_differences"]
    assert r["kv_cache_dtype"] == "fp8" and len(first) == r["requests"] == 3
    assert all(0 <= f <= 6 for f in first)
    assert r["identical"] == sum(f == 6 for f in first) and r["first_difference_min"] == min(first)
    assert r["tokens_before_first_difference"] == pytest.approx(sum(first) / 18)


def test_kv_agreement_needs_another_cache(capsys):
    from harness.studies import kv_agreement

    with pytest.raises(SystemExit):
        kv_agreement.main(["--model", "tiny", "--num-prompts", "2"])
    assert "--kv-cache-dtype" in capsys.readouterr().err


def test_first_differences():
    from harness.studies.kv_agreement import first_differences

    assert first_differences([[1, 2, 3], [4, 5], [6]], [[1, 2, 3], [4, 9], [7]]) == [3, 1, 0]


@pytest.mark.parametrize("backends", ["auto", "torch,auto"])
def test_throughput_hf_baseline_rates_every_backend(tmp_path, backends):
    """--hf: HF generate on the same prompts; the engine's speed-up over it for each backend run,
    from that backend's own rate."""
    from harness.studies import throughput

    out = tmp_path / "hf.json"
    assert throughput.main(["--workload", "prefill", "--num-seqs", "2", "--max-input-len", "40", "--hf",
                            "--hf-batch-size", "2", "--attention-backend", backends, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    runs = r.get("runs", {backends: r})
    assert list(r["speedup_vs_hf"]) == backends.split(",")
    for b, run in runs.items():
        assert r["speedup_vs_hf"][b] == round(run["prompt_tok_s"] / r["hf_prompt_tok_s"], 2)
