"""Attention backends behind one interface: store this step's K/V into the paged cache, then
attend every query token to its sequence's cached keys (prefix, earlier chunks, new tokens)."""

from __future__ import annotations

from engine.attention.metadata import AttentionBackend, AttentionMetadata
from engine.attention.requirements import check_backend

# The backends by name: EngineConfig.attention_backend is one of these or "auto".
# flash_attn is optional (FlashAttention 4, CUDA only): see flash_attn_backend.py.
BACKENDS = ("torch", "triton", "flash_attn")


def get_backend(name: str, device_type: str) -> AttentionBackend:
    """Resolve "auto" (triton on CUDA, torch on CPU) and build the backend (an fp8 KV cache's
    scales: the backends' default 1.0, as vLLM without calibrated ones)."""
    if name == "auto":
        name = "triton" if device_type == "cuda" else "torch"
    if name == "torch":
        from engine.attention.torch_backend import TorchAttention

        return TorchAttention()
    if name == "triton":
        from engine.attention.triton_backend import TritonAttention

        return TritonAttention()
    if name == "flash_attn":
        if device_type != "cuda":
            raise ValueError(f"attention_backend='flash_attn' needs a CUDA GPU, got {device_type!r}")
        from engine.attention.flash_attn_backend import FlashAttention

        return FlashAttention()
    raise ValueError(f"attention backend {name!r} is unknown; choose one of {BACKENDS} or 'auto'")


__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend", "check_backend", "BACKENDS"]
