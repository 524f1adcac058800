"""The float dtypes the engine runs, by the names users give (`EngineConfig.dtype`, kernels'
argument checks). A leaf module: the kernels import it without pulling in the configuration."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """The table's name of a torch dtype ("bfloat16" for torch.bfloat16)."""
    return str(dtype).removeprefix("torch.")
