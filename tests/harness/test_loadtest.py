"""harness/loadtest.py (what `nox -s load` runs): shim + locust + report, end to end, briefly.

    .venv/bin/python -m pytest tests/test_loadtest.py -q

The end-to-end run starts the shim and locust as subprocesses on loopback for 6 s with 4
users (about 12 s in all here) and needs locust installed (the `load` extra).
"""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest

from harness.loadtest import main, parse_duration_s, rows_to_records
from harness.report import load_report

# Never import locust here: it monkey-patches the standard library with gevent on import, which
# would break every thread-based server in this pytest process. Check it is installed instead.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None, reason="locust not installed"
)


def test_parse_duration():
    assert (
        parse_duration_s("8s") == 8
        and parse_duration_s("2m") == 120
        and parse_duration_s("1h30m") == 5400
    )
    assert parse_duration_s("90") == 90
    for bad in ("", "0s", "ten", "5x"):
        with pytest.raises(ValueError):
            parse_duration_s(bad)


def test_rows_become_records_relative_to_first_request():
    rows = [
        {
            "request_id": "b",
            "scheduled": 101.0,
            "sent": 101.0,
            "first_token": 101.5,
            "finished": 102.0,
            "token_times": [101.5, 102.0],
            "prompt_tokens": 3,
            "output_tokens": 2,
            "cached_tokens": 0,
            "status": "ok",
            "error": None,
            "finish_reason": "length",
        },
        {
            "request_id": "a",
            "scheduled": 100.0,
            "sent": 100.0,
            "first_token": None,
            "finished": 100.2,
            "token_times": [],
            "prompt_tokens": 0,
            "output_tokens": 0,
            "cached_tokens": 0,
            "status": "error",
            "error": "HTTP 429: overloaded",
            "finish_reason": None,
        },
    ]
    a, b = rows_to_records(rows)
    assert (a.request_id, a.scheduled_s, a.first_token_s, a.status) == ("a", 0.0, None, "error")
    assert (b.scheduled_s, b.first_token_s, b.token_times_s) == (1.0, 1.5, [1.5, 2.0])
    # the locustfile's rows hold one time per chunk and its token count
    chunked = {k: v for k, v in rows[0].items() if k != "token_times"}
    chunked.update(chunk_times=[101.5, 102.0], chunk_tokens=[1, 3], output_tokens=4)
    (c,) = rows_to_records([chunked])
    assert c.token_times_s == [0.5, 1.0, 1.0, 1.0] and c.output_tokens == 4


def test_load_run_writes_report_without_errors(tmp_path, capsys):
    out = tmp_path / "load"
    args = "--model tiny --users 4 --spawn-rate 4 --run-time 6s --stop-timeout 10 --out".split()
    rc = main([*args, str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.out + printed.err + (out / "locust.out").read_text()
    report = load_report(out)
    summary = report.summary_row()
    assert summary["num_requests"] >= 8 and summary["num_error"] == 0
    assert summary["num_ok"] == summary["num_requests"]
    assert summary["p50_ttft_ms"] is not None and summary["p50_itl_ms"] is not None
    assert (report.requests["output_tokens"] == report.requests["token_times_s"].map(len)).all()
    # locust saw the same requests, plus TTFT and TPOT as their own rows, which the Aggregated
    # row does not count as requests
    rows = csv.DictReader((out / "locust_stats.csv").read_text().splitlines())
    stats = {(r["Type"], r["Name"]): r for r in rows}
    posts = int(stats[("POST", "/v1/completions")]["Request Count"])
    assert int(stats[("METRIC", "TTFT")]["Request Count"]) == posts >= 1
    assert ("METRIC", "TPOT_us") in stats
    assert int(stats[("POST", "/v1/completions")]["Failure Count"]) == 0
    http = sum(int(r["Request Count"]) for (kind, _), r in stats.items() if kind in ("GET", "POST"))
    assert int(stats[("", "Aggregated")]["Request Count"]) == http
    # the server counted every generated token the client did
    config = report.metadata["config"]
    assert config["server_metrics"]["llmbench_generation_tokens_total"] == summary["total_output_tokens"]
    # the background scraper: several scrapes on the requests' clock, joined into the summary
    scraped = report.server_metrics
    assert scraped is not None and scraped["t_s"].nunique() >= 3
    assert summary["server_scrapes"] >= 2 and summary["server_running_peak"] >= 1
    assert 0 <= summary["server_kv_usage_peak"] <= 1
    assert "load test report" in printed.out
    rows_file = (out / "rows.jsonl").read_text().splitlines()
    assert len(rows_file) == summary["num_requests"]
    assert all(json.loads(line)["status"] == "ok" for line in rows_file)
