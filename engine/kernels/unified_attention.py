"""Unified paged attention (vLLM's triton_unified_attention design, written for this engine).

One launch serves varlen prefill, chunked prefill, prefix-cache hits, decode and mixed batches:
the new K/V were stored first, so every key is read through the block table. Sequence i has
q_len queries and seq_len keys; query j sits at position ctx + j (ctx = seq_len - q_len) and sees
keys 0..ctx + j.

GQA packing: a program owns one KV head and BLOCK_M rows = BLOCK_Q query tokens x GROUP heads,
so each K/V tile is loaded once for the whole head group and QK^T / PV are tensor-core dots.
Grid (T // BLOCK_Q + num_seqs, Hkv) is an upper bound on the q-blocks (sequence i starts at
block qsl[i] // BLOCK_Q + i); each program finds its sequence by bisection and spare ones exit,
so the grid needs no host-side query lengths.

An fp8 KV cache (engine/kernels/kv_quant.py): K and V tiles are loaded in 8 bits and enter
fp16 dots unscaled; k_scale folds into the softmax scale and v_scale into the output.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.kernels.checks import check_attention_args
from engine.kernels.kv_quant import dot_query, fold_scale

LOG2E = 1.4426950408889634
# Sequences with at most this many queries use the small (16-row) tile, the rest the large tile.
SMALL_Q_MAX = 16


@triton.jit
def _find_seq(qsl_ptr, target, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest i with qsl[i] // BLOCK_Q + i <= target (first q-block index of sequence i)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= target:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(q, q_pos, start, kv_end, bt_row, k_base, v_base, d, d_ok, m_i, l_i, acc, scale_log2,
                 stride_kc_b, stride_kc_s, stride_vc_b, stride_vc_s, MASKED: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """One BLOCK_N-key tile from `start` folded into the online softmax (m_i, l_i, acc). MASKED:
    keys past kv_end or a row's own position are masked (loads too: slots past seq_len may hold
    NaN/garbage, and 0 * NaN in the PV dot would poison the row); else every key is visible to
    every row and the loads take no mask (but a padded head dim's)."""
    pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    # Tiles ignore block boundaries: each key looks up its own block id.
    if MASKED:
        pos_ok = pos < kv_end
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
    else:
        pos_ok = pos >= 0  # all true: the padded head dim's masks below need a key-side operand
        blk = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64)
    in_blk = pos % BLOCK_SIZE
    k_ptrs = k_base + (blk * stride_kc_b + in_blk * stride_kc_s)[None, :] + d[:, None]  # [D_PAD, BLOCK_N]
    v_ptrs = v_base + (blk * stride_vc_b + in_blk * stride_vc_s)[:, None] + d[None, :]  # [BLOCK_N, D_PAD]
    if MASKED or D_PAD != HEAD_DIM:
        kt = tl.load(k_ptrs, mask=pos_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        kt = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    kt = kt.to(q.dtype)  # fp8: exact in q's fp16 (kv_quant.dot_query); else as loaded
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2  # log2 units, fp32
    if MASKED:
        s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked rows: avoid inf-inf
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = v.to(q.dtype)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# num_seqs and the block-table width (stride_bt) vary every step: specialising on them (==1, %16)
# would recompile mid-run
@triton.jit(do_not_specialize=["num_seqs", "q_len_split", "stride_bt"])
def _unified_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,  # q/out [T, Hq, D]; caches [nb, bs, Hkv, D]
    qsl_ptr, seq_lens_ptr, block_tables_ptr,  # [S+1] int32, [S] int32, [S, max_blocks] int32
    num_seqs, q_len_split, scale_log2,
    k_scale, v_scale,  # fp8 caches only: read = stored * scale
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
    stride_bt,
    LONG: tl.constexpr,  # True: only sequences with q_len > q_len_split; False: the others
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if LONG:
        if q_len <= q_len_split:
            return
    else:
        if q_len > q_len_split:
            return
    local = pid - (q_start // BLOCK_Q + seq)
    if local * BLOCK_Q >= q_len:  # spare program of the upper-bound grid
        return
    # a sequence's q-blocks run last first: the later a block, the more keys it visits, so the
    # long programs start early and the short ones fill in behind them
    q_blk = tl.cdiv(q_len, BLOCK_Q) - 1 - local
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len

    # Row r of the tile = query token r // GROUP of this q-block, head r % GROUP of the group.
    rows = tl.arange(0, BLOCK_M)
    q_idx = q_blk * BLOCK_Q + rows // GROUP  # [BLOCK_M] index within the sequence
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    tok = (q_start + q_idx).to(tl.int64)
    qo_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + tok[:, None] * stride_q_t + head[:, None] * stride_q_h + d[None, :],
                mask=qo_mask, other=0.0)  # [BLOCK_M, D_PAD]
    q = dot_query(q, k_cache_ptr)  # fp8 cache: fp16 dots over the unscaled elements
    scale_log2 = fold_scale(scale_log2, k_scale, k_cache_ptr)
    q_pos = ctx + q_idx  # [BLOCK_M] absolute position of each row's query

    # Causal limit of the whole tile: keys past its last query are never visited. Keys up to its
    # first query's position are visible to every row: whole tiles of those skip the causal and
    # bounds masks; only the tiles along the diagonal take them.
    kv_end = ctx + tl.minimum(q_blk * BLOCK_Q + BLOCK_Q, q_len)
    full_end = ((ctx + q_blk * BLOCK_Q + 1) // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kc_h
    v_base = v_cache_ptr + kv_head * stride_vc_h
    for start in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, q_pos, start, kv_end, bt_row, k_base, v_base, d, d_ok, m_i, l_i, acc,
                                     scale_log2, stride_kc_b, stride_kc_s, stride_vc_b,
                                     stride_vc_s, False, BLOCK_SIZE, BLOCK_N, HEAD_DIM, D_PAD,
                                     DOT_PRECISION)
    for start in range(full_end, kv_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, q_pos, start, kv_end, bt_row, k_base, v_base, d, d_ok, m_i, l_i, acc,
                                     scale_log2, stride_kc_b, stride_kc_s, stride_vc_b,
                                     stride_vc_s, True, BLOCK_SIZE, BLOCK_N, HEAD_DIM, D_PAD,
                                     DOT_PRECISION)

    acc = fold_scale(acc, v_scale, v_cache_ptr)
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_o_t + head[:, None] * stride_o_h + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=qo_mask)


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
           query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
           block_tables: torch.Tensor) -> None:
    num_seqs = seq_lens.shape[0]
    if query_start_loc.dtype != torch.int32 or tuple(query_start_loc.shape) != (num_seqs + 1,):
        raise ValueError(f"query_start_loc must be int32 [{num_seqs + 1}] (one more than seq_lens); got "
                         f"{query_start_loc.dtype} {tuple(query_start_loc.shape)}")
    check_attention_args(q, k_cache, v_cache, out, seq_lens, block_tables, rows="num_tokens")


def _tile_config(group: int, large: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Small tile (16 rows, as vLLM) for decode-like
    sequences; 64 rows, 4 warps and 2 stages for prefill: with the causal mask only on the
    diagonal's tiles, 64 rows beat 128 with 8 warps by 11-18% on an H200 (qwen3-0.6b's heads,
    bench-like, 4 x 2,048, 8 x 512 and prefix-hit batches; reports/PERF.md row 39), where before
    the masks they did not, and the prefill workload by 13.6%; 2 stages beat 3 by 2.4% there and
    by 5-7% on the longer microbench cases, llama's heads too (row 39b)."""
    rows = triton.next_power_of_2(group)
    if large:
        return max(64, rows), 64, 4, 2
    return max(16, rows), 64, 4, 2


def _launch(q, k_cache, v_cache, out, qsl, seq_lens, block_tables, scale, k_scale, v_scale, q_len_split: int,
            long: bool, cfg: tuple[int, int, int, int]) -> None:
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // k_cache.shape[2]
    block_m, block_n, num_warps, num_stages = cfg
    block_q = block_m // group  # block_m >= next_pow2(group) keeps this >= 1
    grid = (num_tokens // block_q + seq_lens.shape[0], k_cache.shape[2])
    _unified_attention_kernel[grid](
        q, k_cache, v_cache, out, qsl, seq_lens, block_tables,
        seq_lens.shape[0], q_len_split, scale * LOG2E, k_scale, v_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        LONG=long, BLOCK_SIZE=k_cache.shape[1], GROUP=group, HEAD_DIM=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )


def unified_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    out: torch.Tensor,  # [T, Hq, D], written in place
    query_start_loc: torch.Tensor,  # [S+1] int32
    seq_lens: torch.Tensor,  # [S] int32, context length incl. this step's tokens
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    check: bool = True,
    small_cfg: tuple[int, int, int, int] | None = None,
    large_cfg: tuple[int, int, int, int] | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal paged attention for any mix of prefill chunks and decodes; returns out.
    max_query_len picks the tiles (host int, no sync); max_seq_len is accepted for the
    interface and unused (the loop bounds come from seq_lens on device). Rows of out past
    query_start_loc[-1] (padding tokens) are left unwritten.
    When some sequence has more than SMALL_Q_MAX queries, two launches run over the same grid
    scheme: the 16-row tile for the short sequences and the large (64-row) tile for the long ones,
    so decodes in a mixed batch do not pay 64-row dots. Which launch serves a sequence is decided
    on the device (q_len vs SMALL_Q_MAX), so a CUDA graph captured with max_query_len > SMALL_Q_MAX
    serves any mix; grids depend only on T and the number of sequence rows, and sequence rows with
    no queries (graph padding) exit at once. *_cfg override (BLOCK_M, BLOCK_N, num_warps,
    num_stages) for tuning. An fp8 cache is read as stored * k_scale / v_scale."""
    if check:
        _check(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables)
        if not math.isfinite(scale) or max_query_len < 0:
            raise ValueError(f"bad scale {scale} or max_query_len {max_query_len}")
    if q.shape[0] == 0 or seq_lens.shape[0] == 0:
        return out
    group = q.shape[1] // k_cache.shape[2]
    small = small_cfg or _tile_config(group, large=False)
    args = (q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, scale, k_scale, v_scale)
    if max_query_len <= SMALL_Q_MAX:
        _launch(*args, q_len_split=1 << 30, long=False, cfg=small)
        return out
    _launch(*args, q_len_split=SMALL_Q_MAX, long=False, cfg=small)
    large = large_cfg or _tile_config(group, large=True)
    _launch(*args, q_len_split=SMALL_Q_MAX, long=True, cfg=large)
    return out
