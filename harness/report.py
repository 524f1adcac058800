"""Run reports: one folder per run, Parquet files with self-describing metadata.

    run_dir/requests.parquet   RequestRecord rows (token_times_s is a list<double> column)
    run_dir/steps.parquet      StepRecord rows (header-only when the backend has no steps)
    run_dir/telemetry.parquet  TelemetrySample rows (header-only without NVML)
    run_dir/summary.parquet    one row: harness.metrics.summarize(...) (+ server_* columns)
    run_dir/server_metrics.parquet  the server's /metrics over time (harness/scrape.py), only
                               for runs that scraped a server
    run_dir/result.json, summary.csv   exports (harness/exports.py; vLLM's JSON key names)

Every file's schema metadata has key b"llmbench" holding JSON: schema_version, the metric
definitions (harness.metrics.METRIC_DEFINITIONS), the caller's run config, git sha/dirty,
versions (python, torch, transformers, triton, engine package ...) and hardware (CPU, GPUs).

    write_report(run_dir, requests, steps, telemetry, config, *, slos=None, roofline_bytes=None,
                 bandwidth_bytes_per_s=None, overwrite=False) -> Report
    load_report(run_dir) -> Report      .requests/.steps/.telemetry/.summary DataFrames, .metadata
    Report.summary_row() -> dict        NaN -> None;  Report.recompute_summary() -> dict
    append_sweep_summary(sweep_dir, row) -> DataFrame   appends one row to sweep_dir/sweep.parquet
    write_table(path, frame, config) -> Path   a study's table (harness/studies/), same metadata
    requests_frame / steps_frame / telemetry_frame(records) -> DataFrame   for live summaries

Column types come from the dataclasses in harness/records.py, so a field added there shows up
here without edits.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from harness.metrics import (
    METRIC_DEFINITIONS,
    PERCENTILES,
    Slos,
    percentiles_from_summary,
    slos_from_summary,
    summarize,
)
from harness.records import RequestRecord, StepRecord, TelemetrySample
from harness.telemetry import nvml_device_names

METADATA_KEY = b"llmbench"
SCHEMA_VERSION = 1
FILES = {"requests": "requests.parquet", "steps": "steps.parquet", "telemetry": "telemetry.parquet",
         "summary": "summary.parquet"}
SERVER_METRICS_FILE = "server_metrics.parquet"  # optional: only runs that scraped a server
SWEEP_FILE = "sweep.parquet"

_ARROW_TYPES: dict[Any, pa.DataType] = {str: pa.string(), float: pa.float64(), int: pa.int64(),
                                        bool: pa.bool_(), list[float]: pa.list_(pa.float64()),
                                        list[int]: pa.list_(pa.int64())}


def arrow_schema(record_cls: type) -> pa.Schema:
    """Arrow schema of a records.py dataclass; ``X | None`` becomes a nullable X column."""
    hints = typing.get_type_hints(record_cls)
    columns = []
    for f in dataclasses.fields(record_cls):
        hint = hints[f.name]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        assert hint in _ARROW_TYPES, f"no Arrow type for {record_cls.__name__}.{f.name}: {hint}"
        columns.append((f.name, _ARROW_TYPES[hint]))
    return pa.schema(columns)


REQUESTS_SCHEMA = arrow_schema(RequestRecord)
STEPS_SCHEMA = arrow_schema(StepRecord)
TELEMETRY_SCHEMA = arrow_schema(TelemetrySample)


def _table(rows: Iterable[Any] | pd.DataFrame, schema: pa.Schema) -> pa.Table:
    if isinstance(rows, pd.DataFrame):
        return pa.Table.from_pandas(rows[schema.names], schema=schema, preserve_index=False)
    dicts = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in rows]
    return pa.Table.from_pylist(dicts, schema=schema)


def requests_frame(rows: Iterable[RequestRecord] | pd.DataFrame) -> pd.DataFrame:
    """RequestRecords as the DataFrame the metrics take (identical to reading requests.parquet)."""
    return _table(rows, REQUESTS_SCHEMA).to_pandas()


def steps_frame(rows: Iterable[StepRecord] | pd.DataFrame) -> pd.DataFrame:
    return _table(rows, STEPS_SCHEMA).to_pandas()


def telemetry_frame(rows: Iterable[TelemetrySample] | pd.DataFrame) -> pd.DataFrame:
    return _table(rows, TELEMETRY_SCHEMA).to_pandas()


# --- provenance ---------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _engine_version() -> str | None:
    # An uninstalled checkout (PYTHONPATH=.) has no dist metadata: read pyproject.toml instead.
    if (installed := _version("llmbench")) is not None:
        return installed
    try:
        import tomllib  # Python >= 3.11

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]
    except (ImportError, OSError, KeyError, ValueError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_names() -> list[str] | None:
    # Use torch only when the caller already imported it: importing it here would cost seconds
    # in processes that only write or compare reports. NVML works without torch.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return nvml_device_names()


def run_metadata(config: Mapping[str, Any]) -> dict[str, Any]:
    """Everything needed to interpret a run later: definitions, config, code, software, hardware."""
    sha = _git("rev-parse", "HEAD")
    torch = sys.modules.get("torch")
    return {
        "schema_version": SCHEMA_VERSION,
        "created_unix_s": time.time(),
        "definitions": METRIC_DEFINITIONS,
        "config": dict(config),
        "git_sha": sha,
        "git_dirty": None if sha is None else bool(_git("status", "--porcelain", "--untracked-files=no")),
        "versions": {"python": platform.python_version(), "llmbench": _engine_version(),
                     **{d: _version(d) for d in ("torch", "transformers", "triton", "pandas", "pyarrow",
                                                 "nvidia-ml-py")}},
        "hardware": {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                     "gpus": _gpu_names(), "cuda": getattr(getattr(torch, "version", None), "cuda", None)},
    }


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)  # Path, enums, torch.dtype ...


def _with_metadata(table: pa.Table, metadata: dict[str, Any]) -> pa.Table:
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, default=_json_default)})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The b"llmbench" JSON of one Parquet file ({} if it has none)."""
    raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


# --- summary rows -------------------------------------------------------------------------


def _arrow_type(value: Any) -> pa.DataType:
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, str):
        return pa.string()
    return pa.float64()  # floats, and None: summary figures that are undefined in this run


def _row_table(row: Mapping[str, Any], types_hint: pa.Schema | None = None) -> pa.Table:
    fields = []
    for key, value in row.items():
        known = types_hint is not None and key in types_hint.names
        fields.append((key, types_hint.field(key).type if known and value is None else _arrow_type(value)))
    return pa.Table.from_pylist([dict(row)], schema=pa.schema(fields))


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


# --- reports ------------------------------------------------------------------------------


@dataclass
class Report:
    run_dir: Path
    requests: pd.DataFrame
    steps: pd.DataFrame
    telemetry: pd.DataFrame
    summary: pd.DataFrame  # one row
    metadata: dict[str, Any]
    server_metrics: pd.DataFrame | None = None  # scraped /metrics samples, if the run had them

    def summary_row(self) -> dict[str, Any]:
        """The summary as plain Python values (NaN -> None, numpy -> int/float)."""
        # Column by column: .iloc[0] on the frame would upcast the int counts to float.
        return {k: _clean(self.summary[k].iloc[0]) for k in self.summary.columns}

    def recompute_summary(self) -> dict[str, Any]:
        """summarize() again from the per-request/step/telemetry rows, with the stored inputs."""
        row = self.summary_row()
        return _summary(self.requests, self.steps, self.telemetry, self.server_metrics,
                        slos=slos_from_summary(row), roofline_bytes=row.get("roofline_bytes"),
                        bandwidth_bytes_per_s=row.get("roofline_bandwidth_bytes_per_s"),
                        percentiles=percentiles_from_summary(row))


def _summary(requests: pd.DataFrame, steps: pd.DataFrame, telemetry: pd.DataFrame,
             server_metrics: pd.DataFrame | None, **kw: Any) -> dict[str, Any]:
    """summarize() plus the server-side figures of the steady window, when a server was scraped."""
    row = summarize(requests, steps, telemetry, **kw)
    if server_metrics is not None:
        from harness.metrics import steady_requests
        from harness.scrape import server_summary

        steady = steady_requests(requests)
        window = (steady["scheduled_s"].min(), steady["finished_s"].max()) if len(steady) else None
        row.update(server_summary(server_metrics, window))
    return row


def _write(table: pa.Table, path: Path, metadata: dict[str, Any]) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(_with_metadata(table, metadata), tmp)
    os.replace(tmp, path)  # readers never see a half-written file


def write_table(path: str | Path, frame: pd.DataFrame, config: Mapping[str, Any]) -> Path:
    """A study's table as Parquet, with the run metadata of `config` (git, versions, hardware)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(pa.Table.from_pandas(frame, preserve_index=False), path, run_metadata(config))
    return path


def write_report(run_dir: str | Path, requests: Iterable[RequestRecord] | pd.DataFrame,
                 steps: Iterable[StepRecord] | pd.DataFrame, telemetry: Iterable[TelemetrySample] | pd.DataFrame,
                 config: Mapping[str, Any], *, slos: Slos | None = None, roofline_bytes: float | None = None,
                 bandwidth_bytes_per_s: float | None = None, overwrite: bool = False,
                 percentiles: Sequence[float] = PERCENTILES, server_metrics: pd.DataFrame | None = None,
                 exports: bool = True) -> Report:
    """Write the four Parquet files of one run (five with server_metrics), and the exports
    (result.json, summary.csv) unless exports=False; return them as a Report."""
    run_dir = Path(run_dir)
    if (run_dir / FILES["summary"]).exists() and not overwrite:
        raise FileExistsError(f"{run_dir} already holds a report; pass overwrite=True or pick a new run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    tables = {"requests": _table(requests, REQUESTS_SCHEMA), "steps": _table(steps, STEPS_SCHEMA),
              "telemetry": _table(telemetry, TELEMETRY_SCHEMA)}
    frames = {name: t.to_pandas() for name, t in tables.items()}
    row = _summary(frames["requests"], frames["steps"], frames["telemetry"], server_metrics, slos=slos,
                   roofline_bytes=roofline_bytes, bandwidth_bytes_per_s=bandwidth_bytes_per_s,
                   percentiles=percentiles)
    tables["summary"] = _row_table(row)
    metadata = run_metadata(config)
    for name, table in tables.items():
        _write(table, run_dir / FILES[name], metadata)
    if server_metrics is not None:
        from harness.scrape import SERVER_METRICS_SCHEMA

        _write(pa.Table.from_pandas(server_metrics[SERVER_METRICS_SCHEMA.names], schema=SERVER_METRICS_SCHEMA,
                                    preserve_index=False), run_dir / SERVER_METRICS_FILE, metadata)
    report = Report(run_dir, frames["requests"], frames["steps"], frames["telemetry"],
                    tables["summary"].to_pandas(), json.loads(json.dumps(metadata, default=_json_default)),
                    server_metrics)
    if exports:
        from harness.exports import RESULT_JSON, SUMMARY_CSV, write_csv, write_vllm_json

        write_vllm_json(run_dir / RESULT_JSON, report.summary_row(), frames["requests"], report.metadata["config"])
        write_csv(run_dir / SUMMARY_CSV, [report.summary_row()])
    return report


def load_report(run_dir: str | Path) -> Report:
    run_dir = Path(run_dir)
    missing = [f for f in FILES.values() if not (run_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a complete report: missing {', '.join(missing)}")
    frames = {name: pq.read_table(run_dir / f).to_pandas() for name, f in FILES.items()}
    server = run_dir / SERVER_METRICS_FILE
    return Report(run_dir, frames["requests"], frames["steps"], frames["telemetry"], frames["summary"],
                  read_metadata(run_dir / FILES["requests"]),
                  pq.read_table(server).to_pandas() if server.exists() else None)


def append_sweep_summary(sweep_dir: str | Path, summary_row: Mapping[str, Any]) -> pd.DataFrame:
    """Append one row (a summary plus whatever labels the caller adds, e.g. backend, rate) to
    sweep_dir/sweep.parquet and return the whole sweep. Columns missing on either side become
    null. One writer per sweep file: appends are read-modify-replace, not locked."""
    path = Path(sweep_dir) / SWEEP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    old = pq.read_table(path) if path.exists() else None
    new = _row_table(summary_row, old.schema if old is not None else None)
    table = new if old is None else pa.concat_tables([old, new], promote_options="permissive")
    return _write_sweep(table, path)


def drop_sweep_rows(sweep_dir: str | Path, run_dirs: Iterable[str]) -> int:
    """Remove the rows of these run folders from sweep_dir/sweep.parquet (a sweep run again in
    place); returns how many went. The run folders themselves are the caller's."""
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.exists():
        return 0
    table = pq.read_table(path)
    gone = pc.is_in(table["run_dir"], value_set=pa.array(list(run_dirs), pa.string()))
    kept = table.filter(pc.invert(gone))
    _write_sweep(kept, path)
    return table.num_rows - kept.num_rows


def _write_sweep(table: pa.Table, path: Path) -> pd.DataFrame:
    _write(table, path, {"schema_version": SCHEMA_VERSION, "definitions": METRIC_DEFINITIONS})
    frame = table.to_pandas()
    from harness.exports import SWEEP_CSV, write_csv

    write_csv(path.parent / SWEEP_CSV, frame.to_dict("records"))
    return frame
