"""Per-step attention inputs, built once by the model runner and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from engine.kernels.rope import RotaryIn


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token, -1 = skip
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cu_seqlens of the query tokens
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step (cached + new)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with the null block 0
    max_query_len: int
    max_seq_len: int
    # Host copies for backends that loop in Python (the torch reference).
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # decode-only steps: [num_seqs] int32, a permutation of the rows, longest sequence first (the
    # decode kernel launches programs in this order so that no long one starts in the last wave);
    # None for steps with prefill tokens
    decode_order: torch.Tensor | None = None
    # the model may run every decoder layer in one persistent kernel (engine.graph_shapes.takes_persistent)
    persistent: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    # True: the model may store this step's K/V itself (its GPU rotary kernel writes them into
    # the caches) and then passes k = v = None to forward
    accepts_stored_kv: bool
    # True: decode_fused exists (the Triton decode kernel with the rotary, the KV store and the
    # split merge folded in; see engine.attention.triton_backend)
    fused_decode: bool
    # an fp8 KV cache's per-tensor scales (stored = x / scale, read = stored * scale), for every
    # kernel that stores or reads the caches; a model-dtype cache ignores them
    k_scale: float
    v_scale: float

    def reserve(self, max_seqs: int, num_heads: int, head_dim: int, device: torch.device) -> None:
        """Allocate any per-batch scratch up front (before CUDA graph capture)."""
        ...

    def warmup(self, num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, max_seqs: int) -> None:
        """Compile what would otherwise compile inside the first steps (engine start, on CUDA,
        before graph capture). May read the caches' null block 0; writes nothing to them."""
        ...

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim]; None: already stored
        v: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...

    def decode_fused(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                     rotary: RotaryIn | None, merge: bool) -> torch.Tensor:
        """Only where fused_decode: a decode-only step whose kernel also applies `rotary` to the
        raw q, k and stores K, V (rotary None: done before, k = v = None) and, with `merge`,
        merges its own splits."""
        ...
