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
        assert run["prompt_tok_s"] == pytest.approx(120 / run["engine_s"], rel=1e-3)
        assert (run["linear_flop"], run["attention_flop"]) == (3 * want.linear, 3 * want.attention)
        assert run["tflop_s"] == pytest.approx(3 * want.total / run["engine_s"] / 1e12, abs=1e-3)
    assert result["ratio_vs_first"]["auto"] == round(result["runs"]["auto"]["prompt_tok_s"]
                                                     / result["runs"]["torch"]["prompt_tok_s"], 3)
    assert "engine [auto]" in capsys.readouterr().out


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
