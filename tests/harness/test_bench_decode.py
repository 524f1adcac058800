"""`llmbench kernels bench-decode --smoke --ragged`: the decode microbenchmark's mixed-length mode
on tiny shapes (the interpreter on CPU): one split and the engine's split count, each in both
launch orders, are timed for every batch, each agrees with the float reference, and the row the
engine would run is marked.
Run: pytest tests/harness/test_bench_decode.py"""

from __future__ import annotations

import csv

import pytest

from engine.kernels.decode_attention import choose_num_splits
from harness.kernels.bench_decode import HKV, main


def test_ragged_smoke_times_both_orders_and_checks_them(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert main(["--smoke", "--ragged"]) == 0
    with open(tmp_path / "bench_decode_ragged.csv") as f:
        rows = list(csv.DictReader(f))
    auto = {b: choose_num_splits(b, HKV, 4096) for b in (2, 5)}
    got = {(r["B"], r["splits"], r["ordered"]) for r in rows}
    assert got == {(str(b), str(sp), o) for b in auto for sp in (1, auto[b]) for o in ("False", "True")}
    assert all(float(r["rel_err"]) < 1e-5 and 0 < float(r["us_min"]) <= float(r["us"]) <= float(r["us_max"])
               for r in rows)
    for b in auto:  # one engine row a batch: its split count, longest first only with one split
        assert [(r["splits"], r["ordered"]) for r in rows if r["B"] == str(b) and r["engine"] == "True"] == \
            [(str(auto[b]), str(auto[b] == 1))]


@pytest.mark.parametrize("heads", [None, "8,2"])
def test_prefill_smoke_times_only_the_unified_cases(tmp_path, monkeypatch, heads):
    """--prefill: every unified case of the plan at every large tile, the default tile first,
    each within the float reference; no decode rows. --heads: another head group (llama's 4)."""
    from harness.kernels.bench_decode import HQ, SMOKE

    monkeypatch.setenv("OUT", str(tmp_path))
    assert main(["--smoke", "--prefill"] + (["--heads", heads] if heads else [])) == 0
    with open(tmp_path / "bench_decode_prefill.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["kernel"] for r in rows] == [f"unified:{c}" for c in SMOKE.prefill for _ in SMOKE.prefill_cfgs]
    assert {r["heads"] for r in rows} == {(heads or f"{HQ},{HKV}").replace(",", "/")}
    assert all(float(r["rel_err"]) < 1e-5 and float(r["us"]) > 0 for r in rows)


def test_kv_dtype_smoke_times_both_caches(tmp_path, monkeypatch):
    """--kv-dtype fp8: each shape on the model-dtype cache and on fp8 at every decode tile; every
    fp8 run within the reference over its own cache."""
    from harness.kernels.bench_decode import SMOKE

    monkeypatch.setenv("OUT", str(tmp_path))
    assert main(["--smoke", "--kv-dtype", "fp8"]) == 0
    with open(tmp_path / "bench_decode_kv_dtype.csv") as f:
        rows = list(csv.DictReader(f))
    shapes = len(SMOKE.batches) * len(SMOKE.contexts)
    kinds = [r["kernel"] for r in rows]
    assert kinds.count("decode:model") == kinds.count("decode:fp8") == shapes * len(SMOKE.decode_tiles)
    assert all(float(r["rel_err"]) < 1e-5 for r in rows if r["kernel"].startswith("decode:fp8"))


def test_kv_dtype_smoke_times_the_named_tiles(tmp_path, monkeypatch):
    """--tiles replaces the plan's decode tiles, the first as the default; a fourth number is the
    register cap, recorded as maxnreg (0: none)."""
    monkeypatch.setenv("OUT", str(tmp_path))
    assert main(["--smoke", "--kv-dtype", "fp8", "--tiles", "32,4,5;16,4,2,128"]) == 0
    with open(tmp_path / "bench_decode_kv_dtype.csv") as f:
        rows = list(csv.DictReader(f))
    tiles = {(r["block_n"], r["warps"], r["stages"], r["maxnreg"], r["default"]) for r in rows}
    assert tiles == {("32", "4", "5", "0", "True"), ("16", "4", "2", "128", "False")}
    assert all(float(r["rel_err"]) < 1e-5 for r in rows if r["kernel"] == "decode:fp8")


@pytest.mark.parametrize("text", ["128,4", "100,4,2", "128,3,2", "128,4,0", "128,4,5,300", "a,b,c", ";"])
def test_tiles_reject_what_cannot_compile(text):
    from argparse import ArgumentTypeError

    from harness.kernels.bench_decode import parse_tiles

    with pytest.raises(ArgumentTypeError):
        parse_tiles(text)
    assert parse_tiles("128,4,5;128,4,5,168") == ((128, 4, 5), (128, 4, 5, 168))


@pytest.mark.parametrize("kv_dtype", [None, "fp8"])
def test_ragged_smoke_times_named_tiles_as_the_engine_runs_them(tmp_path, monkeypatch, kv_dtype):
    """--ragged --tiles [--kv-dtype fp8]: every batch once a tile, at the engine's split count and
    order, within the reference over the cache it read."""
    monkeypatch.setenv("OUT", str(tmp_path))
    assert main(["--smoke", "--ragged", "--tiles", "32,4,3;16,4,2"] + (["--kv-dtype", kv_dtype] if kv_dtype else [])) == 0
    with open(tmp_path / "bench_decode_ragged.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["tile"] for r in rows] == ["32,4,3", "16,4,2"] * 2  # the smoke plan's two batches
    assert all(r["engine"] == "True" and float(r["rel_err"]) < 1e-5 for r in rows)
    assert {r["cache"] for r in rows} == {"float8_e4m3fn" if kv_dtype else "float32"}


def test_tiles_are_refused_where_no_decode_tile_is_timed(capsys):
    with pytest.raises(SystemExit):
        main(["--smoke", "--prefill", "--tiles", "32,4,2"])
    assert "not for --fused or --prefill" in capsys.readouterr().err


def test_mid_smoke_times_every_tile_and_split_and_marks_the_engines(tmp_path, monkeypatch):
    """--mid: every shape at every tile x split count, each within the float reference, a
    positive time, and exactly one row a shape marked as what the engine runs (its tile and
    split count)."""
    from harness.kernels.bench_decode import SMOKE

    monkeypatch.setenv("OUT", str(tmp_path))
    assert main(["--smoke", "--mid"]) == 0
    with open(tmp_path / "bench_decode_mid.csv") as f:
        rows = list(csv.DictReader(f))
    shapes = {(r["Hq"], r["B"], r["ctx"]) for r in rows}
    assert shapes == {("4", "3", "40"), ("8", "2", "33")}
    assert len(rows) == len(shapes) * len(SMOKE.decode_tiles) * 2
    assert all(float(r["rel_err"]) < 1e-5 and float(r["us"]) > 0 for r in rows)
    for shape in shapes:
        engine = [r for r in rows if (r["Hq"], r["B"], r["ctx"]) == shape and r["engine"] == "True"]
        assert len(engine) == 1, (shape, engine)
