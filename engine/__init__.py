"""A paged, continuously batched LLM inference engine (vLLM / nano-vllm design).

Names are imported lazily: tensor-parallel workers import this package, and pulling in
transformers there would only slow their start-up."""

from importlib import import_module

_EXPORTS = {
    "LLM": "engine.llm", "LLMEngine": "engine.llm_engine", "EngineConfig": "engine.config",
    "ModelConfig": "engine.config", "PRESETS": "engine.config", "SamplingParams": "engine.sampling_params",
    "RequestOutput": "engine.outputs", "CompletionOutput": "engine.outputs", "RequestDelta": "engine.outputs",
    "StepStats": "engine.outputs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
