"""`--kernel-constant MODULE.NAME=VALUE`: one run of a study with a kernel module's tuning
constant set to another value, so an A/B in reports/PERF.md is a command anyone can rerun.

The engine's kernel wrappers read some module constants when they are called, not when they are
imported (decode tiles, the split target, register caps: `DECODE_TILE_FP8`,
`TARGET_PROGRAMS_PER_SM`, ...), precisely so that a measurement can try a value without a code
change. MODULE is a module of `engine.kernels` (`decode_attention`) or a dotted path under
`engine` (`engine.attention.triton_backend`); NAME an upper-case constant it already has; VALUE a
Python literal of the same kind (`(128, 4, 5)`, `168`, `None`; a bare `128,4,5` is a tuple).

The value holds in this process only, for the study's run, and is restored afterwards: tensor-
parallel workers, which are other processes, would not see it, so a study refuses it there.
Constants are read when an engine captures its CUDA graphs, so they are set before any engine is
built.

An A/B (`--ab`, `--ab-engine-arg`, `--rounds`): the variant is kernel constants and/or EngineConfig
fields (`--ab-engine-arg fused_row_parallel_columns=True`); the studies alternate fresh baseline and
variant engines in one command and report their ratios."""

from __future__ import annotations

import argparse
import ast
import importlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from engine.config import EngineConfig
from engine.config_args import UsageError, owned_fields, parse_pairs

FLAG = "--kernel-constant"
AB_ENGINE_FLAG = "--ab-engine-arg"


def _module_path(name: str) -> str:
    return name if name.startswith("engine.") else f"engine.kernels.{name}"


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UsageError(f"{FLAG}: {text!r} is not a Python literal (e.g. 168, (128, 4, 5), None)") from None


def _check_kind(key: str, current: Any, value: Any) -> None:
    """The new value is of the constant's kind: None stands for 'off' either way, ints for floats."""
    if current is None or value is None:
        return
    numeric = isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool)
    if type(value) is not type(current) and not numeric:
        raise UsageError(f"{FLAG} {key}: {value!r} is a {type(value).__name__}; the constant is {current!r}")
    if isinstance(current, tuple) and len(value) != len(current):
        raise UsageError(f"{FLAG} {key}: {value!r} has {len(value)} fields; the constant {current!r} has "
                         f"{len(current)}")


def parse_kernel_constants(pairs: Sequence[str]) -> dict[str, Any]:
    """['decode_attention.DECODE_MAXNREG_FP8=168'] -> {'engine.kernels.decode_attention.DECODE_MAXNREG_FP8': 168},
    every name checked against the module it names; UsageError on anything else."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        module_name, dot, const = name.strip().rpartition(".")
        if not sep or not dot or not const:
            raise UsageError(f"{FLAG} {pair!r}: give MODULE.NAME=VALUE, e.g. decode_attention.DECODE_MAXNREG_FP8=168")
        path = _module_path(module_name)
        try:
            module = importlib.import_module(path)
        except ModuleNotFoundError:
            raise UsageError(f"{FLAG} {pair!r}: no module {path}") from None
        known = sorted(n for n in vars(module) if n.isupper() and not n.startswith("_"))
        if const not in known:
            raise UsageError(f"{FLAG} {pair!r}: {path} has no constant {const}; it has {', '.join(known) or 'none'}")
        value = _parse_value(text.strip())
        key = f"{path}.{const}"
        _check_kind(key, getattr(module, const), value)
        out[key] = value
    return out


@contextmanager
def kernel_constants(overrides: Mapping[str, Any]) -> Iterator[None]:
    """The constants set for the block (keys as parse_kernel_constants returns them), the old
    values back afterwards, also when the block raises."""
    saved = []
    try:
        for key, value in overrides.items():
            path, _, const = key.rpartition(".")
            module = importlib.import_module(path)
            saved.append((module, const, getattr(module, const)))
            setattr(module, const, value)
        yield
    finally:
        for module, const, old in reversed(saved):
            setattr(module, const, old)


def add_kernel_constant_args(parser, compared: str) -> None:
    """--kernel-constant, and the A/B flags --ab / --rounds; `compared`: what the A/B reports."""
    parser.add_argument(FLAG, action="append", default=[], metavar="MODULE.NAME=VALUE",
                        help="set a kernel module's tuning constant for this run (A/B without a code change), "
                             "e.g. decode_attention.DECODE_MAXNREG_FP8=168; repeatable; this process only, so "
                             "not with tensor parallelism (see harness/kernel_constants.py)")
    parser.add_argument("--ab", action="append", default=[], metavar="MODULE.NAME=VALUE",
                        help=f"an A/B: the variant's kernel constants (repeatable), run after the code as it is, "
                             f"--rounds times, fresh engines each; reports {compared}")
    parser.add_argument(AB_ENGINE_FLAG, action="append", default=[], metavar="K=V",
                        help="an A/B whose variant sets EngineConfig fields (repeatable; with or without --ab), "
                             "e.g. fused_row_parallel_columns=True")
    parser.add_argument("--rounds", type=int, default=1, help="--ab: baseline-then-variant rounds (default 1)")


@dataclass(frozen=True)
class Variant:
    """What an A/B's variant adds to the baseline: kernel constants (--ab) and EngineConfig fields
    (--ab-engine-arg)."""

    constants: dict[str, Any] = field(default_factory=dict)
    engine_args: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.constants or self.engine_args)

    def record(self) -> dict[str, Any]:
        """As a result records it: {'variant': constants}, and 'engine_args' when there are any."""
        return {"variant": self.constants, **({"engine_args": self.engine_args} if self.engine_args else {})}


def parse_variant(args: argparse.Namespace) -> Variant:
    """A study's --ab and --ab-engine-arg values -> a Variant; UsageError on an unknown constant or
    field, or on a field the study sets itself (add_engine_args' `skip`)."""
    engine = parse_pairs(args.ab_engine_arg, AB_ENGINE_FLAG)
    unknown = sorted(set(engine) - EngineConfig.field_names())
    if unknown:
        raise UsageError(f"{AB_ENGINE_FLAG}: unknown EngineConfig field(s) {unknown}")
    if owned := sorted(set(engine) & set(owned_fields(args))):
        raise UsageError(f"{AB_ENGINE_FLAG} {', '.join(owned)}: set by the study itself")
    return Variant(parse_kernel_constants(args.ab), engine)


def ab_passes(variant: Variant, rounds: int) -> list[tuple[str, int, Variant]]:
    """(arm, round from 1, what the arm adds) of each A/B pass: the baseline (nothing) then the
    variant, `rounds` times."""
    return [(arm, i + 1, extra) for i in range(rounds) for arm, extra in (("baseline", Variant()), ("variant", variant))]


def check_single_process(overrides: Mapping[str, Any], engine_kwargs: Mapping[str, Any]) -> None:
    if overrides and (engine_kwargs.get("tensor_parallel_size") or 1) > 1:
        raise UsageError(f"{FLAG} sets constants in this process only; tensor-parallel workers would not see them")
