"""Weights, by the config's resolved load format: "checkpoint" reads a HF checkpoint directory
(safetensors, sharded through each parameter's `weight_loader`); "dummy" (named presets, as
vLLM's load_format="dummy") fills random values."""

from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open
from torch import nn

from engine.config import EngineConfig
from engine.models.config import ModelConfig


def load_weights(model: nn.Module, config: EngineConfig) -> None:
    if config.load_format == "dummy":
        init_dummy_weights(model, config.seed)
    else:
        load_checkpoint(model, config.model)


def _default_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
    param.data.copy_(loaded)


def load_checkpoint(model: nn.Module, path: str) -> None:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files found")
    params = dict(model.named_parameters())
    stacked = getattr(model, "stacked_params", {})
    model_config = model.config if isinstance(getattr(model, "config", None), ModelConfig) else None
    tied = getattr(model_config, "tie_word_embeddings", False)
    loaded: set[str] = set()
    for file in files:
        with _open_safetensors(file) as f:
            for name in f.keys():
                if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
                    continue
                target, shard = name, None
                for fragment, (ours, shard_id) in stacked.items():
                    if fragment in name:
                        target, shard = name.replace(fragment, ours), shard_id
                        break
                if target not in params:
                    raise ValueError(f"{file}: tensor {name!r} has no matching model parameter")
                param = params[target]
                tensor = _read_tensor(f, file, name)
                found, expected = tuple(tensor.shape), expected_shape(model_config, name) if model_config else None
                if expected is not None and found != expected:  # before a shard loader narrows it
                    raise ValueError(_shape_error(file, name, found, expected))
                try:
                    getattr(param, "weight_loader", _default_loader)(param, tensor, shard)
                except (RuntimeError, ValueError, IndexError) as exc:  # the shard's own check
                    raise ValueError(_shape_error(file, name, found, expected, exc)) from exc
                loaded.add(target)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")


def _open_safetensors(file: str):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as exc:  # safetensors' errors name neither the file nor the likely cause
        raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc


def _read_tensor(f, file: str, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as exc:
        raise ValueError(f"{file}: tensor {name!r} cannot be read (truncated or corrupt file?): {exc}") from exc


def _shape_error(file: str, name: str, found: tuple[int, ...], expected: tuple[int, ...] | None,
                 exc: BaseException | None = None) -> str:
    want = f"expected {expected}" if expected is not None else "which does not fit the model's parameter"
    why = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return f"{file}: tensor {name!r} has shape {found}, {want} from the checkpoint's config.json{why}"


def expected_shape(config: ModelConfig, name: str) -> tuple[int, ...] | None:
    """The full (unsharded) shape of checkpoint tensor `name` that config.json implies, for the
    Llama family's tensor names; None for a name not listed (its loader still checks its shard)."""
    h, hd, inter, vocab = config.hidden_size, config.head_dim, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {
        "embed_tokens.weight": (vocab, h), "lm_head.weight": (vocab, h), "norm.weight": (h,),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h), "o_proj.weight": (h, q),
        "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj.bias": (h,),
        "q_norm.weight": (hd,), "k_norm.weight": (hd,),
        "gate_proj.weight": (inter, h), "up_proj.weight": (inter, h), "down_proj.weight": (h, inter),
    }
    return shapes.get(".".join(name.split(".")[-2:]))


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Norm weights 1, everything else N(0, 0.02): finite, non-degenerate activations."""
    gen = None
    for name, param in model.named_parameters():
        if gen is None or gen.device != param.device:
            gen = torch.Generator(device=param.device).manual_seed(seed)
        if "norm" in name:
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=gen)
