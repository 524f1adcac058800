"""The float dtypes the engine runs, by the names users give (`EngineConfig.dtype`, kernels'
argument checks), and the KV cache's 8-bit formats (`EngineConfig.kv_cache_dtype`). A leaf
module: the kernels import it without pulling in the configuration."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The 8-bit KV cache formats (`EngineConfig.kv_cache_dtype`, vLLM's names): "fp8" is e4m3, whose
# 3 mantissa bits suit K and V, which stay within a few hundred without calibrated scales.
KV_CACHE_DTYPES: dict[str, torch.dtype] = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                                           "fp8_e5m2": torch.float8_e5m2}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def dtype_name(dtype: torch.dtype) -> str:
    """The table's name of a torch dtype ("bfloat16" for torch.bfloat16)."""
    return str(dtype).removeprefix("torch.")


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether a cache of this dtype holds scaled 8-bit values (stored x / scale, read x * scale)."""
    return dtype in FP8_DTYPES
