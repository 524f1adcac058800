"""The shape of a Llama-family decoder (`ModelConfig`): from a HF checkpoint's config.json or a
named preset (`PRESETS`, run with dummy weights). Validated in `__post_init__`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from engine.models import ARCHITECTURES, FAMILIES

SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (Llama, Qwen2, Qwen3)."""

    architecture: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2: bias on q/k/v
    qk_norm: bool = False  # qwen3: RMSNorm on q and k per head
    eos_token_id: int | None = None
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in FAMILIES:
            raise ValueError(f"architecture {self.architecture!r} is not supported; choose one of {list(FAMILIES)}")
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model config: {name} must be an integer >= 1, got {value!r}")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) not in (
            "default",
            "llama3",
        ):
            raise ValueError(f"rope_scaling {self.rope_scaling!r} is not supported (default, llama3)")

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes of K and V one token takes in the cache, all layers and KV heads (all ranks
        together: a rank holds 1/tensor_parallel_size of it), at `itemsize` bytes per element."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * itemsize

    @classmethod
    def from_hf_dir(cls, path: str) -> ModelConfig:
        file = os.path.join(path, "config.json")
        try:
            with open(file, encoding="utf-8") as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"{path}: not a HF checkpoint directory (no config.json)") from None
        except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
            raise ValueError(f"{file}: cannot be read as JSON ({exc})") from exc
        if not isinstance(cfg, dict):
            raise ValueError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
        try:
            return cls._from_hf_dict(cfg, path)
        except KeyError as exc:
            raise ValueError(f"{file}: lacks the field {exc.args[0]!r}") from None
        except (TypeError, AttributeError) as exc:  # a field of the wrong JSON type
            raise ValueError(f"{file}: a field has the wrong type ({exc})") from exc

    @classmethod
    def _from_hf_dict(cls, cfg: dict[str, Any], path: str) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"{path}: architectures {archs} not supported; choose one of {sorted(ARCHITECTURES)}")
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            head_dim=cfg.get("head_dim") or 0,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch == "qwen2"),
            qk_norm=arch == "qwen3",
            eos_token_id=eos,
            bos_token_id=cfg.get("bos_token_id"),
        )


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return scaling


# Named presets with dummy (random) weights. Shapes follow the public configs.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        architecture="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=2048, tie_word_embeddings=True, qk_norm=True, eos_token_id=256,
    ),
    "qwen3-0.6b": ModelConfig(
        architecture="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
        tie_word_embeddings=True, qk_norm=True, eos_token_id=151645,
    ),
    "llama-3-8b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192, eos_token_id=128001,
    ),
    "llama-3-70b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192, eos_token_id=128001,
    ),
}
