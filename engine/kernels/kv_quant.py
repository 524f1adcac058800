"""The KV cache's element format inside the kernels (EngineConfig.kv_cache_dtype).

A cache in the model's dtype holds K and V as they are. An fp8 cache (e4m3fn or e5m2) holds
x / scale, clamped to the format's largest finite value and rounded to nearest even, with one
float scale per tensor (k_scale, v_scale; 1.0 unless calibrated); a read gives stored * scale in
fp32, rounded to the query's dtype for the tensor-core dots (vLLM's triton_unified_attention
does the same). The clamp is needed because a cast does not saturate everywhere (torch's CPU
cast does, the Triton interpreter's does not). Which of the two a kernel does is decided at
compile time from the cache's element type, so a model-dtype cache compiles to the code it
compiled to before fp8 existed (no scale, no cast).

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
def from_cache(x, scale, dtype: tl.constexpr):
    """Cache elements x as the attention math reads them: unchanged for a model-dtype cache; for
    fp8, x * scale in fp32, rounded to `dtype` (the query's)."""
    if x.dtype.is_fp8():
        return (x.to(tl.float32) * scale).to(dtype)
    else:
        return x
