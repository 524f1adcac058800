"""The persistent decode kernel (engine/kernels/persistent_decode.py: every decoder layer of a
batch-1 decode step in one launch) against the model's usual path, float32 on the CPU
interpreter, where the host launches one kernel per step instead of the grid barriers; the GPU
engine tests run it with barriers (tests/engine/test_gpu_engine.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.kernels.persistent_decode import (
    MAX_BLOCK,
    MIN_ROWS,
    DecodeShape,
    PersistentPlan,
    alloc_scratch,
    choose_plan,
)
from harness.kernels.profile_persistent import main as profile_main
from harness.kernels.profile_persistent import parse_plan, step_breakdown

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# a plan that gives every step several items a program, uneven (3 programs), splits both o and
# down, and attention tiles shorter than a split (4 splits of 16-key tiles over 40 keys)
SMALL = PersistentPlan(programs=3, block_k=32, qkv_block=16, splits=4, block_n=16, o_block=16, o_split=2,
                       gate_block=16, down_block=16, down_split=2, num_warps=4)
# items of feature counts that are no power of two (tiles of 16 and 32, rows masked), the last
# item of each projection short; and no key tile loaded before the attention's barrier
ODD = replace(SMALL, qkv_block=11, o_block=7, gate_block=19, down_block=13, attention_prefetch=0)
# o inside the attention step: each attention item's slice of o's features for its head group
FUSED_O = replace(SMALL, fused_o=1)
# one split a KV head walking all three 16-key tiles: the first loaded before the barrier, the
# second before q's chain, the third in the loop
EARLY = replace(SMALL, splits=1, attention_prefetch=2)
PLANS = {"small": SMALL, "odd": ODD, "fused_o": FUSED_O, "early": EARLY}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _decode_step(checkpoint_dir: str, context: int | list[int], rows: int | None = None):
    """A runner whose cache holds a prefill of `context` tokens (or of each of several
    sequences) and the inputs of the next decode step (a token a sequence, padded to `rows`);
    then random norm weights and biases (HF starts them at 1 and 0, which would hide a wrong
    one; both paths read the same cache)."""
    from engine.config import EngineConfig
    from harness.kernels.profile_persistent import decode_step

    config = EngineConfig(model=checkpoint_dir, device="cpu", dtype="float32", attention_backend="triton",
                          block_size=4, max_model_len=256, num_kv_blocks=32, max_num_seqs=4,
                          max_num_batched_tokens=64, persistent_decode=True)
    runner, inputs = decode_step(config, context if isinstance(context, list) else [context], rows)
    gen = torch.Generator().manual_seed(1)
    for name, param in runner.model.named_parameters():
        if "norm" in name or "bias" in name:
            param.data.copy_(torch.rand(param.shape, generator=gen) + 0.5)
    return runner, inputs


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU engine tests run the kernel with its barriers")
@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])  # q/k norm; q/k/v bias; neither
@pytest.mark.parametrize("plan", ["chosen", "small", "odd", "fused_o", "early"])
def test_persistent_decode_matches_the_usual_path(checkpoint_dirs, arch, plan):
    """float32, one sequence with 40 cached tokens: the kernel's hidden state (through the last
    norm), greedy pick and cache contents (this step's K and V at its slot) equal the layers' own
    forward; `chosen`: choose_plan's split for 4 programs; the others: the plans above."""
    runner, (ids, positions, caches, meta, backend) = _decode_step(checkpoint_dirs[arch], 40)
    model = runner.model.model
    with torch.inference_mode():
        before = runner.kv_cache.clone()
        want = runner.model(ids, positions, caches, meta, backend)  # on the CPU: the usual path
        want_cache = runner.kv_cache.clone()
        runner.kv_cache.copy_(before)
        model.forward_persistent(model.embed_tokens(ids), positions, caches, meta, programs=4)  # builds the state
        if plan in PLANS:
            state = model._persistent[1]
            model._persistent[1] = replace(state, plan=PLANS[plan],
                                        scratch=alloc_scratch(state.shape, PLANS[plan], torch.float32, "cpu"))
        runner.kv_cache.copy_(before)
        parts, residual = model.forward_persistent(model.embed_tokens(ids), positions, caches, meta)
        got = model.norm(parts, residual)[0]
        logits = [runner.model.compute_logits(h) for h in (want, got)]
    assert parts.shape[0] == model._persistent[1].plan.down_split
    assert rel(got, want) < 1e-5
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
    torch.testing.assert_close(runner.kv_cache, want_cache)
    changed = (runner.kv_cache != before).flatten(3).any(-1)  # [2, layers, blocks, block_size]
    assert changed.sum() == 2 * 2  # K and V of each layer, one slot
    assert torch.equal(changed, (want_cache != before).flatten(3).any(-1))


# several sequences: 3 programs, 2 splits a (sequence, KV head), o and down split in two
SEQS4 = replace(SMALL, seqs=4, splits=2)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU engine tests run the kernel with its barriers")
@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
@pytest.mark.parametrize("plan", ["chosen", "seqs4"])
def test_persistent_decode_of_several_sequences_matches_the_usual_path(checkpoint_dirs, arch, plan):
    """float32, three sequences of 40, 17 and 33 cached tokens in a step padded to 4 rows (the
    fourth: length 0, slot -1): each real row's hidden state through the last norm and greedy
    pick, and the cache (each sequence's new K and V at its slot, nothing for the padding row),
    equal the layers' own forward; `chosen`: choose_plan's for 4 programs and 4 sequences."""
    runner, (ids, positions, caches, meta, backend) = _decode_step(checkpoint_dirs[arch], [40, 17, 33], rows=4)
    model = runner.model.model
    with torch.inference_mode():
        before = runner.kv_cache.clone()
        want = runner.model(ids, positions, caches, meta, backend)[:3]
        want_cache = runner.kv_cache.clone()
        runner.kv_cache.copy_(before)
        model.forward_persistent(model.embed_tokens(ids), positions, caches, meta, programs=4)  # builds the state
        state = model._persistent[4]
        assert state.plan.seqs == 4 and state.plan.fused_o == 0
        if plan == "seqs4":
            model._persistent[4] = replace(state, plan=SEQS4, scratch=alloc_scratch(state.shape, SEQS4, torch.float32,
                                                                                    "cpu"))
        runner.kv_cache.copy_(before)
        parts, residual = model.forward_persistent(model.embed_tokens(ids), positions, caches, meta)
        got = model.norm(parts, residual)[0][:3]
        logits = [runner.model.compute_logits(h) for h in (want, got)]
    assert rel(got, want) < 1e-5
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
    torch.testing.assert_close(runner.kv_cache, want_cache)
    changed = (runner.kv_cache != before).flatten(3).any(-1)  # [2, layers, blocks, block_size]
    assert changed.sum() == 2 * 2 * 3  # K and V of each layer, one slot a sequence
    assert torch.equal(changed, (want_cache != before).flatten(3).any(-1))


def test_choose_plan_for_several_sequences():
    """4 and 16 sequences of qwen3-0.6b on 132 SMs: (sequence, KV head, split) items about fill
    the programs, each norm's input has at most 2 partials, 128-wide K steps, o in its own step."""
    for seqs, splits in ((4, 4), (16, 1)):
        plan = choose_plan(QWEN3_06B, 132, seqs)
        assert (plan.seqs, plan.splits, plan.block_k, plan.fused_o) == (seqs, splits, 128, 0)
        assert plan.o_split <= 2 and plan.down_split <= 2
    with pytest.raises(ValueError, match="1-16 sequences"):
        choose_plan(QWEN3_06B, 132, 0)


QWEN3_06B = DecodeShape(hidden=1024, intermediate=3072, num_heads=16, num_kv_heads=8, head_dim=128, num_layers=28,
                        eps=1e-6, qk_norm=True, bias=False)
LLAMA3_8B = DecodeShape(hidden=4096, intermediate=14336, num_heads=32, num_kv_heads=8, head_dim=128, num_layers=32,
                        eps=1e-5, qk_norm=False, bias=False)


@pytest.mark.parametrize("shape", [QWEN3_06B, LLAMA3_8B], ids=["qwen3-0.6b", "llama-3-8b"])
def test_choose_plan_spreads_each_step_over_the_programs(shape):
    """On 132 SMs: every projection's items cover its features with at most MAX_BLOCK rows each,
    at least MIN_ROWS unless the rows were too few, and fill their rounds (at least 90% of the
    programs busy in each) where items are above MIN_ROWS; o's K is split by whole heads; the
    attention has about as many items as programs."""
    plan = choose_plan(shape, 132)
    steps = {  # name: (features, rows an item, K ranges)
        "qkv": (shape.qkv_size, plan.qkv_block, 1),
        "o": (shape.hidden, plan.o_block, plan.o_split),
        "gate_up": (shape.intermediate, plan.gate_block, 1),
        "down": (shape.hidden, plan.down_block, plan.down_split),
    }
    for name, (n, rows, split) in steps.items():
        assert MIN_ROWS <= rows <= MAX_BLOCK, (name, rows)
        items = -(-n // rows) * split
        rounds = -(-items // 132)
        assert rows == MIN_ROWS or items >= 0.9 * rounds * 132, (name, rows, items)
    assert shape.num_heads % plan.o_split == 0
    assert 96 <= shape.num_kv_heads * plan.splits <= 132
    assert plan.block_k & (plan.block_k - 1) == 0 and plan.splits & (plan.splits - 1) == 0


def test_choose_plan_sizes_items_to_fill_the_programs():
    """llama-3-8b's qkv (6,144 features) on 132 programs: one round of 47-feature items (131
    busy programs), not 96 items of 64; gate_up: two rounds of 55; o and down split K in two
    so one round of 63-feature items fills the programs; qwen3-0.6b keeps blocks of 32. llama's
    qkv, o and down loops (16, 8 and 28 K steps) pipeline 4 deep, qwen's (2-4 steps) and every
    gate_up 3; o runs in the attention step for qwen (16K-element slices), not llama (128K)."""
    llama = choose_plan(LLAMA3_8B, 132)
    assert (llama.qkv_block, llama.gate_block) == (47, 55)
    assert (llama.o_block, llama.o_split, llama.down_block, llama.down_split) == (63, 2, 63, 2)
    qwen = choose_plan(QWEN3_06B, 132)
    assert (qwen.qkv_block, qwen.o_block, qwen.gate_block, qwen.down_block) == (32, 32, 32, 32)
    assert (qwen.o_split, qwen.down_split) == (4, 4)
    stages = lambda p: (p.qkv_stages, p.o_stages, p.gate_stages, p.down_stages)  # noqa: E731
    assert stages(llama) == (4, 4, 3, 4) and stages(qwen) == (3, 3, 3, 3)
    assert (llama.fused_o, qwen.fused_o) == (0, 1)
    # fused_o needs an attention item a program: 8 KV heads x 16 splits do not fit 100
    assert choose_plan(QWEN3_06B, 100).fused_o == 0


def test_persistent_decode_refuses_what_it_cannot_run(checkpoint_dirs):
    """Two hidden states for a step of one sequence, an fp16 hidden state for an fp32 model and
    more sequences than a tile's 16 rows are errors that say what the kernel takes."""
    runner, (ids, positions, caches, meta, backend) = _decode_step(checkpoint_dirs["qwen3"], 9)
    model = runner.model.model
    with torch.inference_mode():
        h = model.embed_tokens(ids)
        with pytest.raises(ValueError, match=r"2 hidden states for a step of \[\(1,\), \(1,\), \(1,\), \(1, \d+\)\]"):
            model.forward_persistent(torch.cat([h, h]), positions, caches, meta, programs=2)
        with pytest.raises(ValueError, match=r"a token's hidden state a sequence, \[1, 64\]"):
            model.forward_persistent(h.half(), positions, caches, meta, programs=2)
        with pytest.raises(ValueError, match="takes 1-16 sequences a step, got 17"):
            model.forward_persistent(h.expand(17, -1), positions, caches, meta, programs=2)


def test_step_breakdown_reads_work_and_barrier_per_step_kind():
    """profile-persistent's reading of the kernel's clock: 2 programs, 2 layers (10 steps), every
    step's work 3 us for the slower program (qkv 5 us) and every barrier 1 us after the last
    arrival; the first and last steps are left out."""
    steps, times = 10, torch.zeros(2, 10, 2, dtype=torch.int64)
    now = 0
    for s in range(steps):
        work = 5000 if s % 5 == 0 else 3000
        times[0, s, 0], times[1, s, 0] = now + work - 500, now + work  # program 1 arrives last
        times[:, s, 1] = now + work + 1000  # both leave 1 us later
        now += work + 1000
    got = {name: (work, barrier) for name, work, barrier in step_breakdown(times)}
    assert got == {"qkv": (5.0, 1.0), "attention": (3.0, 1.0), "o": (3.0, 1.0), "gate_up": (3.0, 1.0),
                   "down": (3.0, 1.0)}


def test_profile_plan_variants_and_errors():
    """--plan FIELD=INT replaces plan fields; an unknown field, a non-integer, a size < 1 or a
    negative flag is an error naming the fields; without a GPU the tool says it needs one."""
    assert parse_plan(SMALL, ["num_warps=8", "qkv_stages=4"]) == replace(SMALL, num_warps=8, qkv_stages=4)
    assert parse_plan(SMALL, ["attention_prefetch=0"]) == replace(SMALL, attention_prefetch=0)
    for bad in ("warps=8", "qkv_stages=x", "qkv_stages=0", "qkv_stages", "attention_prefetch=-1"):
        with pytest.raises(ValueError, match="FIELD=INT"):
            parse_plan(SMALL, [bad])
    if DEVICE == "cpu":
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            profile_main([])
