"""`--kernel-constant MODULE.NAME=VALUE` (harness/kernel_constants.py): parsing against the
module it names, set for a block and restored, and in the studies: recorded in the result, in
effect during the run (the Triton backend in the interpreter), refused under tensor parallelism.
Run: pytest tests/harness/test_kernel_constants.py"""

from __future__ import annotations

import importlib
import json

import pytest

from engine.config_args import UsageError
from harness.kernel_constants import kernel_constants, parse_kernel_constants

DA = "engine.kernels.decode_attention"
decode_module = importlib.import_module(DA)  # engine.kernels exports a function of the same name


def test_parse_names_values_and_kinds():
    got = parse_kernel_constants(["decode_attention.DECODE_TILE_FP8=128,4,7", "decode_attention.DECODE_MAXNREG_FP8=168",
                                  "engine.attention.triton_backend.MIN_SCRATCH_SEQS = 32",
                                  "decode_attention.TILE_SMEM_BYTES=131072"])
    assert got == {f"{DA}.DECODE_TILE_FP8": (128, 4, 7), f"{DA}.DECODE_MAXNREG_FP8": 168,
                   "engine.attention.triton_backend.MIN_SCRATCH_SEQS": 32, f"{DA}.TILE_SMEM_BYTES": 131072}
    assert parse_kernel_constants(["decode_attention.DECODE_MAXNREG_FP8=None"]) == {f"{DA}.DECODE_MAXNREG_FP8": None}


@pytest.mark.parametrize("pair, message", [
    ("decode_attention.DECODE_TILE_FP8", "MODULE.NAME=VALUE"),
    ("DECODE_TILE_FP8=1", "MODULE.NAME=VALUE"),
    ("no_such_kernel.X=1", "no module engine.kernels.no_such_kernel"),
    ("decode_attention.NOPE=1", "has no constant NOPE; it has"),
    ("decode_attention.decode_attention=1", "has no constant decode_attention"),
    ("decode_attention.DECODE_MAXNREG_FP8=abc", "not a Python literal"),
    ("decode_attention.DECODE_TILE_FP8='128,4,5'", "is a str"),
    ("decode_attention.DECODE_TILE_FP8=128,4", "has 2 fields"),
    ("decode_attention.TARGET_PROGRAMS_PER_SM=True", "is a bool"),
])
def test_parse_rejects_what_is_not_a_constant_of_its_kind(pair, message):
    with pytest.raises(UsageError, match=message):
        parse_kernel_constants([pair])


def test_constants_are_set_in_the_block_and_restored_after_an_error():
    before = decode_module.DECODE_TILE_FP8
    with pytest.raises(RuntimeError):
        with kernel_constants({f"{DA}.DECODE_TILE_FP8": (64, 4, 6)}):
            assert decode_module.DECODE_TILE_FP8 == (64, 4, 6)
            raise RuntimeError("the run failed")
    assert decode_module.DECODE_TILE_FP8 == before


def test_throughput_records_the_constants_and_runs_under_them(tmp_path):
    """The Triton backend on the CPU (interpreter): a decode tile of 16 keys, recorded in the
    result; then an impossible tile (17 keys) makes the same run fail, so the value was in force."""
    from harness.studies import throughput

    argv = ["--num-seqs", "1", "--max-input-len", "100", "--max-output-len", "100", "--no-detokenize",
            "--attention-backend", "triton"]
    out = tmp_path / "t.json"
    before = decode_module.DECODE_TILE
    assert throughput.main(argv + ["--kernel-constant", "decode_attention.DECODE_TILE=16,4,2",
                                   "--json", str(out)]) == 0
    assert json.loads(out.read_text())["kernel_constants"] == {f"{DA}.DECODE_TILE": [16, 4, 2]}
    with pytest.raises(Exception, match="power of 2|power of two"):
        throughput.main(argv + ["--kernel-constant", "decode_attention.DECODE_TILE=17,4,2"])
    assert decode_module.DECODE_TILE == before


def test_studies_refuse_constants_they_cannot_apply(capsys):
    from harness.studies import throughput

    with pytest.raises(SystemExit) as exc:
        throughput.main(["--tensor-parallel-size", "2", "--kernel-constant", "decode_attention.DECODE_MAXNREG_FP8=168"])
    assert exc.value.code == 2 and "tensor-parallel workers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        throughput.main(["--kernel-constant", "decode_attention.NOPE=1"])
    assert exc.value.code == 2 and "has no constant NOPE" in capsys.readouterr().err


def test_latency_study_parses_them_for_its_run(capsys):
    from harness.studies import latency

    args, _, _ = latency.parse(["--kernel-constant", "decode_attention.TARGET_PROGRAMS_PER_SM=8"])
    assert args.kernel_constant == {f"{DA}.TARGET_PROGRAMS_PER_SM": 8}
    with pytest.raises(SystemExit):
        latency.parse(["--kernel-constant", "decode_attention.TARGET_PROGRAMS_PER_SM=8.5"])
    assert "is a float" in capsys.readouterr().err


def test_throughput_ab_alternates_fresh_engines_and_reports_per_seed_ratios(tmp_path, capsys):
    """--ab with --rounds 2 --repeat 2: baseline then variant, twice, a fresh engine each; four
    per-seed wall-time ratios (variant / baseline, round by round, seed by seed) and their median;
    the constant is back to its value afterwards."""
    from harness.studies import throughput

    out = tmp_path / "ab.json"
    before = decode_module.TARGET_PROGRAMS_PER_SM
    assert throughput.main(["--workload", "prefill", "--num-seqs", "2", "--max-input-len", "40", "--repeat", "2",
                            "--rounds", "2", "--ab", "decode_attention.TARGET_PROGRAMS_PER_SM=8",
                            "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["ab"] == {"variant": {f"{DA}.TARGET_PROGRAMS_PER_SM": 8}, "rounds": 2}
    assert len(r["baseline"]) == len(r["variant"]) == 2
    want = [v / b for base, var in zip(r["baseline"], r["variant"])
            for b, v in zip(base["engine_s_runs"], var["engine_s_runs"])]
    assert r["time_ratio_per_seed"] == pytest.approx(want, abs=1e-4) and len(want) == 4
    assert r["time_ratio_median"] == pytest.approx(sorted(want)[1] / 2 + sorted(want)[2] / 2, abs=1e-4)
    printed = capsys.readouterr().out
    assert printed.count("round 1 ") == 2 and "round 2 variant" in printed
    assert decode_module.TARGET_PROGRAMS_PER_SM == before


@pytest.mark.parametrize("extra, message", [
    (["--attention-backend", "torch,auto"], "one backend"),
    (["--hf"], "one backend"),
    (["--rounds", "0"], "--rounds must be >= 1"),
])
def test_throughput_ab_usage_errors(extra, message, capsys):
    from harness.studies import throughput

    with pytest.raises(SystemExit) as exc:
        throughput.main(["--ab", "decode_attention.TARGET_PROGRAMS_PER_SM=8", *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_latency_ab_runs_both_arms_each_round_and_reports_tpot_ratios(tmp_path, capsys):
    """--ab with --rounds 2: four passes (baseline 1, variant 1, baseline 2, variant 2) over every
    point, rows and TTFT labelled by pass, and per point the variant's median TPOT over the
    baseline's; the constant is back afterwards."""
    import pandas as pd

    from harness.studies import latency

    out = tmp_path / "lat"
    before = decode_module.TARGET_PROGRAMS_PER_SM
    assert latency.main(["--model", "tiny", "--device", "cpu", "--batch", "1,2", "--context", "16", "--steps", "2",
                         "--warmup-steps", "0", "--ttft-requests", "1", "--prompt-len", "8", "--out", str(out),
                         "--no-progress", "--rounds", "2", "--ab", "decode_attention.TARGET_PROGRAMS_PER_SM=8"]) == 0
    result = json.loads((out / "latency.json").read_text())
    points = pd.read_parquet(out / "points.parquet")
    assert sorted(points["arm"]) == sorted(["baseline 1", "variant 1", "baseline 2", "variant 2"] * 2)
    assert set(result["ttft"]) == {f"tiny [{a} {i}]" for a in ("baseline", "variant") for i in (1, 2)}
    ratios = {(r["batch"], r["context"]): r for r in result["ab"]["tpot_ratio"]}
    assert set(ratios) == {(1, 16), (2, 16)}
    for (batch, _), r in ratios.items():
        rows = points[points["batch"] == batch]
        base = rows[rows["arm"].str.startswith("baseline")]["tpot_ms"].median()
        var = rows[rows["arm"].str.startswith("variant")]["tpot_ms"].median()
        assert r["ratio"] == pytest.approx(var / base) and r["baseline_ms"] == pytest.approx(base)
    assert "TPOT variant / baseline" in capsys.readouterr().out
    assert "[variant 2]" in (out / "table.md").read_text()
    assert decode_module.TARGET_PROGRAMS_PER_SM == before


def test_throughput_ab_engine_arg_sets_the_field_in_the_variant_only(tmp_path):
    """--ab-engine-arg KEY=VALUE: the variant's engines get the EngineConfig field, the baseline's
    do not; recorded beside the (empty) kernel constants."""
    from harness.studies import throughput

    out = tmp_path / "ab.json"
    assert throughput.main(["--workload", "prefill", "--num-seqs", "2", "--max-input-len", "40", "--repeat", "1",
                            "--ab-engine-arg", "scheduling_policy=static", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["ab"] == {"variant": {}, "engine_args": {"scheduling_policy": "static"}, "rounds": 1}
    assert [run["policy"] for run in r["baseline"] + r["variant"]] == ["continuous", "static"]
    assert len(r["time_ratio_per_seed"]) == 1


def test_latency_ab_engine_arg_reaches_the_variant_engines(monkeypatch, tmp_path):
    from engine import LLM
    from harness.studies import latency

    built = []

    class Recording(LLM):
        def __init__(self, model, **kwargs):
            built.append(kwargs.get("enforce_eager"))
            super().__init__(model, **kwargs)

    monkeypatch.setattr(latency, "LLM", Recording)
    out = tmp_path / "lat"
    assert latency.main(["--model", "tiny", "--device", "cpu", "--batch", "1", "--context", "16", "--steps", "1",
                         "--warmup-steps", "0", "--ttft-requests", "1", "--prompt-len", "8", "--out", str(out),
                         "--no-progress", "--ab-engine-arg", "enforce_eager=True"]) == 0
    assert built == [None, True]
    result = json.loads((out / "latency.json").read_text())
    assert result["ab"]["engine_args"] == {"enforce_eager": True} and result["ab"]["variant"] == {}
    assert [r["batch"] for r in result["ab"]["tpot_ratio"]] == [1]


@pytest.mark.parametrize("study, extra, message", [
    ("throughput", ["--ab-engine-arg", "no_such_field=1"], "unknown EngineConfig field"),
    ("throughput", ["--ab-engine-arg", "scheduling_policy=bogus"], "scheduling_policy"),
    ("latency", ["--ab-engine-arg", "max_num_seqs=4"], "set by the study itself"),
    ("throughput", ["--ab-engine-arg", "attention_backend=torch"], "set by the study itself"),
    ("latency", ["--ab-engine-arg", "tensor_parallel_size=2"], "tensor_parallel_size must be 1"),
])
def test_ab_engine_arg_usage_errors(study, extra, message, capsys):
    """Refused before any engine runs: unknown fields, bad values, fields a study sets itself (throughput's
    attention_backend comes from --attention-backend), TP."""
    module = importlib.import_module(f"harness.studies.{study}")
    argv = ["--workload", "prefill"] if study == "throughput" else ["--model", "tiny", "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        module.main([*argv, *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err
