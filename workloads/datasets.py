"""Dataset sources: real prompts from local files (or synthetic text), sized with the model's
own tokenizer, as trace rows (workloads/trace.py).

    load_dataset("sharegpt", tokenizer, path="sg.json", num_prompts=200)   # -> list[TraceRequest]
    load_dataset("sharegpt", tokenizer, path="sg.json", multi_turn=True, max_turns=4)
    load_dataset("jsonl", tokenizer, path="prompts.jsonl", output_len=[32, 128])
    load_dataset("hf", tokenizer, path="train.parquet", prompt_field="question")
    load_dataset("synthetic", tokenizer, input_len=512, output_len=128)    # workloads/synthetic.py

Sources (DATASETS):
    sharegpt   a JSON list (or JSONL) of {"id", "conversations": [{"from": "human"|"gpt",
               "value": ...}, ...]}; OpenAI-style {"messages": [{"role", "content"}]} rows too
    jsonl      one {"prompt": ...} object per line, optionally an output length ("output_len",
               "max_tokens" or "output_tokens") or answer text ("completion", "response",
               "output" or "answer"); conversation rows as in sharegpt are taken too
    hf         a local json/jsonl/parquet/arrow/csv file (or glob) through HF `datasets`
               (``datasets.load_dataset(builder, data_files=path)``; never the hub), rows as in
               jsonl or sharegpt
    synthetic  text of exact token lengths (no file)

Single-turn (the default): each row gives one request, its first user message as the prompt
and, with output_len=None, the token length of the answer that follows as max_tokens (vLLM's
sharegpt dataset). multi_turn=True: each row gives a conversation, one request per (user,
answer) pair with conversation_id and turn; the backend sends each turn with the history
(workloads/chat.py). num_prompts then counts conversations.

Output lengths: output_len=None takes the dataset's (rows without one are skipped), an int
fixes it, [lo, hi] or "lo:hi" samples it uniformly (seeded). Filters, applied to the prompt's
token count and the chosen output length as vLLM's sharegpt filter does: min/max_prompt_len,
min/max_output_len, max_total_len (prompt + output). In multi-turn mode a turn that fails them
ends its conversation there, and max_context_len ends it before the turn whose running total
(every user message and answer so far; template tokens not counted) would pass it.

Rows are shuffled with the seed (shuffle=False keeps file order) and tokenized only until
num_prompts have passed, so a large file costs what is used. Fewer passing rows than asked is
not an error (the result is shorter); none at all is. ignore_eos defaults to True, as in the
token-id generators: a dummy-weight model's EOS would otherwise end outputs at random.
"""

from __future__ import annotations

import inspect
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from workloads.dataset_rows import Turn, row_turns
from workloads.generators import assign_arrivals
from workloads.synthetic import synthetic_text
from workloads.tokens import TokenCounter
from workloads.trace import TraceRequest

HF_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}

@dataclass
class Selection:
    """Which rows become requests, and with what output lengths (see the module docstring)."""

    num_prompts: int = 1000
    output_len: Any = None  # None (the dataset's), N, [lo, hi] or "lo:hi"
    min_prompt_len: int = 4
    max_prompt_len: int | None = 1024
    min_output_len: int = 4
    max_output_len: int | None = None
    max_total_len: int | None = 2048
    multi_turn: bool = False
    max_turns: int | None = None
    max_context_len: int | None = None
    shuffle: bool = True
    seed: int = 0
    ignore_eos: bool = True
    rate: float = math.inf
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        for name in ("num_prompts", "max_turns", "max_context_len", "max_prompt_len", "max_output_len",
                     "max_total_len", "min_prompt_len", "min_output_len"):
            value = getattr(self, name)
            low = 0 if name.startswith("min_") else 1
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.output_range = _output_range(self.output_len)

    def output_tokens(self, dataset_len: int | None, rng: random.Random) -> int | None:
        if self.output_range is None:
            return dataset_len
        lo, hi = self.output_range
        return lo if lo == hi else rng.randint(lo, hi)

    def passes(self, prompt_len: int, output_len: int) -> bool:
        return (self.min_prompt_len <= prompt_len and self.min_output_len <= output_len
                and (self.max_prompt_len is None or prompt_len <= self.max_prompt_len)
                and (self.max_output_len is None or output_len <= self.max_output_len)
                and (self.max_total_len is None or prompt_len + output_len <= self.max_total_len))


def _output_range(spec: Any) -> tuple[int, int] | None:
    if spec is None or spec == "dataset":
        return None
    if isinstance(spec, str) and ":" in spec:
        spec = spec.split(":", 1)
    if isinstance(spec, (list, tuple)) and len(spec) == 2:
        try:
            lo, hi = int(spec[0]), int(spec[1])
        except (TypeError, ValueError):
            lo, hi = 0, -1
    elif isinstance(spec, int) and not isinstance(spec, bool):
        lo = hi = spec
    else:
        lo, hi = 0, -1
    if not 1 <= lo <= hi:
        raise ValueError(f"output_len must be None/'dataset', an int >= 1, or a range [lo, hi] / 'lo:hi' "
                         f"with 1 <= lo <= hi, got {spec!r}")
    return lo, hi


# ---- turns -> requests --------------------------------------------------------------------
class _Builder:
    """Tokenizes turns, applies the selection, and collects requests."""

    def __init__(self, tokenizer: Any, sel: Selection, name: str):
        self.counter, self.sel, self.name = TokenCounter(tokenizer), sel, name
        self.rng = random.Random(sel.seed)
        self.requests: list[TraceRequest] = []
        self.taken = 0

    def _sized(self, turn: Turn) -> tuple[str, int, int] | None:
        user, answer = turn
        dataset_len = len(self.counter.content_ids(answer)) if isinstance(answer, str) else answer
        out = self.sel.output_tokens(dataset_len, self.rng)
        if out is None:
            return None
        prompt_len = self.counter.count(user)
        return (user, prompt_len, out) if self.sel.passes(prompt_len, out) else None

    def add(self, turns: list[Turn]) -> None:
        sel = self.sel
        if not sel.multi_turn:
            sized = self._sized(turns[0]) if turns else None
            if sized is not None:
                self.requests.append(self._request(sized, f"{self.name}-{self.taken:05d}"))
                self.taken += 1
            return
        cid, kept, context = f"{self.name}-conv-{self.taken:05d}", [], 0
        for t, turn in enumerate(turns[:sel.max_turns]):
            sized = self._sized(turn)
            if sized is None:
                break
            context += sized[1] + sized[2]
            if sel.max_context_len is not None and context > sel.max_context_len:
                break
            kept.append(replace(self._request(sized, f"{cid}-turn-{t:02d}"), conversation_id=cid, turn=t))
        if kept:
            self.requests += kept
            self.taken += 1

    def _request(self, sized: tuple[str, int, int], request_id: str) -> TraceRequest:
        prompt, _, out = sized
        return TraceRequest(arrival_s=0.0, max_tokens=out, prompt=prompt, request_id=request_id,
                            ignore_eos=self.sel.ignore_eos)

    def done(self) -> bool:
        return self.taken >= self.sel.num_prompts

    def result(self, source: str) -> list[TraceRequest]:
        if not self.requests:
            raise ValueError(f"{source}: no row passed the length filters (min/max_prompt_len, "
                             f"min/max_output_len, max_total_len) or had an output length")
        return _timed(self.requests, self.sel)


def _timed(requests: list[TraceRequest], sel: Selection) -> list[TraceRequest]:
    """Arrivals per request, or per conversation (its turns share the first turn's arrival)."""
    firsts = [r for r in requests if r.turn in (None, 0)]
    arrival = {r.request_id: a.arrival_s
               for r, a in zip(firsts, assign_arrivals(firsts, sel.rate, sel.burstiness, sel.seed))}
    by_conv = {r.conversation_id: arrival[r.request_id] for r in firsts if r.conversation_id is not None}
    out = [replace(r, arrival_s=arrival[r.request_id] if r.conversation_id is None else by_conv[r.conversation_id])
           for r in requests]
    return sorted(out, key=lambda r: r.arrival_s)  # stable: a conversation's turns stay in order


def _select(rows: Sequence[Any], tokenizer: Any, sel: Selection, name: str, source: str,
            prompt_field: str = "prompt", output_field: str | None = None) -> list[TraceRequest]:
    order = list(range(len(rows)))
    if sel.shuffle:
        random.Random(sel.seed).shuffle(order)
    builder = _Builder(tokenizer, sel, name)
    for i in order:
        if builder.done():
            break
        builder.add(row_turns(rows[i], prompt_field, output_field, f"{source}: row {i + 1}"))
    return builder.result(source)


# ---- readers ------------------------------------------------------------------------------
def _existing(path: str | Path | None, source: str) -> Path:
    if path is None:
        raise ValueError(f"the {source} dataset needs a path (--dataset-path FILE)")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{source} dataset file {p} does not exist")
    return p


def read_json_rows(path: Path) -> list[Any]:
    """A JSON list, or JSONL (one value per line; blank lines skipped)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: bad JSON: {e.msg} at line {e.lineno}") from None
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_no}: bad JSON: {e.msg}") from None
    return rows


def sharegpt(tokenizer: Any, path: str | Path | None = None, **options: Any) -> list[TraceRequest]:
    p = _existing(path, "sharegpt")
    rows = read_json_rows(p)
    if rows and not any(isinstance(r, dict) and ("conversations" in r or "messages" in r) for r in rows[:50]):
        raise ValueError(f"{p}: not ShareGPT-format: rows need 'conversations' (or 'messages')")
    return _select(rows, tokenizer, Selection(**options), "sharegpt", str(p))


def jsonl_prompts(tokenizer: Any, path: str | Path | None = None, prompt_field: str = "prompt",
                  output_field: str | None = None, **options: Any) -> list[TraceRequest]:
    p = _existing(path, "jsonl")
    return _select(read_json_rows(p), tokenizer, Selection(**options), "jsonl", str(p), prompt_field, output_field)


def hf_dataset(tokenizer: Any, path: str | Path | None = None, prompt_field: str = "prompt",
               output_field: str | None = None, format: str | None = None, split: str = "train",
               cache_dir: str | None = None, **options: Any) -> list[TraceRequest]:
    """A local file (or glob) through ``datasets.load_dataset(builder, data_files=path)``; the
    builder comes from the extension unless format names it (json, parquet, arrow, csv)."""
    if path is None:
        raise ValueError("the hf dataset needs a path (--dataset-path FILE or glob)")
    builder = format or HF_BUILDERS.get(Path(str(path)).suffix)
    if builder not in set(HF_BUILDERS.values()):
        raise ValueError(f"hf dataset: cannot tell the format of {path}; pass format= one of "
                         f"{sorted(set(HF_BUILDERS.values()))}")
    sel = Selection(**options)  # bad options fail before the (slow) import
    try:
        import datasets
    except ImportError:
        raise ValueError("the hf dataset source needs the `datasets` package: pip install 'llmbench[datasets]'") from None
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split=split, cache_dir=cache_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"hf dataset {path}: {e}") from None
    return _select(ds, tokenizer, sel, "hf", str(path), prompt_field, output_field)


DATASETS: dict[str, Callable[..., list[TraceRequest]]] = {
    "sharegpt": sharegpt,
    "jsonl": jsonl_prompts,
    "hf": hf_dataset,
    "synthetic": synthetic_text,
}
_SELECTION_FIELDS = tuple(f.name for f in fields(Selection))


def dataset_params(name: str) -> list[str]:
    """The parameters dataset `name` takes (besides the tokenizer)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    own = [k for k, p in inspect.signature(DATASETS[name]).parameters.items()
           if k != "tokenizer" and p.kind is not p.VAR_KEYWORD]
    return own + ([f for f in _SELECTION_FIELDS if f not in own] if name != "synthetic" else [])


def check_params(name: str, params: dict[str, Any]) -> None:
    """Unknown parameter names and bad selection values raise ValueError (nothing is read)."""
    allowed = dataset_params(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for dataset {name!r}; allowed: {', '.join(allowed)}")
    if name != "synthetic":
        Selection(**{k: v for k, v in params.items() if k in _SELECTION_FIELDS})


def load_dataset(name: str, tokenizer: Any, **params: Any) -> list[TraceRequest]:
    """The requests of dataset `name`; unknown names or parameters raise ValueError."""
    check_params(name, params)
    return DATASETS[name](tokenizer, **params)
