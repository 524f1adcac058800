"""EngineConfig flags generated from its fields (engine/config_args.py): every init field is a
flag and round-trips; `--engine-arg` is the same; giving a field both ways is an error.
Run: pytest tests/engine/test_config_args.py"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

import pytest

from engine.config import EngineConfig
from engine.config_args import (
    FIELD_CHOICES,
    UsageError,
    add_engine_args,
    engine_fields,
    engine_kwargs,
    field_comments,
    flag_name,
    parse_pairs,
    unwrap_optional,
)

SAMPLES = {int: 7, float: 0.5, str: "x"}  # a value of each plain type; others go as JSON


def _parser(**kwargs) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_engine_args(p, **kwargs)
    return p


def _sample(field: dataclasses.Field) -> tuple[list[str], object]:
    """The argv that sets `field` to a value other than its default, and that value."""
    kind = unwrap_optional(typing.get_type_hints(EngineConfig)[field.name])
    flag = flag_name(field.name)
    if kind is bool:
        value = field.default is not True  # None and False -> True
        return [flag if value else f"--no-{flag[2:]}"], value
    if field.name in FIELD_CHOICES:
        value = next(c for c in FIELD_CHOICES[field.name] if c != field.default)
    else:
        value = SAMPLES.get(kind, {"k": [1]})
    return [flag, value if isinstance(value, str) else json.dumps(value)], value


@pytest.mark.parametrize("field", engine_fields(), ids=lambda f: f.name)
def test_every_init_field_is_a_flag_that_round_trips(field):
    argv, value = _sample(field)
    p = _parser()
    assert flag_name(field.name) in p._option_string_actions  # a new field gets its flag
    assert engine_kwargs(p.parse_args(argv)) == {field.name: value}
    # the generic alias gives the same, with a JSON value
    assert engine_kwargs(p.parse_args(["--engine-arg", f"{field.name}={json.dumps(value)}"])) == {field.name: value}


def test_no_flag_means_the_configs_default():
    assert engine_kwargs(_parser().parse_args([])) == {}
    assert engine_kwargs(_parser(defaults={"model": "tiny", "max_num_seqs": 4}).parse_args(["--max-num-seqs", "8"])) \
        == {"model": "tiny", "max_num_seqs": 8}


def test_flags_build_an_engine_config():
    args = _parser().parse_args(["--max-num-seqs", "8", "--no-prefix-caching", "--no-chunked-prefill",
                                 "--max-num-batched-tokens", "4096", "--max-model-len", "1024",
                                 "--scheduling-policy", "static", "--dist-timeout-s", "30", "--no-async-scheduling"])
    cfg = EngineConfig(**engine_kwargs(args))
    assert (cfg.max_num_seqs, cfg.enable_prefix_caching, cfg.enable_chunked_prefill, cfg.max_model_len,
            cfg.scheduling_policy, cfg.dist_timeout_s, cfg.async_scheduling) == (8, False, False, 1024, "static", 30.0,
                                                                                 False)


def test_a_field_given_twice_is_a_usage_error():
    args = _parser().parse_args(["--max-num-seqs", "8", "--engine-arg", "max_num_seqs=16"])
    with pytest.raises(UsageError, match="max_num_seqs=8 and --engine-arg max_num_seqs=16"):
        engine_kwargs(args)


@pytest.mark.parametrize("pairs, message", [
    (["blocksize=16"], "unknown --engine-arg"),
    (["novalue"], "expects KEY=VALUE"),
    (["model=tiny"], "set by this command's own --model"),
])
def test_bad_engine_args(pairs, message):
    args = _parser(skip=("model",)).parse_args([f"--engine-arg={p}" for p in pairs])
    with pytest.raises(UsageError, match=message):
        engine_kwargs(args)


def test_skip_spellings_and_old_aliases():
    p = _parser(skip=("model",), spellings={"seed": ("--engine-seed",), "scheduling_policy": ("--policy",)})
    assert "--model" not in p._option_string_actions and "--seed" not in p._option_string_actions
    args = p.parse_args(["--engine-seed", "3", "--policy", "static", "--no-prefix-caching"])
    assert engine_kwargs(args) == {"seed": 3, "scheduling_policy": "static", "enable_prefix_caching": False}
    assert engine_kwargs(p.parse_args(["--engine-arg", "seed=5"])) == {"seed": 5}
    own = argparse.ArgumentParser()
    own.add_argument("--seed", type=int, default=0)  # the tool's own --seed is not the engine's
    add_engine_args(own, spellings={"seed": ("--engine-seed",)})
    args = own.parse_args(["--seed", "9"])
    assert args.seed == 9 and engine_kwargs(args) == {}


@pytest.mark.parametrize("argv", [["--dtype", "float8"], ["--max-num-seqs", "many"], ["--scheduling-policy", "x"]])
def test_bad_flag_values_are_argparse_errors(argv):
    with pytest.raises(argparse.ArgumentError):
        _parser().parse_args(argv)


def test_parse_pairs_reads_json_and_dashes():
    assert parse_pairs(["max-num-seqs=8", "x=inf", "y=[1, 2]", "z=a=b"], "--f") == {
        "max_num_seqs": 8, "x": float("inf"), "y": [1, 2], "z": "a=b"}


@dataclasses.dataclass
class _Commented:
    plain: int = 1
    trailing: str = "a # b"  # the trailing one
    # the comment
    # above
    above: int = 2
    both: int = 3  # trailing wins


def test_help_comes_from_the_fields_comments():
    assert field_comments(_Commented) == {"trailing": "the trailing one", "above": "the comment above",
                                          "both": "trailing wins"}
    helps = {a.dest: a.help for a in _parser()._actions}
    for name, comment in field_comments().items():  # EngineConfig's own comments reach --help
        # ("None: X" reads "default: X" there)
        words = " ".join(w for w in comment.split() if w != "None:")
        assert words in " ".join(w for w in helps[name].split() if w != "default:"), name


def test_each_choice_list_holds_its_fields_default():
    """A choices tuple that lost a value (e.g. dtype's "auto") would make the default unreachable."""
    from engine.config_args import FIELD_CHOICES

    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    for name, choices in FIELD_CHOICES.items():
        assert defaults[name] in choices, name
