"""Command-line flags for `EngineConfig`, generated from its dataclass fields, so a new field is a
flag everywhere (`llmbench serve`, `llmbench run|sweep|bench`, the throughput study) without
touching a parser.

    add_engine_args(parser)            # --max-num-seqs, --enable-prefix-caching/--no-..., --engine-arg K=V
    kwargs = engine_kwargs(args)       # only the fields given; EngineConfig(**kwargs)

Every flag defaults to None, "the config's default", so `engine_kwargs` returns only what the user
set. `--engine-arg K=V` stays as a generic alias (scripts use it; it also reaches fields a tool
hides as a flag); it is parsed here and only here. Giving one field both ways is a usage error.
The harness's commands build on this module; engine/ never imports harness/.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import re
import tokenize
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from engine.config import (
    ALL_REDUCE_NORM_FUSIONS,
    ATTENTION_BACKENDS,
    DTYPE_CHOICES,
    KV_CACHE_DTYPE_CHOICES,
    SCHEDULING_POLICIES,
    STATIC_RESERVATIONS,
    EngineConfig,
    parse_value,
)

# The fields whose values come from a fixed tuple in engine/config.py.
FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": DTYPE_CHOICES,
    "kv_cache_dtype": KV_CACHE_DTYPE_CHOICES,
    "attention_backend": ATTENTION_BACKENDS,
    "scheduling_policy": SCHEDULING_POLICIES,
    "static_reservation": STATIC_RESERVATIONS,
    "all_reduce_norm_fusion": ALL_REDUCE_NORM_FUSIONS,
}
# Help for fields whose line in EngineConfig carries no comment (a comment there wins).
FIELD_HELP: dict[str, str] = {
    "model": "preset name or local HF checkpoint directory",
    "seed": "sampling seed",
    "block_size": "tokens per KV block",
    "gpu_memory_utilization": "fraction of GPU memory the engine may use (weights, activations, KV)",
    "cpu_kv_cache_bytes": "KV cache size on CPU",
    "max_num_seqs": "most sequences in one step",
    "max_num_batched_tokens": "token budget of one step",
    "enable_prefix_caching": "reuse the KV blocks of shared prompt prefixes",
    "enable_chunked_prefill": "split long prompts over several steps",
    "scheduling_policy": "continuous batching, or static batches (the baseline)",
    "attention_backend": "attention implementation",
    "enforce_eager": "no CUDA graphs",
    "tensor_parallel_size": "GPUs the model is split over",
    "tokenizer": "tokenizer directory (default: the model's)",
}
# Spellings kept from the hand-written serve flags: each sets its boolean field to False.
NEGATIVE_ALIASES: dict[str, str] = {
    "--no-prefix-caching": "enable_prefix_caching",
    "--no-chunked-prefill": "enable_chunked_prefill",
}
_FIELDS_KEY = "engine_flag_fields"  # namespace attribute: {field: dest} of the flags this parser has
_DEFAULTS_KEY = "engine_flag_defaults"  # namespace attribute: the tool's own defaults
_SKIPPED_KEY = "engine_flag_skipped"  # namespace attribute: fields the tool sets itself


def owned_fields(namespace: argparse.Namespace) -> tuple[str, ...]:
    """The EngineConfig fields the tool sets itself (add_engine_args' `skip`): no flag or pair sets them."""
    return tuple(getattr(namespace, _SKIPPED_KEY, ()))


class UsageError(ValueError):
    """Input a command line rejects: printed as one `error:` line, exit status 2."""


def engine_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(EngineConfig) if f.init]


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_engine_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                    defaults: Mapping[str, Any] | None = None, skip: Collection[str] = (),
                    spellings: Mapping[str, Sequence[str]] | None = None) -> None:
    """One `--field-name` per EngineConfig init field, plus `--engine-arg K=V`.

    defaults: the tool's own default for a field (shown in help, returned by `engine_kwargs`
        unless the user sets the field).
    skip: fields the tool sets from an option of its own (`--model`); no flag, and
        `--engine-arg` on them is a UsageError.
    spellings: a field's flags in place of `--field-name`, e.g. `--engine-seed` where `--seed`
        already means something else, or an old spelling kept next to the new one."""
    defaults, spellings = dict(defaults or {}), dict(spellings or {})
    hints = typing.get_type_hints(EngineConfig)
    comments = field_comments()
    dests: dict[str, str] = {}
    for f in engine_fields():
        if f.name in skip:
            continue
        flags = list(spellings.get(f.name, [flag_name(f.name)]))
        # a field spelled otherwise keeps off the dest of the option it gave way to (--seed)
        dests[f.name] = dest = f.name if flag_name(f.name) in flags else f"engine_{f.name}"
        default = defaults.get(f.name, None if f.default is dataclasses.MISSING else f.default)
        _add_flag(parser, f.name, unwrap_optional(hints[f.name]), flags, dest, _help(f.name, default, comments))
    parser.add_argument("--engine-arg", action="append", default=[], metavar="K=V",
                        help="any EngineConfig field as KEY=VALUE (JSON or Python values), repeatable; "
                             "the same as its flag")
    parser.set_defaults(**{_FIELDS_KEY: dests, _SKIPPED_KEY: tuple(skip),
                           _DEFAULTS_KEY: {k: defaults[k] for k in dests if k in defaults}})


def _add_flag(parser, name: str, kind: Any, flags: list[str], dest: str, text: str) -> None:
    if kind is bool:
        parser.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        for alias in (alias for alias, target in NEGATIVE_ALIASES.items() if target == name):
            parser.add_argument(alias, dest=dest, action="store_false", default=None,
                                help=f"same as --no-{flag_name(name)[2:]}")
    else:
        parser.add_argument(*flags, dest=dest, type=_converter(kind), default=None, choices=FIELD_CHOICES.get(name),
                            metavar=_metavar(name, kind), help=text)


def _help(name: str, default: Any, comments: Mapping[str, str]) -> str:
    text = comments.get(name) or FIELD_HELP.get(name) or f"EngineConfig.{name}"
    text = re.sub(r"\bNone:", "default:", text)  # the comments' "None: ..." is what no flag means
    if default is not None:
        text += f" (default: {default})"
    return text.replace("%", "%%")  # argparse formats help with %


def engine_kwargs(namespace: argparse.Namespace, extra_pairs: Sequence[str] | None = None) -> dict[str, Any]:
    """The EngineConfig fields the user gave: flags (those `add_engine_args` added), then the
    tool's defaults for what is left, and the `--engine-arg` pairs (`extra_pairs`, default the
    namespace's own). A field given both as a flag and as a pair is a UsageError."""
    if extra_pairs is None:
        extra_pairs = getattr(namespace, "engine_arg", None) or []
    pairs = parse_pairs(extra_pairs, "--engine-arg")
    unknown = sorted(set(pairs) - EngineConfig.field_names())
    if unknown:
        raise UsageError(f"unknown --engine-arg {unknown}; valid: {', '.join(sorted(EngineConfig.field_names()))}")
    owned = sorted(set(pairs) & set(owned_fields(namespace)))
    if owned:
        raise UsageError(f"--engine-arg {', '.join(owned)}: set by this command's own "
                         f"{', '.join(flag_name(n) for n in owned)}")
    given = {name: getattr(namespace, dest, None) for name, dest in getattr(namespace, _FIELDS_KEY, {}).items()}
    flags = {name: value for name, value in given.items() if value is not None}
    both = sorted(set(flags) & set(pairs))
    if both:
        raise UsageError("given both as a flag and as --engine-arg: "
                         + ", ".join(f"{n}={flags[n]!r} and --engine-arg {n}={pairs[n]!r}" for n in both))
    return {**getattr(namespace, _DEFAULTS_KEY, {}), **pairs, **flags}


def parse_pairs(pairs: Sequence[str], flag: str) -> dict[str, Any]:
    """`KEY=VALUE` strings -> {key: parse_value(value)}; dashes in keys become underscores."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} expects KEY=VALUE, got {pair!r}")
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out


def field_comments(cls: type = EngineConfig) -> dict[str, str]:
    """Each field's comment in the class's source: the one ending its line, else the comment
    lines right above it. Empty when the source is not available (a frozen build)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    flags = {f.name for f in dataclasses.fields(cls) if f.init} if dataclasses.is_dataclass(cls) else None
    out: dict[str, str] = {}
    above: list[str] = []
    trailing = _trailing_comments(source)
    for number, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = re.match(r"\s+(\w+)\s*:", line)
        if match and match.group(1) not in out and (flags is None or match.group(1) in flags):
            text = trailing.get(number) or " ".join(above)
            if text:
                out[match.group(1)] = text
        above = []
    return out


def _trailing_comments(source: str) -> dict[int, str]:
    """Line number -> the comment that ends a line with code (tokenize: no '#' in strings)."""
    out, code_lines = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] in code_lines:
            out[tok.start[0]] = tok.string.lstrip("# ")
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT):
            code_lines.add(tok.start[0])
    return out


def unwrap_optional(hint: Any) -> Any:
    """`int | None` -> int (None is what the flag's absence means)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _converter(kind: Any):
    # int, float and str parse themselves; anything else (a dict, a list) is read as JSON
    return kind if kind in (int, float, str) else parse_value


def _metavar(name: str, kind: Any) -> str | None:
    # None: argparse shows the choices, or the field name in capitals
    return None if name in FIELD_CHOICES else {int: "N", float: "X"}.get(kind)
