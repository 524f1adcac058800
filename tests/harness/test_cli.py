"""The command line: bad input gives one `error:` line and exit status 2, never a traceback;
a small run writes a report; every `llmbench` subcommand answers --help; engine flags reach the
EngineConfig.

Run: .venv/bin/python -m pytest tests/harness/test_cli.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import GROUPS, MOUNTED, build_parser, main
from harness.commands import COMMANDS, parse_value
from harness.report import load_report

ROOT = Path(__file__).resolve().parents[2]


def _trace(tmp_path: Path, *rows: dict) -> str:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_missing_field_in_trace(tmp_path, capsys):
    trace = _trace(tmp_path, {"arrival_s": 0, "prompt": "hi", "max_tokens": 4}, {"arrival_s": 1, "prompt": "yo"})
    assert main(["run", "--trace", trace, "--out", str(tmp_path / "out")]) == 2
    line = _error_line(capsys)
    assert line.startswith("llmbench run: error:")
    assert "row 2" in line and "'max_tokens'" in line and "missing required field" in line
    assert not (tmp_path / "out").exists()


def test_negative_max_tokens_in_trace(tmp_path, capsys):
    trace = _trace(tmp_path, {"arrival_s": 0, "prompt": "hi", "max_tokens": -3})
    assert main(["run", "--trace", trace]) == 2
    line = _error_line(capsys)
    assert "row 1" in line and "'max_tokens'" in line and "-3" in line


def test_unknown_backend_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--backend", "vllm"])
    assert exc.value.code == 2
    line = _error_line(capsys)
    assert "invalid choice: 'vllm'" in line and "engine" in line and "openai" in line


def test_unknown_backend_in_a_sweep(capsys):
    assert main(["sweep", "--backends", "engine,trt"]) == 2
    assert "valid backends: engine, static, static-max, hf, openai" in _error_line(capsys)


@pytest.mark.parametrize("argv, message", [
    (["run", "--workload", "random", "--param", "input_len=-4"], "random input_len"),
    (["run", "--workload", "smoke", "--param", "nonsense=1"], "unknown parameter"),
    (["run", "--param", "novalue"], "expects KEY=VALUE"),
    (["run", "--engine-arg", "block_size=0"], "block_size must be >= 1"),
    (["run", "--engine-arg", "blocksize=16"], "unknown --engine-arg"),
    (["run", "--backend", "hf", "--backend-arg", "batchsize=4"], "unknown --backend-arg"),
    (["run", "--max-concurrency", "0"], "max-concurrency"),
    (["sweep", "--profile", "fixed"], "needs --rates"),
    (["sweep", "--profile", "sweep", "--fractions", "0.5,5"], "fractions must be numbers in (0, 4]"),
    (["gate", "--baseline", "nope.json", "--current", "."], "neither a sweep folder"),
])
def test_bad_arguments_give_one_error_line(argv, message, capsys):
    assert main(argv) == 2
    assert message in _error_line(capsys)


def test_rate_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--rate", "0"])
    assert exc.value.code == 2
    assert "must be > 0" in _error_line(capsys)


def test_out_folder_must_be_new(tmp_path, capsys):
    (tmp_path / "x").write_text("taken")
    assert main(["run", "--out", str(tmp_path)]) == 2
    assert "already exists" in _error_line(capsys)


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("inf") == float("inf") and parse_value("torch") == "torch"
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("True") is True and parse_value(" False") is False and parse_value("None") is None


def test_bad_trace_through_the_real_entry_point(tmp_path):
    trace = _trace(tmp_path, {"arrival_s": 0, "prompt": "hi", "max_tokens": 0})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "--trace", trace], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "must be an int >= 1" in proc.stderr


def test_small_run_writes_a_report(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--backend", "static", "--workload", "smoke", "--param", "num_prompts=4",
            "--param", "max_tokens_out=8", "--rate", "inf", "--engine-arg", "device=cpu",
            "--num-kv-blocks", "64", "--max-num-seqs", "3", "--slo-ttft-ms", "5000", "--bandwidth-gbps", "20",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert "report:" in capsys.readouterr().out
    report = load_report(out)
    summary = report.summary_row()
    assert summary["num_ok"] == 4 and summary["slo_ttft_ms"] == 5000 and summary["goodput"] is not None
    assert summary["roofline_bandwidth_bytes_per_s"] == 20e9 and 0 < summary["roofline_efficiency"] < 1
    config = report.metadata["config"]
    assert config["backend"] == "static" and config["workload"]["kind"] == "smoke"
    engine_config = config["backend_info"]["engine_config"]
    assert (engine_config["scheduling_policy"], engine_config["max_num_seqs"], engine_config["num_kv_blocks"]) \
        == ("static", 3, 64)  # the backend's, a flag, and --engine-arg
    assert config["telemetry"]["nvml_available"] in (True, False)
    assert report.recompute_summary() == summary


# ---- llmbench: subcommands, engine flags ---------------------------------------------------
def _every_subcommand() -> list[list[str]]:
    """Every command line `llmbench` answers, from its own tables (a new one is covered)."""
    top = build_parser()._subparsers._group_actions[0].choices
    lines = [[], *([name] for name in top if name not in GROUPS)]
    for group, (_, members) in GROUPS.items():
        lines += [[group], *([group, name] for name in members)]
    return lines


def test_the_subcommands_are_the_documented_ones():
    names = {" ".join(line) for line in _every_subcommand()}
    assert {"serve", "run", "sweep", "compare", "gate", "bench", "flagship", "studies throughput",
            "studies tp-scaling", "studies step-profile", "kernels bench-decode", "kernels bench-allreduce",
            "kernels compile-check"} <= names
    assert set(MOUNTED) | set(GROUPS) | set(COMMANDS) <= names


@pytest.mark.parametrize("line", _every_subcommand(), ids=lambda line: " ".join(line) or "llmbench")
def test_every_subcommand_answers_help(line, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*line, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(['llmbench', *line])} ")


@pytest.mark.parametrize("argv, message", [
    (["run", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["serve", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["studies", "throughput", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["kernels", "compile-check", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["serve", "--max-num-seqs", "many"], "invalid int value: 'many'"),
    (["run", "--dtype", "float8"], "invalid choice: 'float8'"),
    (["studies", "nope"], "invalid choice: 'nope'"),
    (["kernels"], "required: NAME"),
    (["nope"], "invalid choice: 'nope'"),
    ([], "required: COMMAND"),
])
def test_bad_command_lines_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in _error_line(capsys)


def test_engine_flags_reach_the_run_spec():
    def engine_args(*argv):
        return COMMANDS["run"](build_parser().parse_args(["run", "--backend", "static", *argv])).spec.engine_args

    assert engine_args("--max-num-seqs", "8", "--no-prefix-caching", "--engine-seed", "4") == \
        {"max_num_seqs": 8, "enable_prefix_caching": False, "seed": 4}
    assert engine_args("--engine-arg", "max-num-seqs=8") == {"max_num_seqs": 8}  # the alias
    bench = COMMANDS["bench"](build_parser().parse_args(["bench", "--ci", "--max-num-seqs", "8"]))
    assert bench.plan.engine_args["max_num_seqs"] == 8


@pytest.mark.parametrize("argv, message", [
    (["run", "--max-num-seqs", "8", "--engine-arg", "max_num_seqs=16"], "given both as a flag and as --engine-arg"),
    (["run", "--engine-arg", "model=tiny"], "set by this command's own --model"),
    (["run", "--backend", "engine", "--scheduling-policy", "static"], "set by the backend"),
    (["sweep", "--max-model-len", "1"], "max_model_len must be in"),
    (["bench", "--ci", "--block-size", "8", "--engine-arg", "block_size=16"], "given both"),
])
def test_engine_flag_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in _error_line(capsys)


def test_serve_engine_flags_reach_the_config(monkeypatch):
    import engine.serve.cli as serve_cli

    built = {}
    monkeypatch.setattr(serve_cli, "create_app", lambda config, *args, **kwargs: built.setdefault("config", config))
    monkeypatch.setattr(serve_cli, "serve", lambda app, host, port, log_level: built.setdefault("port", port))
    assert main(["serve", "--port", "0", "--max-num-seqs", "8", "--no-chunked-prefill", "--max-num-batched-tokens",
                 "8192", "--engine-arg", "dist_timeout_s=30", "--async-scheduling"]) == 0
    cfg = built["config"]
    assert (cfg.max_num_seqs, cfg.enable_chunked_prefill, cfg.dist_timeout_s, cfg.async_scheduling) == (8, False, 30, True)


def test_serve_conflict_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--max-num-seqs", "8", "--engine-arg", "max_num_seqs=16"])
    assert exc.value.code == 2
    line = _error_line(capsys)
    assert line.startswith("llmbench serve: error:") and "given both" in line


def test_serve_needs_no_harness_code():
    """`llmbench serve` is mounted by name: parsing it loads no harness module but the dispatcher."""
    code = ("import sys; from harness.cli import main\n"
            "try: main(['serve', '--help'])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('harness', 'workloads'))))")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "['harness', 'harness.cli']"
