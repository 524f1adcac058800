"""Every decoder layer of a batch-1 decode step in one persistent kernel (EngineConfig.persistent_decode,
on by default up to a context limit: on an H200 batch-1 TPOT is 5-8% shorter than the fused
path's at 640 cached tokens; reports/PERF.md rows 52-57). Steps of 2-16 sequences can take it too
(persistent_decode_max_seqs, off by default, untimed: row 59): the dots' 16 rows, padding at
batch 1, carry the sequences.

Why it was built: a batch-1 step of Qwen3-0.6B on the fused small-batch path is ~145 kernels
(five a layer) of 4-9 us each, 0.90 ms of GPU time against a 0.30 ms weight-read floor, and with
every weight in L2 the chain still takes 75% of that time (PERF rows 47, 51): launch, ramp and
drain, not bytes. Here one launch of one program per SM walks all layers, and where the chain
had a kernel boundary it has a grid barrier (an atomic counter a step, release/acquire at GPU
scope). Measured: a barrier costs ~0.75 us, so the boundaries were not the problem; each step's
work (4-8 us for 4-13 MB of weights, or for the attention's chain of dependent loads) is, as it
was in the separate kernels. The per-step profile (`times=`) is what a next attempt starts from.
What did not shorten the steps (row 53): loading a program's next weight tile into registers
before the barrier, L2 prefetches of its next weights there (its own poll then waits behind
them), TMA descriptors for the weight tiles, two programs an SM. A step costs ~2 us plus its
bytes at ~4 TB/s.

A layer is five steps, each spread over the programs as items:
  0. r = residual + sum(down partials); qkv = RMSNorm(r) Wqkv^T (+ bias), in the dtype
  1. attention: (KV head, split) items, as decode_attention's ROTARY and MERGE programs: q/k
     RMSNorm and rotary, this step's K/V stored by the item whose split holds the last cached
     tile, fp32 partials per (q head, split); the last item of a KV head merges its heads. A
     program's first key tile is loaded before the step's barrier (cached keys need nothing of
     the step before)
  2. o: (feature block, head range) items, fp32 partials (K split by heads); or, with fused_o
     (small models), inside step 1: each attention item its head group's slice of o (_o_slices)
  3. r += sum(o partials); act = SiLU(RMSNorm(r) Wg^T) * (RMSNorm(r) Wu^T), in the dtype
  4. down: (feature block, K range) items, fp32 partials for the next layer's step 0
Projections run on tensor cores with the one row padded to 16: the dot is what makes Triton
pipeline the weight loads through shared memory (a plan's stages deep), where register tiles kept too
few bytes in flight (the kernel 1.16-1.23x slower at 8 warps). Norms are one-pass, as the skinny GEMM's: (r * g) W^T
and r's squares summed over the K loop, scaled by 1/RMS after it. Every item recomputes r from
L2, so only the residual's new value needs a writer (item 0, into the other of two buffers:
nobody reads what is being written). The model's last norm adds the last partials
(engine.kernels.skinny_gemm.partials_rmsnorm).

On the CPU (the Triton interpreter runs programs one after another, so a program waiting at a
barrier would wait forever) the host launches one kernel a step instead: the same code, with
kernel boundaries for barriers. Weights are found through tables of per-layer addresses, so
the model's parameters stay where they are. KV caches: the runner's layers are views of one
tensor, a fixed stride apart.

Co-residency: a grid barrier needs every program resident at once, so the grid is at most one
program per SM, launched after the step's previous kernel has finished (no PDL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer

from engine.kernels.decode_attention import (
    attend_tile,
    attend_tiles,
    fold_key,
    load_kv_tile,
    merge_group,
    store_new_kv,
)
from engine.kernels.rope import norm_rope

STEPS_PER_LAYER = 5
MAX_SEQS = 16  # sequences a step: the rows of a dot's 16-row tile
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeShape:
    """The model's sizes as the kernel needs them."""

    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    eps: float
    qk_norm: bool
    bias: bool

    @property
    def qkv_size(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim


# The work split's knobs, read by choose_plan at engine start (so `--ab` can vary them): the
# most and fewest weight rows (features) an item takes (fewer than MIN_ROWS keep too few bytes
# in flight for a program to stream at its share of the bandwidth); what one more round of
# items a program costs, in weight elements (a round starts a new chain of dependent loads:
# blocks of 32 in one round beat 16 in two); the attention splits a KV head (a power of two)
# and keys a tile; warps a program. On an H200 (qwen3-0.6b, PERF rows 52-53) 4 warps and 3
# stages were fastest: 785-812 us for the 28 layers against 863-909 at 4 stages, 1,034-1,038 at
# 8 warps, 926 at 2; 128- and 512-wide K steps, 16-feature blocks and 8 splits were slower.
MAX_BLOCK = 64
MIN_ROWS = 32
ROUND_COST = 8192
ATTENTION_SPLITS = 16
ATTENTION_BLOCK_N = 64
NUM_WARPS = 4
# Triton pipeline stages of a projection's weight loads (stages - 1 tiles in flight a program):
# STAGES, or LONG_STAGES for qkv, o and down where an item's K loop has at least LONG_LOOP steps
# (a short loop drains before a deeper pipeline fills). gate_up keeps STAGES: its two tiles a
# step at 4 stages took 59.25 -> 61.4 us a layer on llama-3-8b (row 55). On an H200 (row 57)
# llama-3-8b's qkv, o and down (16, 8 and 28 steps) at 4 stages: 4,083 us vs 4,123 at 3;
# qwen3-0.6b's (2-4 steps) at 4 lost (qkv alone 838 vs 761 us)
STAGES = 3
LONG_STAGES = 4
LONG_LOOP = 8
# An attention item's loop over its key tiles: 1, one tile at a time, is fastest at 640 cached
# tokens (785 us vs 810 at 3); 3 at 4,096 (1,045 vs 1,070, row 53)
ATTENTION_STAGES = 1
# 1: the first key tile before the attention step's barrier (llama-3-8b 4,074 vs 4,101 us
# without, row 55); 2 (its second tile before q's chain too) lost on qwen3-0.6b at 640 and 2,048
# cached tokens (821 vs 785, 882 vs 875 us, row 57)
ATTENTION_PREFETCH = 1
# o runs inside the attention step (fused_o: each attention item on its head group once that group
# is merged, no grid barrier between) where an item's slice of o has at most this many weight
# elements (0: never). Row 57: qwen3-0.6b (16K-element slices) 761 vs 785 us; llama-3-8b (128K,
# four 64-row pipelines after the wait) 4,261 vs 4,117
FUSED_O_MAX_SLICE = 32768
# 1: launched cooperatively (PersistentPlan.cooperative): no cost on an H200 (781 vs 785 us, row
# 57), but off: a grid the driver cannot make resident fails either way, at launch with it, and
# the default launch keeps working where the cooperative attribute is unsupported
COOPERATIVE = 0


@dataclass(frozen=True)
class PersistentPlan:
    """How each step's work is cut into items (see choose_plan)."""

    programs: int
    block_k: int  # K elements a GEMV loop step
    # features (weight rows) an item of each projection: any count, the tile is the next power of two
    qkv_block: int
    splits: int  # attention splits a KV head
    block_n: int  # keys an attention tile
    o_block: int
    o_split: int  # o's K (the heads) cut in this many ranges
    gate_block: int  # gate (and as many up) features an item
    down_block: int
    down_split: int  # down's K cut in this many ranges
    num_warps: int = 4
    qkv_stages: int = 3  # the weight loads' pipeline depth, each projection
    o_stages: int = 3
    gate_stages: int = 3
    down_stages: int = 3
    attention_stages: int = 1
    # key tiles of a program's first attention item loaded early: 1, the first, before the step's
    # barrier (_first_tile); 2, also the second, before q's chain
    attention_prefetch: int = 1
    fused_o: int = 0  # 1: o in the attention step (_o_slices)
    # 1: a cooperative launch (GPU), which fails with an error where the driver cannot make every
    # program resident at once, rather than leaving the grid barrier to wait forever
    cooperative: int = 0
    seqs: int = 1  # sequences in the step (1-16: the rows of the padded 16-row tiles)


@dataclass(frozen=True)
class LayerTables:
    """Per-layer addresses (int64 [num_layers] each, on the device): the weights of qkv [N, H],
    o [H, Hq D], gate_up [2 I, H] and down [H, I], the two norms' weights, the qkv bias and the
    q/k norm weights (None: the model has none)."""

    qkv: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


@dataclass
class PersistentScratch:
    residual: torch.Tensor  # [2, S, H] dtype (S: the plan's seqs): read one, write the other
    parts: torch.Tensor  # [max(o_partials, down_split), S, H] fp32
    qkv: torch.Tensor  # [S, qkv_size] dtype
    acc: torch.Tensor  # [S, Hq, splits, D] fp32
    lse: torch.Tensor  # [S, Hq, splits] fp32
    attn: torch.Tensor  # [S, Hq D] dtype: the merged attention output
    act: torch.Tensor  # [S, I] dtype
    # int32 zeros before each launch: a barrier's a step, then a (sequence, KV head)'s merge
    # counter a layer
    counters: torch.Tensor  # [num_layers * (STEPS_PER_LAYER + S Hkv)]


def _rows_and_split(n: int, k: int, splits: tuple[int, ...], programs: int) -> tuple[int, int]:
    """(features an item, K ranges) for an n x k projection that cost least: rounds of items a
    program times (an item's weight elements + ROUND_COST). Each round count's rows fill the
    programs evenly, but an item has at least MIN_ROWS (or n) and at most MAX_BLOCK; ties go to
    fewer K ranges (each is a partial its reader sums). On an H200 (PERF row 55) llama-3-8b's o
    and down in one round of 63-feature items, K split 2 ways, beat two rounds of 64 split 4 ways
    (10.5 vs 12.0 us a layer for o); its qkv in 131 items of 47 timed as 96 of 64."""
    best: tuple[int, int, int] | None = None  # (cost, split, rows)
    for split in splits:
        per = triton.cdiv(k, split)
        for rounds in range(1, triton.cdiv(n * split, programs) + 1):
            rows = min(n, max(MIN_ROWS, triton.cdiv(n * split, rounds * programs)))
            if rows > MAX_BLOCK:
                continue
            taken = triton.cdiv(triton.cdiv(n, rows) * split, programs)
            candidate = (taken * (rows * per + ROUND_COST), split, rows)
            best = candidate if best is None or candidate < best else best
    if best is None:  # programs * MAX_BLOCK rows per round cannot be too few: every round count was tried
        raise AssertionError(f"no item size for {n} x {k} on {programs} programs")
    return best[2], best[1]


def choose_plan(shape: DecodeShape, programs: int, seqs: int = 1) -> PersistentPlan:
    """Each projection's items sized for `programs` (see _rows_and_split): o's K split by whole
    heads, down's in equal ranges of whole loop steps, up to 4 ways so each norm reads few
    partials; pipeline depths by loop length (LONG_STAGES); o inside the attention step where
    its slices are small (FUSED_O_MAX_SLICE) and every attention item has a program of its own
    (an item waits for its head group's merge: two a program could wait on itself).

    `seqs` > 1 (a step of several sequences: each norm's input is a [16, K step] tile a partial,
    staged through shared memory a pipeline stage): 128-wide K steps and at most 2 partials
    each for o and down, the attention split so that (sequence, KV head, split) items about fill
    the programs, o in its own step. Untimed."""
    if not 1 <= seqs <= MAX_SEQS:
        raise ValueError(f"persistent decode takes 1-{MAX_SEQS} sequences a step, got {seqs}")
    h, inter = shape.hidden, shape.intermediate
    block_k = min(256 if seqs == 1 else 128, triton.next_power_of_2(h))
    ways = (1, 2, 4) if seqs == 1 else (1, 2)
    o_splits = tuple(s for s in ways if shape.num_heads % s == 0)
    down_splits = tuple(s for s in ways if s == 1 or inter >= s * block_k)
    qkv_rows, _ = _rows_and_split(shape.qkv_size, h, (1,), programs)
    o_rows, o_split = _rows_and_split(h, shape.num_heads * shape.head_dim, o_splits, programs)
    gate_rows, _ = _rows_and_split(inter, 2 * h, (1,), programs)  # gate and up rows
    down_rows, down_split = _rows_and_split(h, inter, down_splits, programs)
    splits = max(1, min(ATTENTION_SPLITS, triton.next_power_of_2(max(1, programs // (shape.num_kv_heads * seqs)))))

    def stages(k_range: int) -> int:  # a single-tile projection whose items walk k_range of K
        return LONG_STAGES if triton.cdiv(k_range, block_k) >= LONG_LOOP else STAGES

    o_slice = triton.cdiv(h, splits) * shape.num_heads // shape.num_kv_heads * shape.head_dim
    fused_o = int(seqs == 1 and 0 < o_slice <= FUSED_O_MAX_SLICE and shape.num_kv_heads * splits <= programs)
    return PersistentPlan(programs, block_k, qkv_rows, splits, ATTENTION_BLOCK_N, o_rows, o_split, gate_rows,
                          down_rows, down_split, NUM_WARPS, qkv_stages=stages(h),
                          o_stages=stages(shape.num_heads * shape.head_dim // o_split), gate_stages=STAGES,
                          down_stages=stages(triton.cdiv(inter, down_split)), attention_stages=ATTENTION_STAGES,
                          attention_prefetch=ATTENTION_PREFETCH, fused_o=fused_o, cooperative=COOPERATIVE,
                          seqs=seqs)


def o_partials(shape: DecodeShape, plan: PersistentPlan) -> int:
    """How many partial sums o leaves for the post-attention norm: one a K range, or with fused_o
    one a KV head."""
    return shape.num_kv_heads if plan.fused_o else plan.o_split


def alloc_scratch(shape: DecodeShape, plan: PersistentPlan, dtype: torch.dtype,
                  device: torch.device | str) -> PersistentScratch:
    f32, s = dict(dtype=torch.float32, device=device), plan.seqs
    return PersistentScratch(
        residual=torch.empty(2, s, shape.hidden, dtype=dtype, device=device),
        parts=torch.empty(max(o_partials(shape, plan), plan.down_split), s, shape.hidden, **f32),
        qkv=torch.empty(s, shape.qkv_size, dtype=dtype, device=device),
        acc=torch.empty(s, shape.num_heads, plan.splits, shape.head_dim, **f32),
        lse=torch.empty(s, shape.num_heads, plan.splits, **f32),
        attn=torch.empty(s, shape.num_heads * shape.head_dim, dtype=dtype, device=device),
        act=torch.empty(s, shape.intermediate, dtype=dtype, device=device),
        counters=torch.zeros(shape.num_layers * (STEPS_PER_LAYER + s * shape.num_kv_heads), dtype=torch.int32,
                             device=device),
    )


@triton.jit
def _arrive(counter_ptr):
    """Count this program in at a grid barrier: the CTA's stores happen before the release."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait(counter_ptr, programs):
    """Wait until every program has arrived; the acquire makes their stores visible to what
    follows."""
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while seen < programs:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _residual(res_ptr, parts_ptr, cols, mask, H: tl.constexpr, PARTS: tl.constexpr):
    """round(sum of the partials, in order) + residual at `cols`, in the residual's dtype. Loads
    bypass L1: other programs wrote these in this launch."""
    acc = tl.zeros(cols.shape, tl.float32)
    for s in tl.static_range(PARTS):
        acc += tl.load(parts_ptr + s * H + cols, mask=mask, other=0.0, cache_modifier=".cg")
    res = tl.load(res_ptr + cols, mask=mask, other=0.0, cache_modifier=".cg")
    return acc.to(res.dtype) + res


@triton.jit
def _row0(v, dtype):
    """v [K] as row 0 of a [16, K] tile of zeros in `dtype`: a one-row GEMV on tensor cores (the
    padding rows are free; what the dot buys is Triton's pipeline, which stages only the loads
    that feed a dot through shared memory, so a program keeps stages - 1 weight tiles in flight)."""
    rows = tl.arange(0, 16)
    return tl.where(rows[:, None] == 0, v[None, :], 0.0).to(dtype)


@triton.jit
def _take_row0(acc):
    """Row 0 of a [16, N] accumulator."""
    return tl.sum(tl.where(tl.arange(0, 16)[:, None] == 0, acc, 0.0), axis=0)


@triton.jit
def _weight_tile(w_ptr, n, n_ok, row_stride, k0, k_end, WIDTH: tl.constexpr):
    """W[n, k0 : k0 + WIDTH] of a row-major W, zeros outside n_ok and at or past k_end."""
    cols = k0 + tl.arange(0, WIDTH)
    return tl.load(w_ptr + n[:, None] * row_stride + cols[None, :], mask=n_ok[:, None] & (cols < k_end)[None, :],
                   other=0.0)


@triton.jit
def _item_rows(block, N, ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    """Feature block `block`'s ROWS features in a tile of BLOCK_F (>= ROWS), and their mask."""
    r = tl.arange(0, BLOCK_F)
    n = block * ROWS + r
    return n, (r < ROWS) & (n < N)


@triton.jit
def _split_item(item, N, K, ROWS: tl.constexpr, BLOCK_F: tl.constexpr, K_PER: tl.constexpr):
    """A (feature block, K range) item of a split GEMV: its features, their mask and K range."""
    n_blocks = tl.cdiv(N, ROWS)
    n, n_ok = _item_rows(item % n_blocks, N, ROWS, BLOCK_F)
    k_begin = item // n_blocks * K_PER
    return n, n_ok, k_begin, tl.minimum(k_begin + K_PER, K)


@triton.jit
def _normed_x(res_in, parts_ptr, res_out, g_ptr, cols, k_ok, item, dtype, H: tl.constexpr, PARTS: tl.constexpr):
    """A norm GEMV's input at `cols`: (r * g) as row 0 of a [16, K] tile and r's squares, with
    r = residual + partials; item 0 stores r into res_out."""
    r = _residual(res_in, parts_ptr, cols, k_ok, H, PARTS)
    tl.store(res_out + cols, r, mask=k_ok & (cols * 0 + item == 0))  # a vector mask: the interpreter rejects scalar ones
    rf = r.to(tl.float32)
    return _row0(rf * tl.load(g_ptr + cols, mask=k_ok, other=0.0).to(tl.float32), dtype), rf * rf


@triton.jit
def _seqs_x(res_in, parts_ptr, res_out, g_ptr, cols, k_ok, item, dtype, H: tl.constexpr, PARTS: tl.constexpr,
            SEQS: tl.constexpr):
    """_normed_x for SEQS > 1 sequences: r = residual + partials ([PARTS, SEQS, H], summed in
    order) as rows of a [16, K] tile (rows past SEQS zero); returns (r * g) in `dtype` and each
    row's sum of squares over `cols` [16]; item 0 stores r into res_out."""
    m = tl.arange(0, 16)
    ok = (m < SEQS)[:, None] & k_ok[None, :]
    at = m[:, None] * H + cols[None, :]
    acc = tl.zeros([16, cols.shape[0]], tl.float32)
    for s in tl.static_range(PARTS):
        acc += tl.load(parts_ptr + s * SEQS * H + at, mask=ok, other=0.0, cache_modifier=".cg")
    res = tl.load(res_in + at, mask=ok, other=0.0, cache_modifier=".cg")
    r = acc.to(res.dtype) + res
    tl.store(res_out + at, r, mask=ok & (at * 0 + item == 0))
    rf = r.to(tl.float32)
    x = rf * tl.load(g_ptr + cols, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    return x.to(dtype), tl.sum(rf * rf, axis=1)


@triton.jit
def _norm_gemv(res_in, parts_ptr, res_out, g_ptr, w_ptr, b_ptr, out_ptr, N, eps, pid, programs,
               H: tl.constexpr, PARTS: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_F: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, STAGES: tl.constexpr,
               DOT_PRECISION: tl.constexpr, SEQS: tl.constexpr = 1):
    """Steps 0 and 3: out = RMSNorm(residual + partials) W^T (+ bias) over blocks of ROWS
    features (tiles of BLOCK_F), or with GATED (W = [gate; up], N features each) SiLU(x Wg^T) * (x Wu^T); item 0
    stores the new residual into res_out. The norm in one pass, as the skinny GEMM's: (r * g) W^T
    and r's squares summed over the K loop, the sums scaled by 1/RMS after it (a first pass for
    1/RMS put two more L2 round trips before the first weight load). SEQS rows: out [SEQS, N]."""
    dtype = res_in.dtype.element_ty
    for item in range(pid, tl.cdiv(N, ROWS), programs):
        n, n_ok = _item_rows(item, N, ROWS, BLOCK_F)
        acc = tl.zeros([16, BLOCK_F], tl.float32)
        acc_up = tl.zeros([16, BLOCK_F], tl.float32)
        squares = tl.zeros([BLOCK_K if SEQS == 1 else 16], tl.float32)
        for k0 in tl.range(0, H, BLOCK_K, num_stages=STAGES):
            cols = k0 + tl.arange(0, BLOCK_K)
            k_ok = cols < H
            if SEQS == 1:
                x, sq = _normed_x(res_in, parts_ptr, res_out, g_ptr, cols, k_ok, item, dtype, H, PARTS)
            else:
                x, sq = _seqs_x(res_in, parts_ptr, res_out, g_ptr, cols, k_ok, item, dtype, H, PARTS, SEQS)
            squares += sq
            w = _weight_tile(w_ptr, n, n_ok, H, k0, H, BLOCK_K)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
            if GATED:
                up = _weight_tile(w_ptr, N + n, n_ok, H, k0, H, BLOCK_K)
                acc_up = tl.dot(x, tl.trans(up), acc_up, input_precision=DOT_PRECISION)
        if SEQS == 1:
            rstd = 1.0 / tl.sqrt(tl.sum(squares) / H + eps)
            y, y_up = _take_row0(acc) * rstd, _take_row0(acc_up) * rstd
        else:
            rstd = 1.0 / tl.sqrt(squares / H + eps)
            y, y_up = acc * rstd[:, None], acc_up * rstd[:, None]
        if HAS_BIAS:
            y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        if GATED:
            gate = y.to(dtype).to(tl.float32)
            out = (gate / (1.0 + tl.exp(-gate))).to(dtype) * y_up.to(dtype)
        else:
            out = y.to(dtype)
        _store_rows(out_ptr, n, n_ok, out, N, SEQS)


@triton.jit
def _store_rows(out_ptr, n, n_ok, out, N, SEQS: tl.constexpr):
    """out at features n of each of the SEQS rows of out_ptr [SEQS, N] (out: [BLOCK_F] for one
    sequence, else [16, BLOCK_F] with rows past SEQS dropped)."""
    if SEQS == 1:
        tl.store(out_ptr + n, out, mask=n_ok)
    else:
        m = tl.arange(0, 16)
        tl.store(out_ptr + m[:, None] * N + n[None, :], out, mask=(m < SEQS)[:, None] & n_ok[None, :])


@triton.jit
def _split_gemv(x_ptr, w_ptr, parts_ptr, pid, programs, N: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_F: tl.constexpr, SPLIT: tl.constexpr, K_PER: tl.constexpr,
                STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, SEQS: tl.constexpr = 1):
    """Steps 2 and 4 (o, down): x [SEQS, K] (other programs' output: from L2) times W [N, K]^T
    over (ROWS features, K range of K_PER) items, fp32 partials per range into parts [SPLIT,
    SEQS, N]."""
    for item in range(pid, tl.cdiv(N, ROWS) * SPLIT, programs):
        n, n_ok, k_begin, k_end = _split_item(item, N, K, ROWS, BLOCK_F, K_PER)
        _gemv_rows(x_ptr, w_ptr, parts_ptr + item // tl.cdiv(N, ROWS) * SEQS * N, n, n_ok, k_begin, k_end, K,
                   BLOCK_K, BLOCK_F, STAGES, DOT_PRECISION, N, SEQS)


@triton.jit
def _gemv_rows(x_ptr, w_ptr, out_ptr, n, n_ok, k_begin, k_end, row_stride, BLOCK_K: tl.constexpr,
               BLOCK_F: tl.constexpr, STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, N: tl.constexpr = 1,
               SEQS: tl.constexpr = 1):
    """out[n] = x[k_begin:k_end] . W[n, k_begin:k_end] in fp32, for the BLOCK_F rows n (where n_ok)
    of a row-major W; x (other programs' output) is read from L2. SEQS > 1: x [SEQS, row_stride],
    out [SEQS, N]."""
    dtype = w_ptr.dtype.element_ty
    m = tl.arange(0, 16)
    acc = tl.zeros([16, BLOCK_F], tl.float32)
    for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=STAGES):
        cols = k0 + tl.arange(0, BLOCK_K)
        if SEQS == 1:
            x = _row0(tl.load(x_ptr + cols, mask=cols < k_end, other=0.0, cache_modifier=".cg").to(tl.float32),
                      dtype)
        else:
            x = tl.load(x_ptr + m[:, None] * row_stride + cols[None, :],
                        mask=(m < SEQS)[:, None] & (cols < k_end)[None, :], other=0.0, cache_modifier=".cg").to(dtype)
        w = _weight_tile(w_ptr, n, n_ok, row_stride, k0, k_end, BLOCK_K)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    _store_rows(out_ptr, n, n_ok, _take_row0(acc) if SEQS == 1 else acc, N, SEQS)


@triton.jit
def _o_slices(attn_ptr, w_ptr, parts_ptr, count_ptr, pid, programs, N: tl.constexpr, HQ: tl.constexpr,
              HKV: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr,
              BLOCK_K: tl.constexpr, STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, WAIT: tl.constexpr):
    """fused_o: attention item (KV head g, split s) multiplies its head group's merged output by
    o's columns of those heads for o's s-th slice of ROWS features (TILE at a time), into partial
    g (parts [HKV, N]: one partial a KV head). WAIT (GPU): first until g's merge is published
    (count_ptr[g] past SPLITS, see _attention); on the CPU the merges ran in an earlier launch."""
    GROUP: tl.constexpr = HQ // HKV
    for item in range(pid, HKV * SPLITS, programs):
        kv_head, split = item // SPLITS, item % SPLITS
        if WAIT:
            _wait(count_ptr + kv_head, SPLITS + 1)
        for r0 in tl.static_range(0, ROWS, TILE):
            r = r0 + tl.arange(0, TILE)
            n = split * ROWS + r
            _gemv_rows(attn_ptr, w_ptr, parts_ptr + kv_head * N, n, (r < ROWS) & (n < N), kv_head * GROUP * D,
                       (kv_head + 1) * GROUP * D, HQ * D, BLOCK_K, TILE, STAGES, DOT_PRECISION)


@triton.jit
def _attention_item(item, seq_lens_ptr, HKV: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                    SEQS: tl.constexpr):
    """An attention item's (sequence, KV head, split, first tile, end tile, cached keys, the split
    that holds the last cached tile: it stores this step's K/V, and the sequence's length; 0: a
    padding row, nothing stored)."""
    seq = item // (HKV * SPLITS) if SEQS > 1 else 0  # one sequence: no index math for the compiler to keep
    seq_len = tl.load(seq_lens_ptr + seq)
    n_keys = tl.maximum(seq_len - 1, 0)  # the newest key is not cached yet
    n_tiles = tl.cdiv(n_keys, BLOCK_N)
    per_split = tl.cdiv(n_tiles, SPLITS)
    split = item % SPLITS
    t_begin = split * per_split
    last = (tl.maximum(n_tiles, 1) - 1) // tl.maximum(per_split, 1)
    return (seq, item // SPLITS % HKV, split, t_begin, tl.minimum(t_begin + per_split, n_tiles), n_keys, last,
            seq_len)


@triton.jit
def _first_tile(pid, seq_lens_ptr, bt_ptr, stride_bt, k_cache, v_cache, stride_kc_b, stride_kc_s, stride_kc_h,
                HKV: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, SEQS: tl.constexpr):
    """The first key tile of this program's first attention item (K^T, V; nothing loaded if the
    program has no item or the item no tile): the cached keys need nothing of the step before,
    so the program loads them before its barrier and the loads overlap the wait."""
    some = pid < SEQS * HKV * SPLITS
    seq, kv_head, split, t_begin, t_end, n_keys, last, _ = _attention_item(tl.where(some, pid, 0), seq_lens_ptr, HKV,
                                                                          SPLITS, BLOCK_N, SEQS)
    some = some & (t_begin < t_end)
    d = tl.arange(0, D)
    kt, v, _ = load_kv_tile(bt_ptr + seq * stride_bt, t_begin, tl.where(some, n_keys, 0), kv_head, k_cache, v_cache,
                            stride_kc_b, stride_kc_s, stride_kc_h, stride_kc_b, stride_kc_s, stride_kc_h, d, d < D,
                            BLOCK_N, BLOCK_SIZE)
    return kt, v


@triton.jit
def _attention(qkv_ptr, acc_ptr, lse_ptr, out_ptr, count_ptr, k_cache, v_cache, seq_lens_ptr, bt_ptr, stride_bt, pos_ptr,
               slot_ptr, cos_ptr, sin_ptr, stride_cos, qw_ptr, kw_ptr, eps, scale_log2, stride_kc_b, stride_kc_s,
               stride_kc_h, pid, programs, kt0, v0, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
               SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
               GROUP_PAD: tl.constexpr, QK_NORM: tl.constexpr, DOT_PRECISION: tl.constexpr, STAGES: tl.constexpr,
               PREFETCHED: tl.constexpr, PUBLISH: tl.constexpr, SEQS: tl.constexpr = 1):
    """Step 1: (sequence, KV head, split) items, as _decode_split_kernel's ROTARY and MERGE
    programs: fp32 partials per (sequence, q head, split) into acc / lse, and the last item of
    each (sequence, KV head) to finish merges its heads' splits into out [SEQS, Hq D] (count_ptr:
    [SEQS, HKV] zeros). PREFETCHED >= 1: kt0, v0 are the first item's first tile (_first_tile);
    2: that item's second tile is loaded before q's chain. PUBLISH: the merger then counts once
    more (release), so count_ptr[g] > SPLITS says g's output is stored (one sequence)."""
    GROUP: tl.constexpr = HQ // HKV
    QKV: tl.constexpr = (HQ + 2 * HKV) * D
    h = tl.arange(0, BLOCK_H)
    h_ok = h < GROUP
    d = tl.arange(0, D)
    d_ok = d < D
    for item in range(pid, SEQS * HKV * SPLITS, programs):
        seq, kv_head, split, t_begin, t_end, n_keys, last, seq_len = _attention_item(item, seq_lens_ptr, HKV, SPLITS,
                                                                                    BLOCK_N, SEQS)
        q_pos = tl.load(pos_ptr + seq)
        cos_row, sin_row = cos_ptr + q_pos * stride_cos, sin_ptr + q_pos * stride_cos
        row = qkv_ptr + seq * QKV
        bt_row = bt_ptr + seq * stride_bt
        head = kv_head * GROUP + h
        mine = (split == last) & (seq_len > 0)
        if PREFETCHED >= 2:  # the second tile's loads issued before q's chain (no cache store ahead of them)
            early = (item == pid) & (t_begin + 1 < t_end)
            kt1, v1, _ = load_kv_tile(bt_row, t_begin + 1, tl.where(early, n_keys, 0), kv_head, k_cache, v_cache,
                                      stride_kc_b, stride_kc_s, stride_kc_h, stride_kc_b, stride_kc_s, stride_kc_h, d,
                                      d_ok, BLOCK_N, BLOCK_SIZE)
        k_new, v_new = store_new_kv(row + (HQ + kv_head) * D, row + (HQ + HKV + kv_head) * D, slot_ptr, seq,
                                    kv_head, mine, k_cache, v_cache, kw_ptr, cos_row, sin_row, eps, 1.0, 1.0,
                                    stride_kc_b, stride_kc_s, stride_kc_h, stride_kc_b, stride_kc_s, stride_kc_h,
                                    BLOCK_SIZE, QK_NORM, D)
        q = norm_rope(row + head[:, None] * D, h_ok[:, None], qw_ptr, cos_row, sin_row, eps, QK_NORM, D)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        if PREFETCHED:
            if (item == pid) & (t_begin < t_end):
                pos_ok = t_begin * BLOCK_N + tl.arange(0, BLOCK_N) < n_keys
                m_i, l_i, acc = attend_tile(q, m_i, l_i, acc, kt0, v0, pos_ok, scale_log2, DOT_PRECISION)
                t_begin += 1
        if PREFETCHED >= 2:
            if early:
                pos_ok = t_begin * BLOCK_N + tl.arange(0, BLOCK_N) < n_keys
                m_i, l_i, acc = attend_tile(q, m_i, l_i, acc, kt1, v1, pos_ok, scale_log2, DOT_PRECISION)
                t_begin += 1
        m_i, l_i, acc = attend_tiles(q, m_i, l_i, acc, bt_ptr, seq, stride_bt, kv_head, t_begin, t_end, n_keys,
                                     k_cache, v_cache, stride_kc_b, stride_kc_s, stride_kc_h, stride_kc_b, stride_kc_s,
                                     stride_kc_h, scale_log2, d, d_ok, BLOCK_N, BLOCK_SIZE, DOT_PRECISION, STAGES)
        if mine:
            m_i, l_i, acc = fold_key(q, k_new.to(q.dtype), v_new.to(q.dtype), m_i, l_i, acc, scale_log2)
        empty = l_i == 0.0
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        o = acc / tl.where(empty, 1.0, l_i)[:, None]
        at = (seq * HQ + head) * SPLITS + split
        tl.store(acc_ptr + at[:, None] * D + d[None, :], o, mask=h_ok[:, None])
        tl.store(lse_ptr + at, lse, mask=h_ok)
        tl.debug_barrier()  # every thread's partials are stored before the program counts itself in
        if tl.atomic_add(count_ptr + seq * HKV + kv_head, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
            merge_group(acc_ptr, lse_ptr, out_ptr, seq, kv_head, d, d_ok, HQ * SPLITS * D, SPLITS * D, D, HQ * SPLITS,
                        SPLITS, HQ * D, D, GROUP, SPLITS, SPLITS, GROUP_PAD)
            if PUBLISH:
                _arrive(count_ptr + kv_head)


@triton.jit
def _layer_ptr(table, layer, like):
    """The address in table[layer] as a pointer to `like`'s element type, 16-byte aligned (torch's
    allocations are): without the hint the weight loads would not vectorize, nor pipeline."""
    return tl.multiple_of(tl.load(table + layer).to(tl.pointer_type(like.dtype.element_ty)), 16)


@triton.jit
def _barrier_before(count_ptr, step, step_begin, step_end, programs, times_ptr, pid, BARRIER: tl.constexpr,
                    TIMING: tl.constexpr):
    """The wait at the barrier after step - 1 (none before the launch's first step), and, with
    TIMING, when this program left it."""
    if BARRIER:
        if step > step_begin:
            _wait(count_ptr + step - 1, programs)
    if TIMING:
        if step > step_begin:
            tl.store(times_ptr + (pid * step_end + step - 1) * 2 + 1, globaltimer())


@triton.jit
def _persistent_decode_kernel(
    qkv_tab, o_tab, gate_up_tab, down_tab, norm1_tab, norm2_tab, bias_tab, qn_tab, kn_tab,
    res_ptr, parts_ptr, qkv_ptr, acc_ptr, lse_ptr, attn_ptr, act_ptr, count_ptr, merge_count_ptr,
    pos_ptr, slot_ptr, seq_lens_ptr, bt_ptr, stride_bt, cos_ptr, sin_ptr, stride_cos,
    k_cache, v_cache, stride_layer, stride_kc_b, stride_kc_s, stride_kc_h,
    eps, scale_log2, step_begin, step_end, times_ptr,
    H: tl.constexpr, INTER: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    QK_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, QKV_BLOCK: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_PAD: tl.constexpr, O_BLOCK: tl.constexpr, O_SPLIT: tl.constexpr, GATE_BLOCK: tl.constexpr, DOWN_BLOCK: tl.constexpr,
    DOWN_SPLIT: tl.constexpr, QKV_ROWS: tl.constexpr, O_ROWS: tl.constexpr, GATE_ROWS: tl.constexpr,
    DOWN_ROWS: tl.constexpr, QKV_STAGES: tl.constexpr, O_STAGES: tl.constexpr, GATE_STAGES: tl.constexpr,
    DOWN_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, BARRIER: tl.constexpr,
    ATTENTION_STAGES: tl.constexpr = 1, ATTENTION_PREFETCH: tl.constexpr = False, FUSED_O: tl.constexpr = False,
    O_SLICE: tl.constexpr = 1, O_TILE: tl.constexpr = 16, SEQS: tl.constexpr = 1, TIMING: tl.constexpr = False,
):
    """Each step: what needs nothing of the step before (weight addresses), the wait at the
    barrier after that step, the work, then this program counted in at the next."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    K_PER: tl.constexpr = ((INTER + DOWN_SPLIT - 1) // DOWN_SPLIT + BLOCK_K - 1) // BLOCK_K * BLOCK_K  # down's
    QKV: tl.constexpr = (HQ + 2 * HKV) * D
    for step in range(step_begin, step_end):
        layer, kind = step // 5, step % 5
        # a step's weight addresses before its barrier: none depends on the step before
        if kind == 0:  # the first layer's partials are zeros (the host's), its residual the embedding
            w = _layer_ptr(qkv_tab, layer, res_ptr)
            g, bias = _layer_ptr(norm1_tab, layer, res_ptr), _layer_ptr(bias_tab, layer, res_ptr)
            _barrier_before(count_ptr, step, step_begin, step_end, programs, times_ptr, pid, BARRIER, TIMING)
            _norm_gemv(res_ptr, parts_ptr, res_ptr + SEQS * H, g, w, bias, qkv_ptr, QKV, eps, pid, programs, H,
                       DOWN_SPLIT, BLOCK_K, QKV_ROWS, QKV_BLOCK, False, HAS_BIAS, QKV_STAGES, DOT_PRECISION, SEQS)
        elif kind == 1:
            qn, kn = _layer_ptr(qn_tab, layer, res_ptr), _layer_ptr(kn_tab, layer, res_ptr)
            # in int64: a layer's stride fits 32 bits where (layer x stride) may not (llama-3-8b with the
            # cache filling an H200: an illegal address at batch 1, row 58)
            at = tl.cast(layer, tl.int64) * stride_layer
            kc, vc = k_cache + at, v_cache + at
            if ATTENTION_PREFETCH:
                kt0, v0 = _first_tile(pid, seq_lens_ptr, bt_ptr, stride_bt, kc, vc, stride_kc_b, stride_kc_s,
                                      stride_kc_h, HKV, D, SPLITS, BLOCK_N, BLOCK_SIZE, SEQS)
            else:
                kt0, v0 = tl.zeros([D, BLOCK_N], kc.dtype.element_ty), tl.zeros([BLOCK_N, D], kc.dtype.element_ty)
            _barrier_before(count_ptr, step, step_begin, step_end, programs, times_ptr, pid, BARRIER, TIMING)
            _attention(qkv_ptr, acc_ptr, lse_ptr, attn_ptr, merge_count_ptr + layer * SEQS * HKV, kc, vc, seq_lens_ptr,
                       bt_ptr, stride_bt, pos_ptr, slot_ptr, cos_ptr, sin_ptr, stride_cos, qn, kn, eps, scale_log2,
                       stride_kc_b, stride_kc_s, stride_kc_h, pid, programs, kt0, v0, HQ, HKV, D, SPLITS, BLOCK_N,
                       BLOCK_SIZE, BLOCK_H, GROUP_PAD, QK_NORM, DOT_PRECISION, ATTENTION_STAGES, ATTENTION_PREFETCH,
                       FUSED_O and BARRIER, SEQS)
            if FUSED_O and BARRIER:  # o in the same step: each item once its head group is merged
                _o_slices(attn_ptr, _layer_ptr(o_tab, layer, res_ptr), parts_ptr, merge_count_ptr + layer * HKV, pid,
                          programs, H, HQ, HKV, D, SPLITS, O_SLICE, O_TILE, BLOCK_K, O_STAGES, DOT_PRECISION, True)
        elif kind == 2:
            w = _layer_ptr(o_tab, layer, res_ptr)
            if FUSED_O:  # done in step 1 on the GPU (no barrier between); its own launch on the CPU
                _barrier_before(count_ptr, step, step_begin, step_end, programs, times_ptr, pid, False, TIMING)
                if not BARRIER:
                    _o_slices(attn_ptr, w, parts_ptr, merge_count_ptr + layer * HKV, pid, programs, H, HQ, HKV, D,
                              SPLITS, O_SLICE, O_TILE, BLOCK_K, O_STAGES, DOT_PRECISION, False)
            else:
                _barrier_before(count_ptr, step, step_begin, step_end, programs, times_ptr, pid, BARRIER, TIMING)
                _split_gemv(attn_ptr, w, parts_ptr, pid, programs, H, HQ * D, BLOCK_K, O_ROWS, O_BLOCK, O_SPLIT,
                            HQ * D // O_SPLIT, O_STAGES, DOT_PRECISION, SEQS)
        elif kind == 3:
            w = _layer_ptr(gate_up_tab, layer, res_ptr)
            g = _layer_ptr(norm2_tab, layer, res_ptr)
            _barrier_before(count_ptr, step, step_begin, step_end, programs, times_ptr, pid, BARRIER, TIMING)
            _norm_gemv(res_ptr + SEQS * H, parts_ptr, res_ptr, g, w, res_ptr, act_ptr, INTER, eps, pid, programs, H,
                       HKV if FUSED_O else O_SPLIT, BLOCK_K, GATE_ROWS, GATE_BLOCK, True, False, GATE_STAGES,
                       DOT_PRECISION, SEQS)
        else:
            w = _layer_ptr(down_tab, layer, res_ptr)
            _barrier_before(count_ptr, step, step_begin, step_end, programs, times_ptr, pid, BARRIER, TIMING)
            _split_gemv(act_ptr, w, parts_ptr, pid, programs, H, INTER, BLOCK_K, DOWN_ROWS, DOWN_BLOCK, DOWN_SPLIT, K_PER,
                        DOWN_STAGES, DOT_PRECISION, SEQS)
        if TIMING:  # when this program's work of the step ended
            tl.store(times_ptr + (pid * step_end + step) * 2, globaltimer())
        if BARRIER:
            if step + 1 < step_end:
                if FUSED_O:  # nobody waits at the barrier after step 1
                    if kind != 1:
                        _arrive(count_ptr + step)
                else:
                    _arrive(count_ptr + step)


def supports_head_dim(head_dim: int) -> bool:
    """The kernel's q/k/v rows are tl.arange(0, head_dim): a power of two."""
    return head_dim > 0 and head_dim & (head_dim - 1) == 0


def _tile(rows: int) -> int:
    """The tile width for items of `rows` features: a power of two, at least a dot's 16."""
    return max(16, triton.next_power_of_2(rows))


def kernel_constants(shape: DecodeShape, plan: PersistentPlan, block_size: int, fp32: bool,
                     barrier: bool) -> dict[str, object]:
    """The kernel's compile-time arguments for a model, plan and KV block size (TIMING aside)."""
    group = shape.num_heads // shape.num_kv_heads
    o_slice = triton.cdiv(shape.hidden, plan.splits)  # fused_o: o features an attention item
    return dict(
        H=shape.hidden, INTER=shape.intermediate, HQ=shape.num_heads, HKV=shape.num_kv_heads, D=shape.head_dim,
        QK_NORM=shape.qk_norm, HAS_BIAS=shape.bias, BLOCK_K=plan.block_k, QKV_BLOCK=_tile(plan.qkv_block),
        SPLITS=plan.splits, BLOCK_N=plan.block_n, BLOCK_SIZE=block_size, BLOCK_H=max(16, triton.next_power_of_2(group)),
        GROUP_PAD=triton.next_power_of_2(group), O_BLOCK=_tile(plan.o_block), O_SPLIT=plan.o_split,
        GATE_BLOCK=_tile(plan.gate_block), DOWN_BLOCK=_tile(plan.down_block), DOWN_SPLIT=plan.down_split,
        QKV_ROWS=plan.qkv_block, O_ROWS=plan.o_block, GATE_ROWS=plan.gate_block, DOWN_ROWS=plan.down_block,
        QKV_STAGES=plan.qkv_stages, O_STAGES=plan.o_stages, GATE_STAGES=plan.gate_stages,
        DOWN_STAGES=plan.down_stages, DOT_PRECISION="ieee" if fp32 else "tf32", BARRIER=barrier,
        ATTENTION_STAGES=plan.attention_stages, ATTENTION_PREFETCH=plan.attention_prefetch,
        FUSED_O=bool(plan.fused_o), O_SLICE=o_slice, O_TILE=_tile(min(o_slice, MAX_BLOCK)), SEQS=plan.seqs,
    )


def _check(h: torch.Tensor, step: tuple[torch.Tensor, ...], k_cache: torch.Tensor, v_cache: torch.Tensor,
           shape: DecodeShape, plan: PersistentPlan, scratch: PersistentScratch) -> None:
    if h.shape != (plan.seqs, shape.hidden) or h.dtype != scratch.residual.dtype:
        raise ValueError(f"persistent decode takes a token's hidden state a sequence, [{plan.seqs}, {shape.hidden}] "
                         f"{scratch.residual.dtype} for this plan, got {tuple(h.shape)} {h.dtype}")
    if any(t.shape[0] != plan.seqs for t in step):
        raise ValueError(f"persistent decode: {plan.seqs} hidden states for a step of "
                         f"{[tuple(t.shape) for t in step]} positions, slots, lengths and block tables")
    if plan.fused_o and plan.seqs > 1:
        raise ValueError("fused_o runs o in the attention step of one sequence; this plan has "
                         f"{plan.seqs}")
    if (k_cache.dtype != h.dtype or k_cache.shape[2:] != (shape.num_kv_heads, shape.head_dim)
            or v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride()):
        raise ValueError(f"persistent decode needs model-dtype K and V caches [blocks, block_size, "
                         f"{shape.num_kv_heads}, {shape.head_dim}] with equal strides, got {tuple(k_cache.shape)} "
                         f"{k_cache.dtype}")
    if not supports_head_dim(shape.head_dim):
        raise ValueError(f"persistent decode needs a power-of-two head_dim, got {shape.head_dim}")
    if plan.fused_o and h.is_cuda and shape.num_kv_heads * plan.splits > plan.programs:
        # an item waits for its head group's merge: with two items a program it could wait on itself
        raise ValueError(f"fused_o needs an attention item a program: {shape.num_kv_heads} KV heads x "
                         f"{plan.splits} splits > {plan.programs} programs")


def persistent_decode(h: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                      seq_lens: torch.Tensor, block_tables: torch.Tensor, kv_caches: list[tuple[torch.Tensor, ...]],
                      cos: torch.Tensor, sin: torch.Tensor, tables: LayerTables, shape: DecodeShape,
                      plan: PersistentPlan, scratch: PersistentScratch, scale: float,
                      check: bool = True, times: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decoder layer for a decode token of each of the plan's S sequences: h [S, H] (the
    embeddings) -> (down partials [down_split, S, H] fp32, residual [S, H]) for the model's last
    norm (RMSNorm.forward with a residual sums them). The step's inputs (positions,
    slot_mapping, seq_lens [S], block_tables [S, blocks]) are the attention metadata's; a padding
    row has seq_len 0 and slot -1. kv_caches: the layers' (k, v) caches, views a fixed stride apart.
    `times` (GPU, profiling): int64 [programs, steps, 2], filled with each program's globaltimer
    (ns) when its work of a step ended and when it passed the barrier after it."""
    k0, v0 = kv_caches[0]
    if check:
        _check(h, (positions, slot_mapping, seq_lens, block_tables), k0, v0, shape, plan, scratch)
    stride_layer = kv_caches[1][0].data_ptr() - k0.data_ptr() if len(kv_caches) > 1 else 0
    stride_layer //= k0.element_size()
    scratch.residual[0].copy_(h)
    scratch.parts.zero_()  # the first layer's "down partials"
    scratch.counters.zero_()
    steps = shape.num_layers * STEPS_PER_LAYER
    launches = [(0, steps)] if h.is_cuda else [(s, s + 1) for s in range(steps)]  # see the module docstring
    constants = kernel_constants(shape, plan, k0.shape[1], h.dtype == torch.float32, h.is_cuda)
    dummy = tables.qkv
    for begin, end in launches:
        _persistent_decode_kernel[(plan.programs,)](
            tables.qkv, tables.o, tables.gate_up, tables.down, tables.input_norm, tables.post_norm,
            tables.bias if tables.bias is not None else dummy,
            tables.q_norm if tables.q_norm is not None else dummy,
            tables.k_norm if tables.k_norm is not None else dummy,
            scratch.residual, scratch.parts, scratch.qkv, scratch.acc, scratch.lse, scratch.attn, scratch.act,
            scratch.counters, scratch.counters[steps:],
            positions, slot_mapping, seq_lens, block_tables, block_tables.stride(0), cos, sin, cos.stride(0),
            k0, v0, stride_layer, k0.stride(0), k0.stride(1), k0.stride(2),
            shape.eps, scale * LOG2E, begin, end, times if times is not None else scratch.counters,
            **constants,
            TIMING=times is not None, num_warps=plan.num_warps, num_stages=1,
            **({"launch_cooperative_grid": True} if plan.cooperative and h.is_cuda else {}),
        )
    return scratch.parts[:plan.down_split], scratch.residual[0]
