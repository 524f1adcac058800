"""Split-K (flash-decoding) paged attention for decode steps (one query token per sequence).

Stage 1, grid (num_seqs, Hkv, num_splits): a program takes every Q head of one KV group and an
equal share of the sequence's BLOCK_N-key tiles, and writes its fp32 partial output (already
normalised) and log2-sum-exp to scratch. Stage 2, grid (num_seqs, Hq): merges the splits by
log-sum-exp. With one split, stage 1 writes the output directly and stage 2 is skipped.

Launch order: blocks start x-fastest, so sequence slot by slot for each KV head. `order` (a
permutation of the rows, longest first) maps slots to sequences, which makes that LPT scheduling:
with one split a program reads its whole sequence, and a long one that starts in the last wave
is the step's tail (bench-like mixed lengths on an H200: 6-13% faster at 64-256 sequences,
reports/PERF.md row 32). With splits it measured no better, often worse: the caller decides.

Two options fold the kernels around it into stage 1 (the fused small-batch decode path,
EngineConfig.fused_small_batch_rotary / _merge):
- ROTARY: q and this step's k arrive raw from the qkv projection (a `RotaryIn`): every program
  applies the q/k RMSNorm and rotary to its q heads as it loads them, and the tiles cover the
  cached keys only (seq_len - 1). The newest key, this step's, goes to the program whose split
  holds the last cached tile (split 0 if none): it rotates K, stores K and V into the caches at
  the token's slot before its loop (no program of this launch reads that slot) and folds them
  into its softmax after the loop, from registers, as one more key of its last tile would be
  (the same roundings; only the order of the sums differs). Replaces the qk_norm_rope kernel.
- MERGE: stage 2 runs in stage 1's last program of each (sequence, KV head): every program counts
  itself in (an atomic on a per-(sequence, KV head) counter in the scratch, acq_rel at GPU scope,
  after a barrier: its partials are visible to whoever counts last); the last one merges the
  splits of its head group (loads bypass L1) and resets the counter to 0 for the next launch.
  Replaces the reduce kernel; graph-safe (the counters are zeroed once, in the scratch).

An fp8 KV cache (engine/kernels/kv_quant.py): K and V tiles are loaded in 8 bits and enter
the dots unscaled as fp16 (fp32 for an fp32 query), which holds every e4m3 and e5m2 value
exactly, so each element pair costs one convert; the query is rounded to fp16 once, k_scale
folds into the softmax scale and v_scale into the output. Scaling every element in fp32 and
rounding it to bf16 first made the fp8 cache 0.90x as fast as bf16 on an H200 (PERF row 23).
ROTARY stores this step's K and V quantized and folds in the stored elements the same way.

CUDA-graph safety: seq_lens and block_tables are only read on device, the grids depend only on
(num_seqs, Hkv, num_splits), scratch is passed in, and a padded lane (seq_len 0) visits no tile,
reads no block table entry and writes zeros.

Head group in a tl.dot, padded to 16 rows (BLOCK_H): decode is bound by K/V bytes, so the
tensor-core work wasted on padding rows is free, while the dot keeps the K/V tile in the MMA
layout with one reduction per tile. Broadcast-multiply-and-sum for a group of 2 would instead
reduce QK over head_dim across threads (shuffles) every tile and needs a second layout for PV;
vLLM and SGLang's Triton decode kernels pad to 16 for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.checks import check_attention_args
from engine.kernels.kv_quant import dot_query, fold_scale, to_cache
from engine.kernels.rope import RotaryIn, norm_rope
from engine.kernels.store_kv import check_store_args

LOG2E = 1.4426950408889634
MAX_SPLITS = 16
MIN_SPLIT_TOKENS = 64  # a split shorter than one 64-key tile would only add reduce work
# Programs per SM that choose_num_splits aims for. Sequences in a batch differ in length, so a
# program's work varies; more, smaller programs even out the last wave. Read at call time.
TARGET_PROGRAMS_PER_SM = 4
# (BLOCK_N, num_warps, num_stages) of stage 1 unless a caller names one. Read at call time.
# 128 keys a tile: a program keeps twice the bytes in flight of a 64-key tile, which is what a
# batch with fewer programs than the GPU holds needs (its longest sequences finish last); in the
# engine the decode step got 8% faster at TP=1 and TP=2 on llama-3-8b (reports/PERF.md).
DECODE_TILE = (128, 4, 2)
# ... except for steps of MID_BATCH_PAIRS[0] to [1] (sequence, KV head) pairs (16-64 sequences of
# 8 KV heads), which take DECODE_TILE_MID: on an H200 (PERF row 58) 64-key tiles read 3.4-3.5 TB/s
# at 64 x 656 cached tokens against 2.8 (49-51 vs 61 us a layer), and llama-3-8b's TPOT at 64 x
# 4,096 / 64 x 640 / 16 x 4,096 / 16 x 640 was 0.889 / 0.954 / 0.961 / 0.996 of the 128-key
# tile's. Batch 1 (16 splits) keeps 128 keys, untimed; so do steps past 64 sequences: the bench's
# decode steps (136 sequences on average) took the same time with 64-key tiles (row 58).
DECODE_TILE_MID = (64, 4, 2)
MID_BATCH_PAIRS = (128, 512)
# The same for a 1-byte (fp8) cache. Its tiles hold half the bytes but are converted to fp16 in
# registers (~200 a thread: 2 programs an SM, against bf16's 3), so with one buffer of K/V a
# program (what Triton allocates at 2-4 stages: the K/V loads sit behind the block-table load,
# and the pipeliner splits the stages between the two) an SM kept a third of bf16's bytes in
# flight and read 55% of copy bandwidth. 5 stages give K/V two buffers: 67% and the bench
# +7-9% on an H200 (reports/PERF.md row 44). Read at call time.
DECODE_TILE_FP8 = (128, 4, 5)
# Registers a thread of an fp8 decode program may take (ptxas' maxnreg); None: as the compiler
# chooses (~212 at DECODE_TILE_FP8: 2 programs an SM). 168 fits 3 programs an SM, whose 3 x 75 KB
# of shared memory fit too, and compiles without spilling under the GPU machines' Triton 3.6
# (sm_90; 3.9 spills 128 bytes): a third program's two buffers in flight. Timed on an H200: 5%
# faster at 256 sequences, 5-12% slower at 64, the bench unchanged (1.006x), so off
# (reports/PERF.md row 45). Read at call time.
DECODE_MAXNREG_FP8: int | None = None
# Default tiles shrink BLOCK_N so that up to two stages of (K + V tile), counted at 16 bits an
# element at least (an fp8 tile takes an fp16 tile's registers once converted), stay within this
# estimate: fp32 and head_dim 256 keep the 64-key tiles they were measured with (Triton itself
# allocated 70 KB for bf16 at 128 keys and 78 KB for fp32 at 64, sm_90 compile).
TILE_SMEM_BYTES = 128 << 10
# MERGE: fp32 elements of the partials the merging program loads at once (heads x splits x D):
# 8192 is 64 registers a thread at 4 warps, 4 heads of 16 splits x 128
MERGE_TILE = 8192


@dataclass
class DecodeScratch:
    """Preallocated split partials for a batch of up to acc.shape[0] sequences."""

    acc: torch.Tensor  # [max_seqs, Hq, max_splits, D] fp32, normalised partial outputs
    lse: torch.Tensor  # [max_seqs, Hq, max_splits] fp32, log2-sum-exp of each split
    # [max_seqs, Hq] int32, zeros between launches: programs of (sequence, KV head) done (MERGE;
    # row s, column h < Hkv)
    count: torch.Tensor

    @property
    def max_seqs(self) -> int:
        return self.acc.shape[0]

    @property
    def max_splits(self) -> int:
        return self.acc.shape[2]


def alloc_decode_scratch(max_seqs: int, num_heads: int, head_dim: int, device: torch.device | str,
                         max_splits: int = MAX_SPLITS) -> DecodeScratch:
    """Scratch for decode_attention with up to max_seqs sequences and max_splits splits."""
    if max_seqs < 1 or max_splits < 1:
        raise ValueError(f"max_seqs {max_seqs} and max_splits {max_splits} must be >= 1")
    acc = torch.empty(max_seqs, num_heads, max_splits, head_dim, dtype=torch.float32, device=device)
    lse = torch.empty(max_seqs, num_heads, max_splits, dtype=torch.float32, device=device)
    return DecodeScratch(acc, lse, torch.zeros(max_seqs, num_heads, dtype=torch.int32, device=device))


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len_hint: int,
                      num_sms: int = 132) -> int:
    """~TARGET_PROGRAMS_PER_SM programs per SM over (seqs x KV heads x splits), capped at
    MAX_SPLITS, at least 1, and no more splits than MIN_SPLIT_TOKENS-key chunks of the longest
    sequence. Host ints only:
    a captured graph must be captured with the max_seq_len it will replay under (max_model_len)."""
    target = (TARGET_PROGRAMS_PER_SM * num_sms) // max(1, num_seqs * num_kv_heads)
    by_len = triton.cdiv(max(1, max_seq_len_hint), MIN_SPLIT_TOKENS)
    return max(1, min(MAX_SPLITS, target, by_len))


@triton.jit
def merge_splits(lse, part):
    """Split partials merged by log-sum-exp: lse [.., S] (log2; -inf: an empty split, weight 0)
    and part [.., S, D] (each split's normalised output) -> [.., D]; all splits empty: zeros."""
    lse_max = tl.max(lse, axis=-1, keep_dims=True)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # seq_len 0: all splits empty
    w = tl.exp2(lse - lse_max)  # empty splits weigh 0
    denom = tl.sum(w, axis=-1, keep_dims=True)
    return tl.sum(tl.expand_dims(w, -1) * part, axis=-2) / tl.where(denom == 0.0, 1.0, denom)


@triton.jit
def store_new_kv(k_src, v_src, slot_ptr, seq, kv_head, mine, k_cache_ptr, v_cache_ptr, kw_ptr, cos_row, sin_row,
                  eps, k_scale, v_scale, stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
                  BLOCK_SIZE: tl.constexpr, QK_NORM: tl.constexpr, HEAD_DIM: tl.constexpr):
    """This step's K (normed and rotated from its raw row at k_src) and V (at v_src) of one KV
    head, loaded and stored into the caches at the token's slot only where `mine` (a program's
    scalar) and the slot is not -1. Returns (k, v) [HEAD_DIM] as stored (an fp8 cache's elements,
    unscaled, as the attention loop reads them; zeros if not mine)."""
    slot = tl.load(slot_ptr + seq)
    at = tl.maximum(slot, 0)
    d = tl.arange(0, HEAD_DIM)
    load = (d * 0 + mine.to(tl.int32)) != 0  # vectors: the interpreter rejects scalar masks
    keep = load & ((d * 0 + slot) >= 0)
    k = norm_rope(k_src, load, kw_ptr, cos_row, sin_row, eps, QK_NORM, HEAD_DIM)
    v = tl.load(v_src + d, mask=load, other=0.0)
    k_row = (at // BLOCK_SIZE) * stride_kc_b + (at % BLOCK_SIZE) * stride_kc_s + kv_head * stride_kc_h
    v_row = (at // BLOCK_SIZE) * stride_vc_b + (at % BLOCK_SIZE) * stride_vc_s + kv_head * stride_vc_h
    k_stored = to_cache(k, k_scale, k_cache_ptr)
    v_stored = to_cache(v, v_scale, v_cache_ptr)
    tl.store(k_cache_ptr + k_row + d, k_stored, mask=keep)
    tl.store(v_cache_ptr + v_row + d, v_stored, mask=keep)
    return k_stored, v_stored


@triton.jit
def fold_key(q, k, v, m_i, l_i, acc, scale_log2):
    """The running softmax (m_i, l_i, acc) of the q rows [BLOCK_H, D] after one more key k and
    value v [D], with the loop's operations: p rounded to v's dtype before it weighs v."""
    s = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1) * scale_log2  # [BLOCK_H]
    m_new = tl.maximum(m_i, s)
    p = tl.exp2(s - m_new)
    alpha = tl.exp2(m_i - m_new)
    acc = acc * alpha[:, None] + p.to(v.dtype).to(tl.float32)[:, None] * v.to(tl.float32)[None, :]
    return m_new, l_i * alpha + p, acc


@triton.jit
def load_kv_tile(bt_row, t, n_keys, kv_head, k_cache_ptr, v_cache_ptr, stride_kc_b, stride_kc_s, stride_kc_h,
                 stride_vc_b, stride_vc_s, stride_vc_h, d, d_ok, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Key tile t of one KV head through a block table row: K^T [D_PAD, BLOCK_N], V [BLOCK_N,
    D_PAD] as stored, and which of its keys are among the n_keys (the others are not loaded)."""
    pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
    pos_ok = pos < n_keys
    blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
    in_blk = pos % BLOCK_SIZE
    k_row = blk * stride_kc_b + in_blk * stride_kc_s + kv_head * stride_kc_h
    v_row = blk * stride_vc_b + in_blk * stride_vc_s + kv_head * stride_vc_h
    # Masked loads: slots past seq_len may hold garbage/NaN (0 * NaN = NaN in the PV dot).
    kt = tl.load(k_cache_ptr + k_row[None, :] + d[:, None], mask=pos_ok[None, :] & d_ok[:, None], other=0.0)
    v = tl.load(v_cache_ptr + v_row[:, None] + d[None, :], mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
    return kt, v, pos_ok


@triton.jit
def attend_tile(q, m_i, l_i, acc, kt, v, pos_ok, scale_log2, DOT_PRECISION: tl.constexpr):
    """The online softmax (m_i, l_i, acc) after one loaded tile with at least one valid key."""
    kt = kt.to(q.dtype)  # fp8: exact in q's (fp16) dtype; else as loaded
    v = v.to(q.dtype)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_H, BLOCK_N]
    s = tl.where(pos_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the tile has a valid key
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def attend_tiles(q, m_i, l_i, acc, block_tables_ptr, seq, stride_bt, kv_head, t_begin, t_end, n_keys,
                 k_cache_ptr, v_cache_ptr, stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s,
                 stride_vc_h, scale_log2, d, d_ok, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 STAGES: tl.constexpr = None):
    """The online softmax (m_i, l_i, acc) of the q rows [BLOCK_H, D_PAD] after the cached keys of
    BLOCK_N-key tiles t_begin..t_end (of n_keys) of one KV head, read through sequence seq's
    block table row (also the persistent decode kernel's, engine/kernels/persistent_decode.py).
    The row's address is formed here, next to the loop: formed at the call, the fp8 kernel under a
    168-register cap spilled 8 bytes (Triton 3.6, sm_90). STAGES: the loop's pipeline depth
    (None: the kernel's num_stages)."""
    bt_row = block_tables_ptr + seq * stride_bt
    for t in tl.range(t_begin, t_end, num_stages=STAGES):
        kt, v, pos_ok = load_kv_tile(bt_row, t, n_keys, kv_head, k_cache_ptr, v_cache_ptr, stride_kc_b, stride_kc_s,
                                     stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h, d, d_ok, BLOCK_N, BLOCK_SIZE)
        m_i, l_i, acc = attend_tile(q, m_i, l_i, acc, kt, v, pos_ok, scale_log2, DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,  # q/out [B, Hq, D]; caches [nb, bs, Hkv, D]
    acc_ptr, lse_ptr,  # scratch [maxB, Hq, S, D], [maxB, Hq, S] fp32
    seq_lens_ptr, block_tables_ptr,  # [B] int32, [B, max_blocks] int32
    scale_log2,
    k_scale, v_scale,  # fp8 caches only: read = stored * scale (ROTARY stores x / scale)
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
    stride_bt, stride_acc_t, stride_acc_h, stride_acc_s, stride_lse_t, stride_lse_h,
    # ROTARY only: this step's raw k and v [B, Hkv, D], slots [B] int64, positions [B], tables, norms
    new_k_ptr, new_v_ptr, slot_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, eps,
    stride_nk_t, stride_nk_h, stride_nv_t, stride_nv_h, stride_cos,
    count_ptr, stride_count,  # MERGE only: [maxB, >= Hkv] int32, zeros between launches
    order_ptr,  # ORDERED only: [B] int32, the sequence each program slot takes (longest first)
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROTARY: tl.constexpr = False, QK_NORM: tl.constexpr = False,
    MERGE: tl.constexpr = False, SPLITS_PAD: tl.constexpr = 1, MERGE_HEADS: tl.constexpr = 1,
    ORDERED: tl.constexpr = False,
):
    slot, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq = tl.load(order_ptr + slot).to(tl.int64) if ORDERED else slot.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    n_keys = tl.maximum(seq_len - 1, 0) if ROTARY else seq_len  # ROTARY: the newest key is not cached yet
    # Equal tile counts per split, computed on device so one graph fits every length.
    n_tiles = tl.cdiv(n_keys, BLOCK_N)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    t_begin = split * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)

    h = tl.arange(0, BLOCK_H)
    head = kv_head * GROUP + h  # [BLOCK_H]
    h_ok = h < GROUP
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    hd_mask = h_ok[:, None] & d_ok[None, :]
    if ROTARY:  # q and this step's k raw from the qkv projection (D_PAD == HEAD_DIM)
        q_pos = tl.load(pos_ptr + seq)
        cos_row, sin_row = cos_ptr + q_pos * stride_cos, sin_ptr + q_pos * stride_cos
        # the newest key is this program's if its split holds the last cached tile (split 0: none)
        mine = (split == (tl.maximum(n_tiles, 1) - 1) // tl.maximum(per_split, 1)) & (seq_len > 0)
        k_new, v_new = store_new_kv(new_k_ptr + seq * stride_nk_t + kv_head * stride_nk_h,
                                     new_v_ptr + seq * stride_nv_t + kv_head * stride_nv_h, slot_ptr, seq, kv_head,
                                     mine, k_cache_ptr, v_cache_ptr, kw_ptr, cos_row, sin_row, eps, k_scale,
                                     v_scale, stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
                                     BLOCK_SIZE, QK_NORM, HEAD_DIM)
        q = norm_rope(q_ptr + seq * stride_q_t + head[:, None] * stride_q_h, h_ok[:, None], qw_ptr,
                      cos_row, sin_row, eps, QK_NORM, HEAD_DIM)  # [BLOCK_H, D_PAD]; padding rows are 0
    else:
        q = tl.load(q_ptr + seq * stride_q_t + head[:, None] * stride_q_h + d[None, :],
                    mask=hd_mask, other=0.0)  # [BLOCK_H, D_PAD]; padding rows are 0

    q = dot_query(q, k_cache_ptr)  # fp8 cache: fp16 dots over the unscaled elements
    scale_log2 = fold_scale(scale_log2, k_scale, k_cache_ptr)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_PAD], tl.float32)
    m_i, l_i, acc = attend_tiles(q, m_i, l_i, acc, block_tables_ptr, seq, stride_bt, kv_head, t_begin, t_end,
                                 n_keys, k_cache_ptr, v_cache_ptr, stride_kc_b, stride_kc_s, stride_kc_h,
                                 stride_vc_b, stride_vc_s, stride_vc_h, scale_log2, d, d_ok, BLOCK_N, BLOCK_SIZE,
                                 DOT_PRECISION)
    if ROTARY:
        if mine:
            m_i, l_i, acc = fold_key(q, k_new.to(q.dtype), v_new.to(q.dtype), m_i, l_i, acc, scale_log2)
    acc = fold_scale(acc, v_scale, v_cache_ptr)

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # empty split / seq_len 0: zeros
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * stride_o_t + head[:, None] * stride_o_h + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=hd_mask)
    else:
        empty = l_i == 0.0
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        row = seq * stride_acc_t + head * stride_acc_h + split * stride_acc_s
        tl.store(acc_ptr + row[:, None] + d[None, :], o, mask=hd_mask)
        tl.store(lse_ptr + seq * stride_lse_t + head * stride_lse_h + split, lse, mask=h_ok)
        if MERGE:
            tl.debug_barrier()  # every thread's partials are stored before the program counts itself in
            counter = count_ptr + seq * stride_count + kv_head
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:  # the last one
                merge_group(acc_ptr, lse_ptr, out_ptr, seq, kv_head, d, d_ok, stride_acc_t, stride_acc_h,
                             stride_acc_s, stride_lse_t, stride_lse_h, stride_o_t, stride_o_h,
                             GROUP, NUM_SPLITS, SPLITS_PAD, MERGE_HEADS)
                tl.store(counter, 0)  # for the next launch, which starts after this one ends


@triton.jit
def merge_group(acc_ptr, lse_ptr, out_ptr, seq, kv_head, d, d_ok, stride_acc_t, stride_acc_h, stride_acc_s,
                 stride_lse_t, stride_lse_h, stride_o_t, stride_o_h, GROUP: tl.constexpr,
                 NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, MERGE_HEADS: tl.constexpr):
    """The reduce kernel's work for the GROUP heads of one (sequence, KV head), MERGE_HEADS at a
    time; partials written by other programs of this launch are loaded from L2 (.cg), not L1."""
    sp = tl.arange(0, SPLITS_PAD)
    for c in tl.static_range(0, GROUP, MERGE_HEADS):
        hh = c + tl.arange(0, MERGE_HEADS)
        head = kv_head * GROUP + hh  # [MH]
        ok = hh < GROUP
        lse = tl.load(lse_ptr + seq * stride_lse_t + head[:, None] * stride_lse_h + sp[None, :],
                      mask=ok[:, None] & (sp < NUM_SPLITS)[None, :], other=float("-inf"),
                      cache_modifier=".cg")  # [MH, SPLITS_PAD]
        part = tl.load(acc_ptr + seq * stride_acc_t + head[:, None, None] * stride_acc_h
                       + sp[None, :, None] * stride_acc_s + d[None, None, :],
                       mask=ok[:, None, None] & (sp < NUM_SPLITS)[None, :, None] & d_ok[None, None, :],
                       other=0.0, cache_modifier=".cg")  # [MH, SPLITS_PAD, D_PAD]
        tl.store(out_ptr + seq * stride_o_t + head[:, None] * stride_o_h + d[None, :],
                 merge_splits(lse, part).to(out_ptr.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_reduce_kernel(
    acc_ptr, lse_ptr, out_ptr,  # scratch as above; out [B, Hq, D]
    stride_acc_t, stride_acc_h, stride_acc_s, stride_lse_t, stride_lse_h, stride_o_t, stride_o_h,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    lse = tl.load(lse_ptr + seq * stride_lse_t + head * stride_lse_h + s, mask=s_ok,
                  other=float("-inf"))  # [SPLITS_PAD]
    part = tl.load(acc_ptr + seq * stride_acc_t + head * stride_acc_h
                   + s[:, None] * stride_acc_s + d[None, :],
                   mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # [SPLITS_PAD, D_PAD]
    tl.store(out_ptr + seq * stride_o_t + head * stride_o_h + d, merge_splits(lse, part).to(out_ptr.dtype.element_ty),
             mask=d_ok)


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
           seq_lens: torch.Tensor, block_tables: torch.Tensor, num_splits: int,
           scratch: DecodeScratch | None, order: torch.Tensor | None = None) -> None:
    num_seqs = q.shape[0]
    if tuple(seq_lens.shape) != (num_seqs,):
        raise ValueError(f"seq_lens must be [{num_seqs}] (one query per sequence); got {tuple(seq_lens.shape)}")
    if order is not None and (tuple(order.shape) != (num_seqs,) or order.dtype != torch.int32
                              or order.device != q.device):
        raise ValueError(f"order must be int32 [{num_seqs}] on {q.device} (a permutation of the rows); got "
                         f"{order.dtype} {tuple(order.shape)} on {order.device}")
    check_attention_args(q, k_cache, v_cache, out, seq_lens, block_tables, rows="num_seqs")
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits {num_splits} must be in [1, {MAX_SPLITS}]")
    if scratch is not None and num_splits > 1:
        want = (q.shape[1], q.shape[2])
        got = (scratch.acc.shape[1], scratch.acc.shape[3])
        if scratch.max_seqs < num_seqs or scratch.max_splits < num_splits or got != want \
                or scratch.acc.device != q.device:
            raise ValueError(f"scratch (max_seqs {scratch.max_seqs}, max_splits "
                             f"{scratch.max_splits}, heads/dim {got}, {scratch.acc.device}) is too "
                             f"small for {num_seqs} seqs x {num_splits} splits, heads/dim {want}")


def _check_rotary(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rotary: RotaryIn,
                  new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
    num_seqs, _, dim = q.shape
    if new_kv is None:
        raise ValueError("decode_attention with rotary needs new_kv = (k, v, slot_mapping): this step's raw K and V")
    check_store_args(*new_kv[:2], k_cache, v_cache, new_kv[2])
    if new_kv[0].shape[0] != num_seqs or dim < 16 or dim & (dim - 1):
        raise ValueError(f"decode_attention with rotary needs k [{num_seqs}, Hkv, D] and a power-of-two head "
                         f"dim >= 16; got k {tuple(new_kv[0].shape)}")
    tables_ok = all(t.dtype == torch.float32 and t.dim() == 2 and t.shape[1] == dim and t.stride(1) == 1
                    for t in (rotary.cos, rotary.sin)) and rotary.cos.stride() == rotary.sin.stride()
    weights = (rotary.q_weight, rotary.k_weight)
    norms_ok = all(w is None for w in weights) or all(w is not None and w.shape == (dim,) for w in weights)
    if not tables_ok or not norms_ok or rotary.positions.shape != (num_seqs,):
        raise ValueError(f"rotary needs fp32 cos/sin [max_pos, {dim}] with equal strides, both norm weights "
                         f"[{dim}] or neither, and positions [{num_seqs}]")


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D], one query token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    out: torch.Tensor,  # [B, Hq, D], written in place
    seq_lens: torch.Tensor,  # [B] int32, context incl. this token; 0 = padded lane
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    num_splits: int,
    scratch: DecodeScratch | None = None,
    check: bool = True,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    rotary: RotaryIn | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    merge: bool = False,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    order: torch.Tensor | None = None,
    max_registers: int | None = None,
) -> torch.Tensor:
    """Paged decode attention; returns out. Pass a preallocated scratch when num_splits > 1
    inside a CUDA graph (without one, it is allocated here, which is not capture-safe).
    `rotary`, with new_kv = (k, v, slot_mapping) ([B, Hkv, D] twice, [B] int64): q and k are the
    qkv projection's raw outputs; the kernel normalizes and rotates them (as qk_norm_rope) and
    stores K and V into the caches at the slots (-1: not stored) before attending. `merge`: the
    split kernel merges its splits itself (no reduce kernel; the scratch's counters). An fp8 cache
    is read as stored * k_scale / v_scale (and `rotary` stores k / k_scale, v / v_scale).
    `order` [B] int32, a permutation of the rows: the order in which sequences' programs launch
    (longest first pays with one split; see the module docstring). `max_registers`: a cap on
    registers a thread (maxnreg; default DECODE_MAXNREG_FP8 on fp8 caches, else none)."""
    if check:
        _check(q, k_cache, v_cache, out, seq_lens, block_tables, num_splits, scratch, order)
        if rotary is not None:
            _check_rotary(q, k_cache, v_cache, rotary, new_kv)
    num_seqs, num_heads, head_dim = q.shape
    if num_seqs == 0:
        return out
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    d_pad = max(16, triton.next_power_of_2(head_dim))
    default = default_tile(k_cache.element_size(), d_pad, num_stages, num_seqs * num_kv_heads)
    if max_registers is None and k_cache.element_size() == 1:
        max_registers = DECODE_MAXNREG_FP8
    block_n, num_warps, num_stages = block_n or default[0], num_warps or default[1], num_stages or default[2]
    if num_splits > 1 and scratch is None:
        scratch = alloc_decode_scratch(num_seqs, num_heads, head_dim, q.device, num_splits)
    # With one split the scratch is never touched; out stands in for its pointers.
    acc, lse = (scratch.acc, scratch.lse) if num_splits > 1 else (out, out)
    merge = merge and num_splits > 1
    splits_pad = triton.next_power_of_2(num_splits)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, acc, lse, seq_lens, block_tables,
        scale * LOG2E, k_scale, v_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), acc.stride(0), acc.stride(1), acc.stride(2),
        lse.stride(0), lse.stride(1),
        **_rotary_args(q, rotary, new_kv),
        count_ptr=scratch.count if merge else q, stride_count=scratch.count.stride(0) if merge else 0,
        order_ptr=order if order is not None else seq_lens,
        BLOCK_SIZE=k_cache.shape[1], GROUP=group, HEAD_DIM=head_dim, D_PAD=d_pad,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        MERGE=merge, SPLITS_PAD=splits_pad if merge else 1,
        MERGE_HEADS=min(triton.next_power_of_2(group), max(1, MERGE_TILE // (splits_pad * d_pad))) if merge else 1,
        ORDERED=order is not None,
        num_warps=num_warps, num_stages=num_stages, **({"maxnreg": max_registers} if max_registers else {}),
    )
    if num_splits > 1 and not merge:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            acc, lse, out, acc.stride(0), acc.stride(1), acc.stride(2),
            lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, D_PAD=d_pad, NUM_SPLITS=num_splits,
            SPLITS_PAD=splits_pad, num_warps=4,
        )
    return out


def default_tile(element_size: int, d_pad: int, num_stages: int | None = None,
                 pairs: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for a cache of this element size and padded head dim, and a
    step of `pairs` (sequence, KV head) pairs: DECODE_TILE (DECODE_TILE_MID within MID_BATCH_PAIRS
    on a 2-byte cache, DECODE_TILE_FP8 on a 1-byte one), BLOCK_N shrunk to TILE_SMEM_BYTES' rule."""
    if element_size == 1:
        tile = DECODE_TILE_FP8
    elif element_size == 2 and pairs is not None and MID_BATCH_PAIRS[0] <= pairs <= MID_BATCH_PAIRS[1]:
        tile = DECODE_TILE_MID
    else:
        tile = DECODE_TILE
    stages = num_stages or tile[2]
    per_key = min(stages, 2) * 2 * d_pad * max(element_size, 2)  # K + V rows
    return max(16, min(tile[0], triton.next_power_of_2(TILE_SMEM_BYTES // per_key + 1) // 2)), tile[1], stages


def _rotary_args(q: torch.Tensor, rotary: RotaryIn | None,
                 new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> dict:
    """The split kernel's ROTARY arguments (q stands in for the pointers it does not read)."""
    if rotary is None:
        return dict(new_k_ptr=q, new_v_ptr=q, slot_ptr=q, pos_ptr=q, cos_ptr=q, sin_ptr=q, qw_ptr=q, kw_ptr=q,
                    eps=0.0, stride_nk_t=0, stride_nk_h=0, stride_nv_t=0, stride_nv_h=0, stride_cos=0,
                    ROTARY=False, QK_NORM=False)
    k, v, slots = new_kv
    norm = rotary.q_weight is not None
    return dict(new_k_ptr=k, new_v_ptr=v, slot_ptr=slots, pos_ptr=rotary.positions, cos_ptr=rotary.cos,
                sin_ptr=rotary.sin, qw_ptr=rotary.q_weight if norm else q, kw_ptr=rotary.k_weight if norm else q,
                eps=rotary.eps, stride_nk_t=k.stride(0), stride_nk_h=k.stride(1), stride_nv_t=v.stride(0),
                stride_nv_h=v.stride(1), stride_cos=rotary.cos.stride(0), ROTARY=True, QK_NORM=norm)
