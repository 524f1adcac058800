"""Triton kernels for the GPU fast path: KV store, unified paged attention, split-K decode.

Importing this package imports triton; the torch backend never does."""

from engine.kernels.decode_attention import (
    DecodeScratch,
    alloc_decode_scratch,
    choose_num_splits,
    decode_attention,
)
from engine.kernels.store_kv import store_kvcache
from engine.kernels.unified_attention import unified_attention

__all__ = [
    "DecodeScratch",
    "alloc_decode_scratch",
    "choose_num_splits",
    "decode_attention",
    "store_kvcache",
    "unified_attention",
]
