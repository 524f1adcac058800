"""The KV cache's element format inside the kernels (EngineConfig.kv_cache_dtype).

A cache in the model's dtype holds K and V as they are. An fp8 cache (e4m3fn or e5m2) holds
x / scale, clamped to the format's largest finite value and rounded to nearest even, with one
float scale per tensor (k_scale, v_scale; 1.0 unless calibrated); a read means stored * scale.
The clamp is needed because a cast does not saturate everywhere (torch's CPU cast does, the
Triton interpreter's does not). The attention kernels take the stored elements into fp16 dots
unscaled and apply the scales to the softmax scale and the output (`dot_query`, `fold_scale`):
scaling every element in fp32 and rounding it to bf16 first, as vLLM's triton_unified_attention
does, made an fp8 cache slower than bf16 on an H200 (reports/PERF.md rows 23 and 41). Which
path a kernel takes is decided at compile time from the cache's element type, so a model-dtype
cache compiles to the code it compiled to before fp8 existed (no scale, no cast).

The same maps in torch: engine.attention.torch_backend's quantize_ref / dequantize_ref."""

from __future__ import annotations

import triton
import triton.language as tl

# The largest finite value of each 8-bit format (torch.finfo(dtype).max), as Triton names them:
# float8e4nv is e4m3fn (no infinities, max 448), float8e5 is e5m2 (max 57344).
E4M3_MAX = tl.constexpr(448.0)
E5M2_MAX = tl.constexpr(57344.0)


@triton.jit
def to_cache(x, scale, cache_ptr):
    """x as a cache behind `cache_ptr` (any pointer into it) stores it: unchanged for a
    model-dtype cache; for fp8, x / scale (in fp32) clamped to the format's range, then cast."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        y = tl.minimum(tl.maximum(tl.div_rn(x.to(tl.float32), scale), -E4M3_MAX), E4M3_MAX)
        return y.to(tl.float8e4nv)
    elif cache_ptr.dtype.element_ty == tl.float8e5:
        y = tl.minimum(tl.maximum(tl.div_rn(x.to(tl.float32), scale), -E5M2_MAX), E5M2_MAX)
        return y.to(tl.float8e5)
    else:
        return x


@triton.jit
def dot_query(q, cache_ptr):
    """The query as attention dots over this cache take it: unchanged for a model-dtype cache;
    for fp8, fp16 (fp32 stays fp32). fp16 holds every e4m3 and e5m2 value exactly, so a cache
    tile enters the dots as `tile.to(q.dtype)` (one convert an element pair, no scale) and the
    scales apply once, through `fold_scale`, to the softmax scale (k) and the output (v)."""
    if cache_ptr.dtype.element_ty.is_fp8():
        if q.dtype == tl.float32:
            return q
        else:
            return q.to(tl.float16)
    else:
        return q


@triton.jit
def fold_scale(x, scale, cache_ptr):
    """x * scale for an fp8 cache behind cache_ptr; x itself for a model-dtype cache."""
    if cache_ptr.dtype.element_ty.is_fp8():
        return x * scale
    else:
        return x
