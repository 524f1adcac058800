"""Reference attention in plain torch: the CPU path and the oracle for the GPU kernels.

An fp8 KV cache (EngineConfig.kv_cache_dtype) holds x / scale clamped to the format's range and
rounded to nearest even (torch's cast), per-tensor scales k_scale and v_scale; reads give
stored * scale in fp32, rounded to the query's dtype: the Triton kernels' map
(engine/kernels/kv_quant.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata
from engine.dtypes import is_fp8


def quantize_ref(x: torch.Tensor, scale: float, cache_dtype: torch.dtype) -> torch.Tensor:
    """x as a cache of cache_dtype stores it: cast as it is (a model-dtype cache), or for fp8
    x / scale in fp32, clamped to the format's largest finite value, rounded to nearest even."""
    if not is_fp8(cache_dtype):
        return x.to(cache_dtype)
    bound = torch.finfo(cache_dtype).max
    return (x.float() / scale).clamp(-bound, bound).to(cache_dtype)


def dequantize_ref(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cache elements x as attention reads them: as they are (a model-dtype cache; no copy), or
    for fp8 x * scale in fp32, rounded to `dtype` (the query's)."""
    if not is_fp8(x.dtype):
        return x
    return (x.float() * scale).to(dtype)


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter new K/V rows into their cache slots; slot -1 is padding and is skipped. The
    scales apply to an fp8 cache only."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = quantize_ref(k[keep], k_scale, k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = quantize_ref(v[keep], v_scale, v_cache.dtype)


def paged_attention_ref(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale: float = 1.0,
                        v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of each sequence's query tokens to its cached context, read through
    the block table. Query j of a sequence with n queries and context L sits at position
    L - n + j and sees keys 0..L - n + j. The scales apply to an fp8 cache only."""
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    for i, ctx in enumerate(lens):
        start, end = qsl[i], qsl[i + 1]
        n = end - start
        if n == 0:
            continue
        blocks = meta.block_tables[i, : -(-ctx // block_size)].long()
        k = dequantize_ref(k_cache[blocks].flatten(0, 1)[:ctx], k_scale, q.dtype)
        v = dequantize_ref(v_cache[blocks].flatten(0, 1)[:ctx], v_scale, q.dtype)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        q_pos = torch.arange(ctx - n, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]  # [n, ctx]
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
        )
        out[start:end] = o.transpose(0, 1)
    return out


def paged_attention_batched(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale: float = 1.0,
                            v_scale: float = 1.0) -> torch.Tensor:
    """The same attention as `paged_attention_ref` in one masked SDPA call over padded
    sequences (every sequence's blocks gathered at once): the CPU engine path, where a Python
    loop over sequences and layers would dominate the step. Rows of q past query_start_loc[-1]
    (padding of a graph-shaped step) belong to no sequence: their output is zero."""
    qsl, lens, dev = meta.query_start_loc_cpu, meta.seq_lens, q.device
    b = len(qsl) - 1
    q_lens = torch.tensor([qsl[i + 1] - qsl[i] for i in range(b)], device=dev)
    max_q = int(q_lens.max())
    tables = meta.block_tables.long()  # [B, max_blocks]
    k = dequantize_ref(k_cache[tables], k_scale, q.dtype).flatten(1, 2).transpose(1, 2)  # [B, Hkv, max_blocks * bs, D]
    v = dequantize_ref(v_cache[tables], v_scale, q.dtype).flatten(1, 2).transpose(1, 2)
    seq_of_tok = torch.repeat_interleave(torch.arange(b, device=dev), q_lens)
    row_of_tok = torch.arange(qsl[-1], device=dev) - torch.tensor(qsl[:-1], device=dev)[seq_of_tok]
    padded = q.new_zeros(b, max_q, *q.shape[1:])
    padded[seq_of_tok, row_of_tok] = q[: qsl[-1]]
    q_pos = (lens.long() - q_lens)[:, None] + torch.arange(max_q, device=dev)[None, :]  # [B, max_q]
    keys = torch.arange(k.shape[2], device=dev)
    visible = keys[None, None, :] <= q_pos[:, :, None]  # causal; also hides keys past seq_len
    o = F.scaled_dot_product_attention(
        padded.transpose(1, 2), k, v, attn_mask=visible[:, None], scale=scale, enable_gqa=True
    )  # [B, Hq, max_q, D]
    o = o.transpose(1, 2)[seq_of_tok, row_of_tok]
    return o if o.shape[0] == q.shape[0] else torch.cat([o, o.new_zeros(q.shape[0] - o.shape[0], *o.shape[1:])])


class TorchAttention:
    accepts_stored_kv = False
    fused_decode = False

    def __init__(self, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        self.k_scale, self.v_scale = k_scale, v_scale  # an fp8 cache's per-tensor scales

    def reserve(self, max_seqs: int, num_heads: int, head_dim: int, device: torch.device) -> None:
        pass  # no scratch: the reference path allocates per call

    def warmup(self, num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, max_seqs: int) -> None:
        pass  # nothing compiles

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        return paged_attention_batched(q, k_cache, v_cache, meta, scale, self.k_scale, self.v_scale)
