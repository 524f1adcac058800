"""Hardening of the engine's edges: SamplingParams rejects every bad value with a ValueError that
names the field; the engine API rejects unusable prompts and calls after shutdown; broken
checkpoints (no tokenizer, a wrong-shaped tensor, a truncated file) fail naming the file and the
tensor; skip_tokenizer_init runs on token ids alone.
Run: pytest tests/engine/test_engine_hardening.py"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from checkpoints import build_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from engine import LLM, EngineConfig, LLMEngine, SamplingParams
from engine.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

FIELDS = [f for f in SamplingParams.__dataclass_fields__]


# ---- SamplingParams ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": math.inf}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"temperature": "hot"}, "temperature"), ({"temperature": True}, "temperature"),
    ({"top_p": math.nan}, "top_p"), ({"top_p": "1"}, "top_p"),
    ({"top_k": 1.5}, "top_k"), ({"top_k": 2.0}, "top_k"), ({"top_k": True}, "top_k"), ({"top_k": 2**70}, "top_k"),
    ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 1.0}, "max_tokens"), ({"max_tokens": None}, "max_tokens"),
    ({"min_tokens": False}, "min_tokens"), ({"seed": 1.5}, "seed"), ({"seed": True}, "seed"),
    ({"stop": 5}, "stop"), ({"stop": ["\ud800"]}, "stop"), ({"stop": [None]}, "stop"),
    ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"), ({"stop": "x" * (MAX_STOP_STRING_CHARS + 1)}, "stop"),
    ({"stop_token_ids": 3}, "stop_token_ids"), ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"stop_token_ids": ["1"]}, "stop_token_ids"), ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"detokenize": 1}, "detokenize"),
])
def test_bad_values_are_value_errors_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        SamplingParams(**kwargs)


def test_good_values_are_normalised():
    p = SamplingParams(temperature=1, top_p=1, top_k=0, stop="end", stop_token_ids=(3,), seed=-5)
    assert (p.temperature, p.top_p, p.top_k, p.stop, p.stop_token_ids, p.seed) == (1.0, 1.0, -1, ["end"], [3], -5)
    assert isinstance(p.temperature, float)
    ok = SamplingParams(stop=["y" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS)  # the limits themselves pass
    assert len(ok.stop) == MAX_STOP_STRINGS


# st.text() never yields lone surrogates: these strings mix them with ordinary characters
SURROGATE_TEXT = st.lists(st.sampled_from(["a", "\ud800", "\udfff", "\u00e9", " "]), max_size=6).map("".join)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=300), SURROGATE_TEXT,
    st.binary(max_size=4), st.complex_numbers(), st.fractions(), st.just(object()),
)
ANY = st.one_of(
    SCALARS, st.lists(SCALARS, max_size=70), st.lists(SURROGATE_TEXT, max_size=3), st.tuples(st.integers()),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=ANY)
def test_arbitrary_values_raise_only_value_errors(field, value):
    try:
        p = SamplingParams(**{field: value})
    except ValueError as e:
        assert f"SamplingParams.{field}=" in str(e) or field == "max_tokens" and "min_tokens" in str(e)
    else:
        assert p.temperature >= 0 and math.isfinite(p.temperature) and 0 < p.top_p <= 1
        assert all(isinstance(getattr(p, f), int) and not isinstance(getattr(p, f), bool)
                   for f in ("top_k", "max_tokens", "min_tokens"))
        assert all(isinstance(s, str) and s.encode() for s in p.stop)


# ---- engine API ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", max_model_len=64, num_kv_blocks=40, block_size=4)


@pytest.mark.parametrize("prompts, match", [
    (None, "prompts must be"), (5, "prompts must be"), ("\ud800", "not valid Unicode"),
    (["ok", "a\udfffb"], "not valid Unicode"), ([None], "string or a list"),
])
def test_unusable_prompts_are_value_errors(llm, prompts, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # the first, good prompt of a batch was aborted
    out = llm.generate("still serving", SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


PROMPTS = st.one_of(
    SURROGATE_TEXT, st.text(max_size=80), st.none(), st.integers(), st.floats(),
    st.lists(st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.booleans(), st.floats(), st.text()),
             max_size=8),
    st.lists(st.integers(min_value=0, max_value=511), max_size=80), st.tuples(st.integers(0, 600)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(prompt=PROMPTS)
def test_arbitrary_prompts_raise_only_value_errors(llm, prompt):
    engine = llm.engine
    try:
        rid = engine.add_request(None, prompt, SamplingParams(max_tokens=1))
    except ValueError:
        return
    assert engine.abort_request(rid)
    engine.step()  # drains the abort


def test_calls_after_shutdown_raise():
    engine = LLMEngine(EngineConfig(model="tiny", max_model_len=64, num_kv_blocks=16, block_size=4))
    llm = LLM.__new__(LLM)
    llm.engine = engine
    llm.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([1, 2, 3], use_tqdm=False)
    with pytest.raises(RuntimeError, match="shut down"):
        engine.step()
    engine.shutdown()  # idempotent


# ---- broken checkpoints --------------------------------------------------------------------
CPU = dict(device="cpu", dtype="float32", block_size=16, max_model_len=64, num_kv_blocks=16)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> str:
    return build_checkpoint("qwen3", str(tmp_path_factory.mktemp("ckpt") / "qwen3"))


@pytest.fixture
def broken(good_checkpoint, tmp_path) -> str:
    """A copy of the good checkpoint to break."""
    return shutil.copytree(good_checkpoint, tmp_path / "broken")


def _weights(path) -> str:
    (file,) = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")]
    return file


def test_checkpoint_without_tokenizer_says_so_and_runs_on_token_ids(broken):
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(broken, name)):
            os.remove(os.path.join(broken, name))
    with pytest.raises(ValueError, match=r"no tokenizer files .*tokenizer=.*skip_tokenizer_init=True") as e:
        LLMEngine(EngineConfig(model=str(broken), **CPU))
    assert str(broken) in str(e.value)
    llm = LLM(str(broken), skip_tokenizer_init=True, **CPU)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4 and out[0].outputs[0].text == ""
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        llm.generate("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        llm.generate([[1, 2]], SamplingParams(stop=["x"]), use_tqdm=False)
    with pytest.raises(ValueError, match="exclude each other"):
        EngineConfig(model=str(broken), skip_tokenizer_init=True, tokenizer=str(broken))


@pytest.mark.parametrize("name, shape", [
    ("model.layers.1.self_attn.k_proj.weight", (64, 64)),  # fewer rows: the shard loader's narrow fails
    ("model.layers.0.mlp.up_proj.weight", (256, 64)),  # more rows: a narrow would load a slice silently
    ("model.norm.weight", (32,)),
])
def test_wrong_shaped_tensor_names_file_tensor_and_shapes(broken, name, shape):
    file = _weights(broken)
    tensors = load_file(file)
    want = tuple(tensors[name].shape)
    tensors[name] = torch.zeros(shape)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        LLMEngine(EngineConfig(model=str(broken), **CPU))
    msg = str(e.value)
    assert file in msg and repr(name) in msg and f"has shape {shape}" in msg and f"expected {want}" in msg


def test_truncated_safetensors_file_is_named(broken):
    file = _weights(broken)
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match="truncated or corrupt") as e:
        LLMEngine(EngineConfig(model=str(broken), **CPU))
    assert file in str(e.value)


@pytest.mark.parametrize("edit, match", [
    (lambda cfg: cfg.pop("hidden_size"), "lacks the field 'hidden_size'"),
    (lambda cfg: cfg.update(num_key_value_heads=0), "num_key_value_heads must be an integer >= 1"),
    (lambda cfg: cfg.update(num_attention_heads="4"), "num_attention_heads must be an integer"),
])
def test_bad_config_json_is_named(broken, edit, match):
    path = os.path.join(broken, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=match):
        EngineConfig(model=str(broken), **CPU)
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="config.json: cannot be read as JSON"):
        EngineConfig(model=str(broken), **CPU)
