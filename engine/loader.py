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
    tied = getattr(model.config, "tie_word_embeddings", False)
    loaded: set[str] = set()
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
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
                getattr(param, "weight_loader", _default_loader)(param, f.get_tensor(name), shard)
                loaded.add(target)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")


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
