"""EngineConfig resolves device, dtype and load format once; the lists of choices come from
their registries; KV bytes per token follow the element size the engine runs."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch

from engine import attention
from engine.config import ATTENTION_BACKENDS, DTYPE_CHOICES, EngineConfig
from engine.dtypes import DTYPES
from engine.models import ARCHITECTURES, FAMILIES
from engine.models.registry import MODELS, get_model_class


def test_cpu_resolves_to_float32():
    cfg = EngineConfig(model="tiny", device="cpu")
    assert (cfg.device_type, cfg.resolved_dtype, cfg.torch_dtype) == ("cpu", "float32", torch.float32)
    assert cfg.device_for_rank(0) == cfg.device_for_rank(3) == torch.device("cpu")
    assert cfg.dtype == "auto"  # the user's setting stays as given


def test_cuda_resolves_to_bfloat16_and_one_device_per_rank():
    # resolving needs no GPU: nothing is allocated
    cfg = EngineConfig(model="tiny", device="cuda")
    assert (cfg.device_type, cfg.torch_dtype) == ("cuda", torch.bfloat16)
    assert [cfg.device_for_rank(r) for r in range(3)] == [torch.device("cuda", r) for r in range(3)]
    pinned = EngineConfig(model="tiny", device="cuda:1", dtype="float16")
    assert pinned.device_for_rank(0) == pinned.device_for_rank(2) == torch.device("cuda", 1)
    assert pinned.torch_dtype == torch.float16


def test_auto_device_follows_the_host():
    cfg = EngineConfig(model="tiny")
    assert cfg.device_type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cfg.device_for_rank(1).type == cfg.device_type


@pytest.mark.parametrize("kw, needle", [({"device": "tpu"}, "device="), ({"device": "cuda:x"}, "device="),
                                         ({"dtype": "float64"}, "dtype=")])
def test_bad_device_or_dtype_is_a_value_error(kw, needle):
    with pytest.raises(ValueError, match=needle):
        EngineConfig(model="tiny", **kw)


def test_prefill_graph_limit_must_not_be_negative():
    with pytest.raises(ValueError, match="max_graph_prefill_tokens"):
        EngineConfig(model="tiny", max_graph_prefill_tokens=-1)
    assert EngineConfig(model="tiny", max_graph_prefill_tokens=0).max_graph_prefill_tokens == 0  # off


def test_load_format(checkpoint_dirs):
    preset = EngineConfig(model="tiny", device="cpu")
    assert (preset.load_format, preset.is_preset) == ("dummy", True)
    ckpt = EngineConfig(model=checkpoint_dirs["llama"], device="cpu")
    assert (ckpt.load_format, ckpt.is_preset) == ("checkpoint", False)


def test_replace_and_pickle_resolve_again():
    cfg = EngineConfig(model="tiny", device="cuda")
    cpu = dataclasses.replace(cfg, device="cpu")
    assert (cpu.device_type, cpu.torch_dtype) == ("cpu", torch.float32)
    assert cfg.with_overrides(dtype="float16").torch_dtype == torch.float16
    back = pickle.loads(pickle.dumps(cfg))  # as sent to tensor-parallel workers
    assert back == cfg and back.device_for_rank(1) == torch.device("cuda", 1)


def test_describe_shows_settings_and_resolved_values():
    described = EngineConfig(model="tiny", device="cpu").describe()
    json.dumps(described)  # report metadata is JSON
    assert described["dtype"] == "auto" and described["torch_dtype"] == "float32"
    assert described["device_type"] == "cpu" and described["load_format"] == "dummy"
    assert set(EngineConfig.field_names()) <= set(described)


def test_kv_bytes_per_token_uses_the_element_size():
    mc = EngineConfig(model="tiny").model_config
    per_element = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim  # K and V
    assert EngineConfig(model="tiny", device="cpu").kv_bytes_per_token == 4 * per_element
    assert EngineConfig(model="tiny", device="cpu", dtype="bfloat16").kv_bytes_per_token == 2 * per_element


def test_model_runner_block_bytes_agree_with_config():
    from engine.model_runner import ModelRunner

    cfg = EngineConfig(model="tiny", device="cpu", block_size=8, num_kv_blocks=4)
    runner = ModelRunner(cfg)
    assert runner.bytes_per_block == cfg.block_size * cfg.kv_bytes_per_token
    runner.allocate_kv_cache(4)
    assert runner.kv_cache.numel() * runner.kv_cache.element_size() == 4 * runner.bytes_per_block


def test_choices_come_from_the_registries():
    assert ATTENTION_BACKENDS == ("auto", *attention.BACKENDS)
    assert DTYPE_CHOICES == ("auto", *DTYPES)
    assert set(MODELS) == set(FAMILIES) == set(ARCHITECTURES.values())
    for family in FAMILIES:
        assert get_model_class(family) is MODELS[family]
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(model="tiny", attention_backend="flashinfer")


def test_every_listed_attention_backend_builds():
    """On the CPU every backend but the CUDA-only flash_attn builds (its errors:
    tests/engine/test_flash_attn.py)."""
    for name in attention.BACKENDS:
        if name == "flash_attn":
            with pytest.raises(ValueError, match="CUDA"):
                attention.get_backend(name, "cpu")
        else:
            assert attention.get_backend(name, "cpu") is not None


def test_fused_small_batch_tokens_auto_follows_the_model_width():
    """None picks batch-1 fusion for narrow models only (measured: it wins at hidden 1,024 and
    loses at 4,096); an explicit value is kept; a bad one is refused."""
    from engine.config import FUSED_AUTO_MAX_HIDDEN, FUSED_AUTO_ROW_PARALLEL_TOKENS, EngineConfig

    narrow = EngineConfig(model="tiny")
    assert narrow.model_config.hidden_size <= FUSED_AUTO_MAX_HIDDEN and narrow.resolved_fused_tokens == 1
    assert EngineConfig(model="llama-3-8b", device="cpu").resolved_fused_tokens == 0
    assert EngineConfig(model="llama-3-8b", device="cpu", fused_small_batch_tokens=16).resolved_fused_tokens == 16
    with pytest.raises(ValueError, match="fused_small_batch_tokens"):
        EngineConfig(model="tiny", fused_small_batch_tokens=-1)
    assert narrow.resolved_row_parallel_tokens == FUSED_AUTO_ROW_PARALLEL_TOKENS
    assert EngineConfig(model="llama-3-8b", device="cpu").resolved_row_parallel_tokens == 0
    assert EngineConfig(model="tiny", fused_row_parallel_tokens=0).resolved_row_parallel_tokens == 0
    with pytest.raises(ValueError, match="fused_row_parallel_tokens"):
        EngineConfig(model="tiny", fused_row_parallel_tokens=True)
    with pytest.raises(ValueError, match="fused_row_parallel_columns must be a bool"):
        EngineConfig(model="tiny", fused_row_parallel_columns=1)
