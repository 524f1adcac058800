"""Model registry: architecture name -> model class."""

from __future__ import annotations

from engine.models.llama import LlamaFamilyForCausalLM

MODELS = {"llama": LlamaFamilyForCausalLM, "qwen2": LlamaFamilyForCausalLM, "qwen3": LlamaFamilyForCausalLM}


def get_model_class(architecture: str):
    try:
        return MODELS[architecture]
    except KeyError:
        raise ValueError(f"architecture {architecture!r} is not supported; choose one of {sorted(MODELS)}") from None
