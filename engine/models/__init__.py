"""Models: the architecture names (here, plain data, so that the configuration validates against
them without importing model code), the model shapes and presets (config.py), the family ->
class lookup (registry.py) and the model code (llama.py).

ARCHITECTURES maps a HF config.json `architectures` entry to the family name a `ModelConfig`
carries."""

from __future__ import annotations

ARCHITECTURES: dict[str, str] = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}
FAMILIES: tuple[str, ...] = tuple(sorted(set(ARCHITECTURES.values())))
