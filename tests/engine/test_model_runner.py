"""ModelRunner.prepare_inputs on the CPU with the tiny preset: the step's tensors (positions,
slot mapping from the block tables, query_start_loc, seq_lens, logits_indices), padding to a
decode or prefill graph's shape, and block-table staging rows that are rewritten only where
they changed.

Expected values come from `reference_inputs`, a plain per-token loop over the scheduled
sequences (the runner computes them vectorised)."""

from __future__ import annotations

import random

import pytest
import torch

from engine.config import EngineConfig
from engine.graph_shapes import GraphShape
from engine.model_runner import ModelInputs, ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSequence, SchedulerOutput

BLOCK = 4
MAX_MODEL_LEN = 64
NUM_BLOCKS = 48
MAX_SEQS = 8


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    config = EngineConfig(model="tiny", device="cpu", block_size=BLOCK, max_model_len=MAX_MODEL_LEN,
                          num_kv_blocks=NUM_BLOCKS, max_num_seqs=MAX_SEQS, max_num_batched_tokens=64)
    r = ModelRunner(config)
    r.allocate_kv_cache(NUM_BLOCKS)
    return r


def scheduled(seq_no: int, token_ids: list[int], start_pos: int, table: list[int], sample: bool = True,
              num_preemptions: int = 0) -> ScheduledSequence:
    return ScheduledSequence(request_id=f"r{seq_no}", token_ids=token_ids, start_pos=start_pos, block_table=table,
                             sample=sample, sampling_params=SamplingParams(), num_output_tokens=0,
                             num_preemptions=num_preemptions, seq_no=seq_no)


def reference_inputs(seqs: list[ScheduledSequence]) -> dict[str, list[int]]:
    ids, positions, slots, qsl, seq_lens, logits = [], [], [], [0], [], []
    for s in seqs:
        for k, tok in enumerate(s.token_ids):
            pos = s.start_pos + k
            ids.append(tok)
            positions.append(pos)
            slots.append(s.block_table[pos // BLOCK] * BLOCK + pos % BLOCK)
        qsl.append(len(ids))
        seq_lens.append(s.start_pos + len(s.token_ids))
        if s.sample:
            logits.append(len(ids) - 1)
    return {"input_ids": ids, "positions": positions, "slot_mapping": slots, "query_start_loc": qsl,
            "seq_lens": seq_lens, "logits_indices": logits}


def as_lists(inputs: ModelInputs) -> dict[str, list[int]]:
    # on the CPU the returned tensors are views of the staging buffers: read them before the next step
    meta = inputs.meta
    return {"input_ids": inputs.input_ids.tolist(), "positions": inputs.positions.tolist(),
            "slot_mapping": meta.slot_mapping.tolist(), "query_start_loc": meta.query_start_loc.tolist(),
            "seq_lens": meta.seq_lens.tolist(), "logits_indices": inputs.logits_indices.tolist()}


def staged_row(runner: ModelRunner, row: int, n: int) -> list[int]:
    return runner.buffers.block_tables.np[row, :n].tolist()


def test_mixed_step_matches_reference(runner):
    seqs = [
        scheduled(100, [11, 12, 13, 14, 15, 16], 0, [3, 7]),  # a whole prompt, crosses a block boundary
        scheduled(101, [21], 9, [5, 2, 9]),  # a decode at position 9 (third block)
        scheduled(102, [31, 32, 33], 4, [1, 4], sample=False),  # a prefill chunk short of the prompt's end
    ]
    inputs = runner.prepare_inputs(SchedulerOutput(seqs))
    got = as_lists(inputs)
    assert got == reference_inputs(seqs)
    # spot checks against the arithmetic done by hand: slot = block * 4 + offset
    assert got["slot_mapping"][:6] == [12, 13, 14, 15, 28, 29]
    assert got["slot_mapping"][6] == 9 * BLOCK + 1
    assert inputs.sample_rows == [0, 1]
    meta = inputs.meta
    assert (meta.max_query_len, meta.max_seq_len) == (6, 10)
    assert meta.query_start_loc_cpu == [0, 6, 7, 10] and meta.seq_lens_cpu == [6, 10, 7]
    assert tuple(meta.block_tables.shape) == (3, 3)  # as wide as the longest table
    for row, s in enumerate(seqs):
        assert meta.block_tables[row, : len(s.block_table)].tolist() == s.block_table


def test_random_steps_match_reference(runner):
    rng = random.Random(0)
    seq_no = 1000
    for _ in range(25):
        seqs = []
        for _ in range(rng.randint(1, MAX_SEQS)):
            start = rng.randint(0, 40)
            n = rng.choice([1, 1, rng.randint(1, 8)])
            blocks = -(-(start + n) // BLOCK)
            table = rng.sample(range(1, NUM_BLOCKS), blocks)
            seqs.append(scheduled(seq_no, [rng.randrange(512) for _ in range(n)], start, table,
                                  sample=rng.random() < 0.8))
            seq_no += 1
        inputs = runner.prepare_inputs(SchedulerOutput(seqs))
        assert as_lists(inputs) == reference_inputs(seqs)
        assert inputs.sample_rows == [i for i, s in enumerate(seqs) if s.sample]
        assert_decode_order(inputs, seqs)


def assert_decode_order(inputs: ModelInputs, seqs: list) -> None:
    """A decode-only step carries its rows longest first (ties in row order, padding last);
    a step with a prefill chunk carries none (the unified kernel takes it)."""
    lens = inputs.meta.seq_lens.tolist()
    if any(len(s.token_ids) > 1 for s in seqs):
        assert inputs.meta.decode_order is None
    else:
        assert inputs.meta.decode_order.tolist() == sorted(range(len(lens)), key=lambda i: (-lens[i], i))


def test_decode_batch_padded_to_graph_size(runner):
    seqs = [scheduled(200 + i, [40 + i], 5 + i, [10 + i, 20 + i, 30 + i]) for i in range(3)]
    inputs = runner.prepare_inputs(SchedulerOutput(seqs), pad=GraphShape(8, 8, decode=True))
    got, want = as_lists(inputs), reference_inputs(seqs)
    assert got["input_ids"][:3] == want["input_ids"] and len(got["input_ids"]) == 8
    assert got["positions"][:3] == want["positions"] and got["positions"][3:] == [0] * 5
    assert got["slot_mapping"][:3] == want["slot_mapping"]
    assert got["slot_mapping"][3:] == [-1] * 5  # padded lanes store nothing
    assert got["seq_lens"] == want["seq_lens"] + [0] * 5  # ... and read nothing
    assert got["query_start_loc"] == [0, 1, 2, 3, 3, 3, 3, 3, 3]  # empty queries after the real rows
    assert got["logits_indices"] == [0, 1, 2]
    assert inputs.meta.decode_order.tolist() == [2, 1, 0, 3, 4, 5, 6, 7]
    meta = inputs.meta
    assert meta.seq_lens_cpu == got["seq_lens"] and meta.query_start_loc_cpu == got["query_start_loc"]
    # a padded batch reads the captured full width of the block-table buffer
    assert tuple(meta.block_tables.shape) == (8, runner.max_blocks_per_seq)
    assert meta.block_tables[:3, :3].tolist() == [s.block_table for s in seqs]


def test_padding_not_applied_when_batch_is_full(runner):
    seqs = [scheduled(300 + i, [1], 3, [i + 1]) for i in range(4)]
    inputs = runner.prepare_inputs(SchedulerOutput(seqs), pad=GraphShape(4, 4, decode=True))
    assert as_lists(inputs) == reference_inputs(seqs)
    assert tuple(inputs.meta.block_tables.shape) == (4, runner.max_blocks_per_seq)  # what the graph reads


def test_block_table_rows_rewritten_only_where_new(runner):
    runner.prepare_inputs(SchedulerOutput([scheduled(400, [1, 2, 3, 4, 5], 0, [6, 7])]))
    assert staged_row(runner, 0, 2) == [6, 7]
    # Mark an entry the runner has already written: the same sequence in the same row, with a
    # grown table, must write only its new entry and leave the marked one alone.
    runner.buffers.block_tables.np[0, 0] = 99
    runner.prepare_inputs(SchedulerOutput([scheduled(400, [9], 8, [6, 7, 8])]))
    assert staged_row(runner, 0, 3) == [99, 7, 8]

    # another sequence in that row: the whole table is written
    runner.prepare_inputs(SchedulerOutput([scheduled(401, [9], 4, [11, 12])]))
    assert staged_row(runner, 0, 2) == [11, 12]

    # a sequence moving to another row is written in full there
    runner.buffers.block_tables.np[1, :3] = 0
    seqs = [scheduled(402, [1], 0, [13]), scheduled(401, [9], 5, [11, 12])]
    inputs = runner.prepare_inputs(SchedulerOutput(seqs))
    assert staged_row(runner, 1, 2) == [11, 12]
    assert as_lists(inputs) == reference_inputs(seqs)


def test_block_table_rewritten_after_preemption(runner):
    runner.prepare_inputs(SchedulerOutput([scheduled(500, [1, 2, 3, 4, 5, 6], 0, [14, 15])]))
    runner.buffers.block_tables.np[0, 0] = 99  # what the next step must overwrite
    # Preempted (recompute) and rescheduled with new blocks: the table is not an extension of
    # the one written before, so the row is written from its start.
    seqs = [scheduled(500, [1, 2, 3, 4, 5, 6], 0, [16, 17], num_preemptions=1)]
    inputs = runner.prepare_inputs(SchedulerOutput(seqs))
    assert staged_row(runner, 0, 2) == [16, 17]
    assert as_lists(inputs)["slot_mapping"] == [64, 65, 66, 67, 68, 69]
    assert as_lists(inputs) == reference_inputs(seqs)


def _mixed_step(seq_no: int) -> SchedulerOutput:
    """A prompt crossing a block boundary, a decode, and a prefill chunk that does not sample."""
    seqs = [scheduled(seq_no, [11, 12, 13, 14, 15, 16, 17], 0, [20, 21]),
            scheduled(seq_no + 1, [21], 9, [22, 23, 24]),
            scheduled(seq_no + 2, [31, 32, 33], 4, [25, 26], sample=False)]
    return SchedulerOutput(seqs, num_prefill_tokens=10, num_decode_tokens=1)


def test_prefill_step_padded_to_graph_shape(runner):
    # a larger step first, so every padded entry below has a stale value to overwrite
    runner.prepare_inputs(SchedulerOutput([scheduled(700 + i, list(range(1, 9)), 8, [i + 1, i + 9])
                                           for i in range(MAX_SEQS)], num_prefill_tokens=64))
    out = _mixed_step(710)
    inputs = runner.prepare_inputs(out, pad=GraphShape(16, MAX_SEQS, decode=False))
    got, want = as_lists(inputs), reference_inputs(out.seqs)
    pad_tokens, pad_seqs = 16 - 11, MAX_SEQS - 3
    assert got["input_ids"] == want["input_ids"] + [0] * pad_tokens
    assert got["positions"] == want["positions"] + [0] * pad_tokens
    assert got["slot_mapping"] == want["slot_mapping"] + [-1] * pad_tokens  # padding stores nothing
    assert got["seq_lens"] == want["seq_lens"] + [0] * pad_seqs  # padded rows read nothing
    assert got["query_start_loc"] == want["query_start_loc"] + [11] * pad_seqs  # ... and own no token
    assert got["logits_indices"] == want["logits_indices"] == [6, 7]  # the rows sampled from
    # the graph's LM head reads S rows: the padded ones point at token 0
    assert runner.buffers.logits_indices.gpu[:MAX_SEQS].tolist() == [6, 7] + [0] * (MAX_SEQS - 2)
    meta = inputs.meta
    assert tuple(meta.block_tables.shape) == (MAX_SEQS, runner.max_blocks_per_seq)
    assert [meta.block_tables[i, : len(s.block_table)].tolist() for i, s in enumerate(out.seqs)] == \
        [s.block_table for s in out.seqs]


def test_graph_shaped_forward_matches_eager(runner):
    """The prefill graph's forward (padded tokens and rows, LM head on logits_indices) on the CPU
    path: the same logits for the sampled rows and the same KV as the eager step, and padding
    stores nothing."""
    out = _mixed_step(720)
    kv_before = runner.kv_cache.clone()
    with torch.inference_mode():
        inputs = runner.prepare_inputs(out)
        hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta, runner.backend)
        eager = runner.model.compute_logits(hidden[inputs.logits_indices])
        kv_eager = runner.kv_cache.clone()
        runner.kv_cache.copy_(kv_before)
        shape = GraphShape(16, MAX_SEQS, decode=False)
        inputs = runner.prepare_inputs(out, pad=shape)
        logits = runner._graph_forward(shape, inputs.meta)
    assert logits.shape[0] == MAX_SEQS
    torch.testing.assert_close(logits[:2], eager, rtol=1e-5, atol=1e-5)
    written = (kv_eager != kv_before).flatten(4).any(-1)  # [2, layers, blocks, block_size]
    assert int(written.sum()) == 2 * runner.mc.num_hidden_layers * 11  # one slot per real token
    torch.testing.assert_close(runner.kv_cache, kv_eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(runner.kv_cache[~written], kv_before[~written])  # padding wrote nowhere


def test_persistent_decode_steps_chosen_by_context():
    """persistent_decode: the metadata marks the decode steps of one sequence holding at most
    persistent_decode_max_context tokens (what the model's persistent path and the batch-1
    persistent graph take; on by default), not longer ones, batches or prefills; off, or on a
    backend without the fused decode, none."""
    def persistent(runner: ModelRunner, out: SchedulerOutput) -> bool:
        return runner.prepare_inputs(out).meta.persistent

    config = dict(model="tiny", device="cpu", block_size=BLOCK, max_model_len=MAX_MODEL_LEN, num_kv_blocks=NUM_BLOCKS,
                  max_num_seqs=MAX_SEQS, max_num_batched_tokens=64)
    on = ModelRunner(EngineConfig(**config, attention_backend="triton", persistent_decode_max_context=12))
    off = ModelRunner(EngineConfig(**config, attention_backend="triton", persistent_decode=False))
    assert ModelRunner(EngineConfig(**config, attention_backend="torch")).persistent_max_context == 0  # no fused decode
    for r in (on, off):
        r.allocate_kv_cache(NUM_BLOCKS)
    table = [10, 11, 12, 13]
    assert on.persistent_max_context == 12 and off.persistent_max_context == 0
    assert persistent(on, SchedulerOutput([scheduled(1, [5], 11, table)], 0, 1))  # 12 tokens after the step
    assert not persistent(on, SchedulerOutput([scheduled(1, [5], 12, table)], 0, 1))
    assert not persistent(on, SchedulerOutput([scheduled(1, [5], 3, table), scheduled(2, [6], 3, [20])], 0, 2))
    assert not persistent(on, SchedulerOutput([scheduled(1, [5, 6, 7], 0, table)], 3, 0))
    assert not persistent(off, SchedulerOutput([scheduled(1, [5], 3, table)], 0, 1))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="persistent_decode_max_context must be an int >= 1 or None"):
            EngineConfig(**config, persistent_decode=True, persistent_decode_max_context=bad)


def test_persistent_decode_steps_of_several_sequences():
    """persistent_decode_max_seqs 2: decode steps of up to 2 sequences whose longest holds at most
    persistent_decode_max_context tokens are marked, 3 sequences are not; the option takes 1-16
    (the kernel's MAX_SEQS: the rows of its tiles)."""
    from engine.config import PERSISTENT_MAX_SEQS
    from engine.kernels.persistent_decode import MAX_SEQS

    config = dict(model="tiny", device="cpu", block_size=BLOCK, max_model_len=MAX_MODEL_LEN, num_kv_blocks=NUM_BLOCKS,
                  max_num_seqs=MAX_SEQS, max_num_batched_tokens=64, attention_backend="triton")
    runner = ModelRunner(EngineConfig(**config, persistent_decode_max_context=12, persistent_decode_max_seqs=2))
    runner.allocate_kv_cache(NUM_BLOCKS)

    def persistent(*start_pos: int) -> bool:
        seqs = [scheduled(i + 1, [5], p, [10 + 4 * i]) for i, p in enumerate(start_pos)]
        return runner.prepare_inputs(SchedulerOutput(seqs, 0, len(seqs))).meta.persistent

    assert persistent(11) and persistent(3, 11)
    assert not persistent(3, 12) and not persistent(3, 3, 3)
    assert PERSISTENT_MAX_SEQS == MAX_SEQS
    for bad in (0, 17, True, 2.0):
        with pytest.raises(ValueError, match="persistent_decode_max_seqs must be an int in \\[1, 16\\]"):
            EngineConfig(**config, persistent_decode_max_seqs=bad)


def test_persistent_context_by_layer_size():
    """persistent_decode_max_context=None: the longer limit for models whose decoder layer holds
    at least PERSISTENT_BIG_LAYER parameters (llama-3-8b: 218M), the shorter for smaller ones
    (qwen3-0.6b: 16M); a number given is kept."""
    from engine.config import PERSISTENT_AUTO_CONTEXT, PERSISTENT_BIG_LAYER, layer_parameters

    big, small = PERSISTENT_AUTO_CONTEXT
    llama, qwen = (EngineConfig(model=m, device="cpu") for m in ("llama-3-8b", "qwen3-0.6b"))
    assert layer_parameters(llama.model_config) == 4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336
    assert layer_parameters(qwen.model_config) < PERSISTENT_BIG_LAYER <= layer_parameters(llama.model_config)
    assert (llama.resolved_persistent_context, qwen.resolved_persistent_context) == (big, small)
    assert EngineConfig(model="qwen3-0.6b", device="cpu", persistent_decode_max_context=77).resolved_persistent_context == 77
