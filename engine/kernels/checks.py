"""Argument checks shared by the paged-attention wrappers (run once per path by the backend)."""

from __future__ import annotations

import torch

from engine.kernels.store_kv import check_cache_dtypes


def check_attention_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                         seq_lens: torch.Tensor, block_tables: torch.Tensor, rows: str) -> None:
    """q/out [rows, num_heads, head_dim], caches [num_blocks, block_size, num_kv_heads, head_dim]
    with contiguous head dims, q/out in one float dtype and the caches in it or in fp8; int32
    seq_lens [S] and block_tables [S, *]."""
    if q.dim() != 3 or out.shape != q.shape:
        raise ValueError(f"q and out must be [{rows}, num_heads, head_dim]; got {tuple(q.shape)}, {tuple(out.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"caches must be [num_blocks, block_size, num_kv_heads, {q.shape[2]}]; "
                         f"got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if q.shape[1] % k_cache.shape[2] != 0:
        raise ValueError(f"num_heads {q.shape[1]} is not a multiple of num_kv_heads {k_cache.shape[2]}")
    check_cache_dtypes(q.dtype, out.dtype, k_cache.dtype, v_cache.dtype, "q, out")
    if any(t.stride(-1) != 1 for t in (q, out, k_cache, v_cache)):
        raise ValueError("q, out, k_cache and v_cache need a contiguous last (head_dim) dimension")
    num_seqs = seq_lens.shape[0]
    if seq_lens.dtype != torch.int32 or seq_lens.dim() != 1:
        raise ValueError(f"seq_lens must be int32 [num_seqs]; got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if (block_tables.dtype != torch.int32 or block_tables.dim() != 2
            or block_tables.shape[0] != num_seqs or block_tables.stride(1) != 1):
        raise ValueError(f"block_tables must be int32 [{num_seqs}, max_blocks] with a contiguous "
                         f"last dim; got {block_tables.dtype} {tuple(block_tables.shape)}")
