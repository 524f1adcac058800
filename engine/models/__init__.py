"""Model registry. This package's names are plain data, so that the configuration can validate
against them without importing the model code: HF `architectures` entry -> the family name a
`ModelConfig` carries. The classes are looked up in engine/models/registry.py."""

from __future__ import annotations

ARCHITECTURES: dict[str, str] = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}
FAMILIES: tuple[str, ...] = tuple(sorted(set(ARCHITECTURES.values())))
