"""Model family (`ModelConfig.architecture`, one of engine.models.FAMILIES) -> model class."""

from __future__ import annotations

from torch import nn

from engine.models.llama import LlamaFamilyForCausalLM

# one entry per engine.models.FAMILIES name (tests/engine/test_config.py checks they agree)
MODELS: dict[str, type[nn.Module]] = {
    "llama": LlamaFamilyForCausalLM, "qwen2": LlamaFamilyForCausalLM, "qwen3": LlamaFamilyForCausalLM}


def get_model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODELS[architecture]
    except KeyError:
        raise ValueError(f"architecture {architecture!r} is not supported; choose one of {sorted(MODELS)}") from None
