"""FlashAttention 4 backend (pip flash-attn-4, import flash_attn.cute; `llmbench[flash-attn]`):
prefill and mixed steps run FA4's varlen kernel over the engine's paged cache; decode-only steps
run this project's Triton split-K kernel, which measured faster for decode on an H200. Every
CUDA graph (decode, and prefill/mixed steps up to max_graph_prefill_tokens) captures the Triton
kernels: FA4 never runs inside a capture, so it serves the eager steps, the large prefills.

How the engine's metadata maps onto flash_attn_varlen_func (flash_attn/cute/interface.py,
4.0.0b36):
- k, v: the per-layer caches [num_pages, page_size, Hkv, D] with page_table = block_tables
  [B, max_pages] int32 (rows may be a strided view; any page size works: page_size equal to the
  kernel's key tile loads pages by TMA, other sizes by cp.async);
- cu_seqlens_q = query_start_loc, seqused_k = seq_lens (cached + new keys); with causal=True the
  mask is aligned bottom-right, query j of n sees keys < seqused_k - n + j + 1, which is what
  chunked prefill and prefix-cache hits need;
- keys past seqused_k in a sequence's last page are loaded and masked, so they must be finite:
  the cache starts zeroed and only ever holds K/V rows;
- it returns (out, lse), lse None unless asked for; out is a new [T, Hq, D] tensor.

K and V are stored as in the Triton backend: the model's rotary kernel writes them
(accepts_stored_kv), or store_kvcache here when k and v are passed. Each kernel variant compiles
on first use (3-6 s); warmup() compiles them when the engine starts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.attention.metadata import AttentionMetadata
from engine.attention.requirements import FLASH_ATTN_INSTALL, FLASH_ATTN_MODULE
from engine.attention.triton_backend import TritonAttention
from engine.kernels.store_kv import store_kvcache

# Query lengths of the warm-up calls: one token (every query row fits one tile) and more than
# FA4's largest query tile even before GQA packing: the compiled kernel differs between the two.
WARMUP_QUERY_LENS = (1, 256)


def load_varlen_func() -> Callable:
    """flash_attn.cute.flash_attn_varlen_func, or an ImportError that says how to install it."""
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except (ImportError, OSError) as err:  # OSError: a CUDA library the DSL loads is missing
        raise ImportError(f"attention_backend='flash_attn' could not import {FLASH_ATTN_MODULE} "
                          f"({err}); install FlashAttention 4 with {FLASH_ATTN_INSTALL}") from err
    return flash_attn_varlen_func


class FlashAttention:
    accepts_stored_kv = True  # as TritonAttention: the rotary kernel writes this step's K/V
    fused_decode = True  # decode steps run TritonAttention's kernels, its decode_fused too
    # the caches are in the model's dtype (EngineConfig rejects an fp8 cache with this backend)
    k_scale = v_scale = 1.0

    def __init__(self, varlen_func: Callable | None = None) -> None:
        # varlen_func: a stand-in for FA4's (CPU tests of the argument mapping)
        self.varlen = varlen_func or load_varlen_func()  # FA4's flash_attn_varlen_func
        self._decode = TritonAttention()  # decode-only steps, and their CUDA graphs
        self._checked = False  # store_kvcache's argument checks, run once

    def reserve(self, max_seqs: int, num_heads: int, head_dim: int, device: torch.device) -> None:
        self._decode.reserve(max_seqs, num_heads, head_dim, device)

    def warmup(self, num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, max_seqs: int) -> None:
        """Run FA4 once per kernel variant the steps can need, so no step pays a compile. FA4
        specialises on host-side sizes: whether the longest query fits one tile (WARMUP_QUERY_LENS)
        and, for large batches, its batch lookup; so both lengths run at one sequence and at
        max_seqs sequences. Keys are read from the null block 0 only."""
        for num_seqs in sorted({1, max_seqs}):
            for q_len in WARMUP_QUERY_LENS:
                meta = _warmup_metadata(num_seqs, q_len, k_cache.shape[1], k_cache.device)
                q = torch.zeros(meta.query_start_loc_cpu[-1], num_heads, k_cache.shape[3],
                                dtype=k_cache.dtype, device=k_cache.device)
                self._prefill(q, k_cache, v_cache, meta, k_cache.shape[3] ** -0.5)
        if k_cache.is_cuda:
            torch.cuda.synchronize(k_cache.device)

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor | None,  # [T, Hkv, D]; None with v: this step's K/V are in the caches
        v: torch.Tensor | None,
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        # Inside a CUDA graph capture (decode graphs, and the small prefill/mixed steps that
        # engine/graph_shapes.py pads to a graph) the Triton kernels run: their grids are fixed by
        # the padded shapes, and FA4 is not known to be capturable. FA4 runs the eager steps,
        # the large prefills where it wins.
        if meta.is_decode_only or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
            return self._decode.forward(q, k, v, k_cache, v_cache, meta, scale)
        if k is not None:
            store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping, check=not self._checked)
            self._checked = True
        return self._prefill(q, k_cache, v_cache, meta, scale)

    def decode_fused(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, rotary,
                     merge: bool) -> torch.Tensor:
        return self._decode.decode_fused(q, k, v, k_cache, v_cache, meta, scale, rotary, merge)

    def _prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata, scale: float) -> torch.Tensor:
        result = self.varlen(
            q, k_cache, v_cache,
            cu_seqlens_q=meta.query_start_loc, max_seqlen_q=meta.max_query_len,
            seqused_k=meta.seq_lens, max_seqlen_k=meta.max_seq_len,
            page_table=meta.block_tables, softmax_scale=scale, causal=True,
        )
        return result[0] if isinstance(result, tuple) else result  # (out, lse) in 4.0.0b36


def _warmup_metadata(num_seqs: int, q_len: int, block_size: int, device: torch.device) -> AttentionMetadata:
    """The first sequence has q_len queries over as many keys, the others one each; every block
    table entry is the null block 0 and nothing is stored (slot -1)."""
    q_lens = [q_len] + [1] * (num_seqs - 1)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    i32 = dict(dtype=torch.int32, device=device)
    return AttentionMetadata(
        slot_mapping=torch.full((qsl[-1],), -1, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, **i32), seq_lens=torch.tensor(q_lens, **i32),
        block_tables=torch.zeros(num_seqs, -(-q_len // block_size), **i32),
        max_query_len=q_len, max_seq_len=q_len, query_start_loc_cpu=qsl, seq_lens_cpu=q_lens,
    )
