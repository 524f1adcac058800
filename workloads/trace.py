"""The workload trace format: one row per request, as JSONL or Parquet.

Row fields (JSON keys / Parquet columns):

    arrival_s         float >= 0, seconds after the run start the request arrives (required)
    prompt            text prompt                        } exactly one of the two
    prompt_token_ids  list of token ids (ints >= 0)      }
    max_tokens        int >= 1 (required)
    prefix_group      str, optional: requests sharing a prompt prefix
    request_id        str, optional, unique within the trace
    conversation_id   str, optional: the row is one turn of a multi-turn chat (text prompt:
                      the user's message; the backend sends it with the conversation so far)
    turn              int >= 0, with conversation_id: the turn's index (0, 1, 2 ... per conversation)
    temperature, top_k, top_p, seed, min_tokens, ignore_eos, stop: optional sampling fields,
                      passed to the engine's SamplingParams when present

A JSON ``null`` (or a Parquet null) means "absent". Unknown fields are rejected so that a typo
(``max_token``) fails loudly instead of silently running with defaults.

API:
    load_trace(path) -> list[TraceRequest]        sorted by arrival_s (stable)
    save_trace(requests, path)                    .jsonl or .parquet, by extension
    with_request_ids(requests) -> list[TraceRequest]  fills missing ids as "req-00000"...
    TraceRequest.prompt_input, TraceRequest.sampling_kwargs()   what a backend needs
Every validation failure raises TraceError(ValueError) naming the file, the row (1-based;
for JSONL it is the line number) and the field. A trace with no rows is an error too.

Limits (what the engine / server would reject, checked here so a trace fails at load, not
mid-run): max_tokens <= MAX_TOKENS_LIMIT; at most MAX_STOP_STRINGS stop strings of at most
MAX_STOP_STRING_CHARS characters (engine/sampling_params.py's numbers, repeated here because
workloads/ does not import the engine; tests/workloads keeps them equal); text valid Unicode
(no lone surrogates, which JSON's \\ud800 escapes can carry); integers within int64.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "seed", "min_tokens", "ignore_eos", "stop")
TRACE_EXTENSIONS = (".jsonl", ".parquet")
MAX_TOKENS_LIMIT = 10_000_000  # beyond any supported model's context: a typo, not a request
MAX_STOP_STRINGS = 64  # = engine.sampling_params.MAX_STOP_STRINGS
MAX_STOP_STRING_CHARS = 256  # = engine.sampling_params.MAX_STOP_STRING_CHARS
INT64_MAX = 2**63 - 1

# Parquet column types; an explicit schema keeps all-null columns typed (e.g. no prefix_group).
TRACE_SCHEMA = pa.schema(
    [
        ("arrival_s", pa.float64()),
        ("prompt", pa.string()),
        ("prompt_token_ids", pa.list_(pa.int64())),
        ("max_tokens", pa.int64()),
        ("prefix_group", pa.string()),
        ("request_id", pa.string()),
        ("temperature", pa.float64()),
        ("top_k", pa.int64()),
        ("top_p", pa.float64()),
        ("seed", pa.int64()),
        ("min_tokens", pa.int64()),
        ("ignore_eos", pa.bool_()),
        ("stop", pa.list_(pa.string())),
        ("conversation_id", pa.string()),
        ("turn", pa.int64()),
    ]
)


class TraceError(ValueError):
    """A trace file that cannot be used; names the file, row and field when known."""

    def __init__(self, path: str | Path, message: str, row: int | None = None, field: str | None = None):
        self.path, self.row, self.field = str(path), row, field
        where = [self.path] + ([f"row {row}"] if row is not None else [])
        where += [f"field '{field}'"] if field is not None else []
        super().__init__(f"{': '.join(where)}: {message}")


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    max_tokens: int
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    prefix_group: str | None = None
    request_id: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop: list[str] | None = None
    conversation_id: str | None = None
    turn: int | None = None

    @property
    def prompt_input(self) -> str | list[int]:
        """What to hand to ``engine.add_request`` / ``LLM.generate``: text or token ids."""
        return self.prompt if self.prompt is not None else list(self.prompt_token_ids or [])

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for SamplingParams: max_tokens plus the sampling fields present."""
        kw: dict[str, Any] = {"max_tokens": self.max_tokens}
        for name in SAMPLING_FIELDS:
            value = getattr(self, name)
            if value is not None:
                kw[name] = list(value) if name == "stop" else value
        return kw

    def to_row(self) -> dict[str, Any]:
        """The JSON row: absent (None) fields are left out."""
        return {k: v for k, v in asdict(self).items() if v is not None}


# --- validation -------------------------------------------------------------------------

_FIELD_NAMES = tuple(f.name for f in fields(TraceRequest))


def _is_int(v: Any) -> bool:
    # bool is an int subclass; ints end up in int64 columns and tensors
    return isinstance(v, int) and not isinstance(v, bool) and -INT64_MAX - 1 <= v <= INT64_MAX


def _is_text(v: Any) -> bool:
    """A non-empty string that is valid Unicode (encodes to UTF-8)."""
    if not isinstance(v, str) or not v:
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_stop_list(v: Any) -> bool:
    return (isinstance(v, list) and len(v) <= MAX_STOP_STRINGS
            and all(_is_text(s) and len(s) <= MAX_STOP_STRING_CHARS for s in v))


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


# field -> (check, description of what is allowed)
_CHECKS: dict[str, tuple[Any, str]] = {
    "arrival_s": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "max_tokens": (lambda v: _is_int(v) and 1 <= v <= MAX_TOKENS_LIMIT, f"an int >= 1 and <= {MAX_TOKENS_LIMIT:_}"),
    "prompt": (_is_text, "a non-empty string of valid Unicode"),
    "prompt_token_ids": (
        lambda v: isinstance(v, list) and len(v) > 0 and all(_is_int(t) and t >= 0 for t in v),
        "a non-empty list of ints >= 0",
    ),
    "prefix_group": (lambda v: isinstance(v, str), "a string"),
    "request_id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": (lambda v: _is_int(v) and (v == -1 or v >= 1), "-1 or an int >= 1"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "seed": (_is_int, "an int"),
    "min_tokens": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "ignore_eos": (lambda v: isinstance(v, bool), "a bool"),
    "stop": (_is_stop_list, f"a string or list of at most {MAX_STOP_STRINGS} non-empty strings of at most "
                            f"{MAX_STOP_STRING_CHARS} characters (valid Unicode)"),
    "conversation_id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "turn": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
}


def validate_row(row: Any, path: str | Path, row_no: int) -> TraceRequest:
    """Check one decoded row and build its TraceRequest; raises TraceError on any problem."""
    if not isinstance(row, dict):
        raise TraceError(path, f"row must be a JSON object, got {type(row).__name__}", row_no)
    values = {k: v for k, v in row.items() if v is not None}
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    for key in values:
        if key not in _CHECKS:
            hint = " (a ShareGPT file is a dataset: --dataset sharegpt)" if "conversations" in values else ""
            raise TraceError(path, f"unknown field{hint}; allowed: {', '.join(_FIELD_NAMES)}", row_no, key)
    for key in ("arrival_s", "max_tokens"):
        if key not in values:
            raise TraceError(path, "missing required field", row_no, key)
    for key, value in values.items():
        check, allowed = _CHECKS[key]
        if not check(value):
            raise TraceError(path, f"must be {allowed}, got {value!r:.80}", row_no, key)
    if ("prompt" in values) == ("prompt_token_ids" in values):
        which = "both" if "prompt" in values else "neither"
        raise TraceError(path, f"exactly one of prompt / prompt_token_ids is required, got {which}",
                         row_no, "prompt")
    if ("conversation_id" in values) != ("turn" in values):
        raise TraceError(path, "conversation_id and turn go together", row_no,
                         "turn" if "conversation_id" in values else "conversation_id")
    if "conversation_id" in values and "prompt" not in values:
        raise TraceError(path, "a conversation turn needs a text prompt (its user message)", row_no, "prompt")
    values["arrival_s"] = float(values["arrival_s"])
    for key in ("temperature", "top_p"):
        if key in values:
            values[key] = float(values[key])
    return TraceRequest(**values)


def _check_unique_ids(requests: list[TraceRequest], path: str | Path) -> None:
    seen: dict[str, int] = {}
    for row_no, req in enumerate(requests, start=1):
        if req.request_id is None:
            continue
        if req.request_id in seen:
            raise TraceError(path, f"duplicate id {req.request_id!r} (first at row {seen[req.request_id]})",
                             row_no, "request_id")
        seen[req.request_id] = row_no


# --- reading and writing ----------------------------------------------------------------


def _suffix(path: Path) -> str:
    if path.suffix not in TRACE_EXTENSIONS:
        raise TraceError(path, f"unknown trace extension {path.suffix!r}; allowed: {', '.join(TRACE_EXTENSIONS)}")
    return path.suffix


def _read_jsonl(path: Path) -> list[TraceRequest]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 may sit in a string
    except (OSError, UnicodeDecodeError) as e:  # missing, a directory, not UTF-8
        raise TraceError(path, f"cannot read: {e}") from None
    requests = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(path, f"bad JSON: {e.msg} at column {e.colno}", line_no) from None
        requests.append(validate_row(row, path, line_no))
    return requests


def _read_parquet(path: Path) -> list[TraceRequest]:
    try:
        rows = pq.read_table(path).to_pylist()  # Python values; nulls become None (not NaN)
    except (pa.ArrowException, OSError) as e:
        raise TraceError(path, f"cannot read Parquet: {e}") from None
    return [validate_row(row, path, i) for i, row in enumerate(rows, start=1)]


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read and validate a .jsonl or .parquet trace; rows come back sorted by arrival_s."""
    path = Path(path)
    reader = _read_jsonl if _suffix(path) == ".jsonl" else _read_parquet
    requests = reader(path)
    if not requests:
        raise TraceError(path, "the trace has no requests (an empty file?)")
    _check_unique_ids(requests, path)  # row numbers are file order, so check before sorting
    return sorted(requests, key=lambda r: r.arrival_s)


def save_trace(requests: Iterable[TraceRequest], path: str | Path) -> Path:
    """Write requests (sorted by arrival_s) as .jsonl or .parquet, chosen by the extension."""
    path = Path(path)
    suffix = _suffix(path)
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as f:
            for req in ordered:
                f.write(json.dumps(req.to_row()) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist([asdict(r) for r in ordered], schema=TRACE_SCHEMA), path)
    return path


def with_request_ids(requests: Iterable[TraceRequest], prefix: str = "req-") -> list[TraceRequest]:
    """Give every request without an id one made from its position; raises on duplicates."""
    out = [r if r.request_id is not None else replace(r, request_id=f"{prefix}{i:05d}")
           for i, r in enumerate(requests)]
    _check_unique_ids(out, "<requests>")
    return out
