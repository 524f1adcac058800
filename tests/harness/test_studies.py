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
