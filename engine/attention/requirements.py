"""What an optional attention backend needs (device, dtype, package), checked when EngineConfig
is built, so a missing install fails there and not in the middle of the first step. A leaf
module: it imports nothing heavy (the check only looks the package up)."""

from __future__ import annotations

import importlib.util

FLASH_ATTN_MODULE = "flash_attn.cute"  # what the flash-attn-4 wheel installs
FLASH_ATTN_INSTALL = "pip install 'llmbench[flash-attn]'"  # pyproject.toml's extra (flash-attn-4)
FLASH_ATTN_DTYPES = ("float16", "bfloat16")


def check_backend(name: str, device_type: str, dtype: str, kv_cache_dtype: str = "auto") -> None:
    """Raise ValueError if backend `name` cannot run on this device type at this dtype (a
    DTYPES name) and KV cache dtype ("auto" or a KV_CACHE_DTYPES name), or its package is not
    installed."""
    if name != "flash_attn":
        return
    if kv_cache_dtype != "auto":
        # FA4's paged varlen kernel reads K and V in the query's dtype: no scaled 8-bit pages
        raise ValueError(f"attention_backend='flash_attn' does not support kv_cache_dtype={kv_cache_dtype!r}; "
                         f"use attention_backend='triton' (or 'auto') with an fp8 KV cache")
    if device_type != "cuda":
        raise ValueError("attention_backend='flash_attn' needs a CUDA GPU (FlashAttention 4 has no "
                         f"CPU kernels); got device type {device_type!r}: use 'auto' or 'torch' there")
    if dtype not in FLASH_ATTN_DTYPES:
        raise ValueError(f"attention_backend='flash_attn' runs {' or '.join(FLASH_ATTN_DTYPES)}, "
                         f"got dtype {dtype!r}")
    if not module_available(FLASH_ATTN_MODULE):
        raise ValueError(f"attention_backend='flash_attn' needs FlashAttention 4 (module "
                         f"{FLASH_ATTN_MODULE}), which is not installed: {FLASH_ATTN_INSTALL}")


def module_available(name: str) -> bool:
    """Whether `name` could be imported (found on the path), without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that fails to import, or a None entry
        return False
