"""A paged, continuously batched LLM inference engine (vLLM / nano-vllm design)."""

from engine.config import PRESETS, EngineConfig, ModelConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestDelta, RequestOutput, StepStats
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM", "LLMEngine", "EngineConfig", "ModelConfig", "PRESETS", "SamplingParams",
    "RequestOutput", "CompletionOutput", "RequestDelta", "StepStats",
]
