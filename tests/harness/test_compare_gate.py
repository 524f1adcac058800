"""compare (table + HTML) and gate (ratio baselines), including the CI gate: the small sweep
the committed baseline reports/baselines/cpu_tiny.json was written from, gated against it.

Run: .venv/bin/python -m pytest tests/test_compare_gate.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from rich.console import Console

from harness import gate
from harness.bench import CI_PLAN, bench_sweeps
from harness.cli import main
from harness.compare import load_runs, summary_table
from harness.report import SWEEP_FILE
from harness.sweep import run_sweep

BASELINE = Path(__file__).resolve().parents[2] / "reports" / "baselines" / "cpu_tiny.json"


@pytest.fixture(scope="module")
def ci_sweep(tmp_path_factory) -> Path:
    """`python -m harness bench --ci`: bench workload offline, engine vs static (seconds)."""
    old = torch.get_num_threads()
    torch.set_num_threads(CI_PLAN.threads)  # as the bench command does on CPU
    try:
        out = tmp_path_factory.mktemp("ci") / "sweep"
        (spec,) = bench_sweeps(CI_PLAN, telemetry=False, progress=False)
        run_sweep(spec, out, Console(quiet=True))
    finally:
        torch.set_num_threads(old)
    return out


def test_ci_sweep_passes_the_committed_baseline(ci_sweep, capsys):
    # Ratios (continuous/static) measured in the same run: machine speed cancels. The baseline
    # file's generous threshold covers the throughput ratio on shared CI machines; its tight
    # per-metric thresholds apply to the scheduling-only figures (steps, KV waste).
    assert main(["gate", "--baseline", str(BASELINE), "--current", str(ci_sweep)]) == 0, capsys.readouterr().out
    names = {m.name for m in gate.load_baseline(BASELINE)[0]}
    assert "bench@offline engine/static output_throughput" in names
    assert "bench@offline engine/static num_steps" in names


def test_gate_passes_on_a_run_compared_with_itself(ci_sweep):
    assert main(["gate", "--baseline", str(ci_sweep), "--current", str(ci_sweep), "--threshold", "0"]) == 0
    one_report = ci_sweep / "bench-engine-offline"  # absolute figures for a single report
    assert main(["gate", "--baseline", str(one_report), "--current", str(one_report), "--threshold", "0"]) == 0


def test_gate_fails_on_an_injected_regression(ci_sweep, tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    assert main(["gate", "--write-baseline", str(baseline), "--current", str(ci_sweep)]) == 0
    slow = tmp_path / "slow"
    slow.mkdir()
    frame = pd.read_parquet(ci_sweep / SWEEP_FILE)
    frame.loc[frame["backend"] == "engine", "output_throughput"] *= 0.7  # engine 30% slower
    frame.to_parquet(slow / SWEEP_FILE)
    capsys.readouterr()
    assert main(["gate", "--baseline", str(baseline), "--current", str(slow)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED" in out and "FAILED" in out
    assert main(["gate", "--baseline", str(baseline), "--current", str(slow), "--threshold", "0.4"]) == 0


def test_write_baseline_takes_medians_and_tight_thresholds(ci_sweep, tmp_path):
    path = gate.write_baseline([ci_sweep, ci_sweep], tmp_path / "b.json", threshold=0.3)
    doc = json.loads(path.read_text())
    assert doc["threshold"] == 0.3
    steps = next(m for m in doc["metrics"] if m["metric"] == "num_steps" and m["denominator"] == "static")
    assert steps["threshold"] == gate.METRIC_THRESHOLDS["num_steps"] and 0 < steps["value"] < 1


def test_absolute_figures_of_the_reference_backend_are_gated(ci_sweep, tmp_path, capsys):
    out = tmp_path / "abs.json"
    assert main(["gate", "--write-baseline", str(out), "--current", str(ci_sweep),
                 "--absolute", "mean_batch_size:higher"]) == 0
    doc = json.loads(out.read_text())
    own = [m for m in doc["metrics"] if m["metric"] == "mean_batch_size"]
    assert [m["backend"] for m in own] == ["engine"] and "denominator" not in own[0]
    assert main(["gate", "--baseline", str(out), "--current", str(ci_sweep)]) == 0
    own[0]["value"] *= 2  # the engine's own batch halved: a regression
    out.write_text(json.dumps(doc))
    assert main(["gate", "--baseline", str(out), "--current", str(ci_sweep)]) == 1
    assert "mean_batch_size" in capsys.readouterr().out


def test_missing_point_fails_the_gate(ci_sweep):
    metrics, _ = gate.load_baseline(BASELINE)
    other = gate.GateMetric("random", "x0.5", "output_throughput", "higher", 1.0, numerator="engine",
                            denominator="static")
    results = gate.check([*metrics, other], gate.observations(ci_sweep), threshold=0.9)
    assert [r.ok for r in results][-1] is False and results[-1].current is None


def test_bad_baseline_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"metrics": [{"metric": "x"}]}')
    assert main(["gate", "--baseline", str(bad), "--current", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_compare_table_and_html(ci_sweep, tmp_path, capsys):
    runs = load_runs([ci_sweep])
    assert [r.label for r in runs] == ["engine", "static"]
    html = tmp_path / "cmp.html"
    assert main(["compare", str(ci_sweep / "bench-engine-offline"), str(ci_sweep / "bench-static-offline"),
                 "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "output tok/s" in out and "KV waste mean" in out and str(html) in out.replace("\n", "")
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 3  # throughput, latency CDFs, KV over time
    assert "no GPU telemetry" in page  # CPU: the GPU plot is replaced by a note
    console = Console(width=200, record=True)
    console.print(summary_table(runs))
    assert "(0." in console.export_text() or "(1." in console.export_text()  # ratios to the first run


def test_compare_rejects_a_folder_without_reports(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert "neither a report folder" in capsys.readouterr().err


def test_default_html_lands_next_to_the_reports(ci_sweep, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ci_sweep, copy)
    assert main(["compare", str(copy)]) == 0
    assert list(copy.glob("compare-*.html"))
