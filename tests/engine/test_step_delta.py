"""The tensor-parallel step message (engine/step_delta.py) without processes: seeded random
scheduler runs (async and sync scheduling, chunked prefill, prefix caching, preemption, aborts,
stop-string finishes, min_tokens) go through encoder -> pickle -> decoder, and every decoded
SchedulerOutput must equal the scheduler's field by field, step by step; a sequence travels in
full only when first scheduled or resumed after preemption. Then the message at 256 running
decodes with 64-block tables, old (full pickle) against new (delta): pytest-benchmark, timed
only under `--benchmark-enable`; the asserts check what was decoded, never how long it took.
Run: pytest tests/engine/test_step_delta.py"""

from __future__ import annotations

import dataclasses
import pickle
import random

import pytest

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput, make_scheduler
from engine.sequence import FinishReason, Sequence
from engine.step_delta import CachedSeq, NewSeq, StepDecoder, StepEncoder

BS = 4
EOS = 0
SEQ_FIELDS = [f.name for f in dataclasses.fields(ScheduledSequence)]
OUT_FIELDS = [f.name for f in dataclasses.fields(SchedulerOutput) if f.name != "seqs"]


def assert_same_output(got: SchedulerOutput, want: SchedulerOutput, step: int) -> None:
    for name in OUT_FIELDS:
        assert getattr(got, name) == getattr(want, name), f"step {step}: {name}"
    assert len(got.seqs) == len(want.seqs), f"step {step}: number of sequences"
    for row, (g, w) in enumerate(zip(got.seqs, want.seqs)):
        for name in SEQ_FIELDS:
            assert getattr(g, name) == getattr(w, name), f"step {step} row {row} (seq {w.seq_no}): {name}"
    assert got == want


class Simulation:
    """A scheduler driven like LLMEngine.step (async: a step's results are applied after the
    next step is scheduled), with random arrivals, aborts, stop-string finishes and samples."""

    def __init__(self, rng: random.Random, num_blocks: int, async_scheduling: bool, **config):
        cfg = EngineConfig(model="tiny", block_size=BS, max_model_len=96, **config)
        self.sched: Scheduler = make_scheduler(cfg, BlockManager(num_blocks, BS, cfg.enable_prefix_caching), EOS)
        self.rng, self.async_scheduling = rng, async_scheduling
        self.inflight: list[SchedulerOutput] = []
        self.next_id = 0
        self.shared = [rng.randrange(1, 50) for _ in range(3 * BS)]  # prefix-cache hits

    def arrive(self) -> None:
        rng = self.rng
        prompt = (self.shared[: rng.choice([0, BS, 3 * BS])] if rng.random() < 0.5 else [])
        prompt = prompt + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 30))]
        max_tokens = rng.randrange(1, 25)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=rng.choice([0, 0, max_tokens // 2]),
                                stop_token_ids=rng.choice([[], [7], [7, 9]]), ignore_eos=rng.random() < 0.2)
        self.sched.add(Sequence(f"r{self.next_id}", prompt, params, max_model_len=96))
        self.next_id += 1

    def disturb(self) -> None:
        rng, sched = self.rng, self.sched
        if rng.random() < 0.35:
            self.arrive()
        if sched.requests and rng.random() < 0.05:
            sched.abort(rng.choice(list(sched.requests)))
        if sched.running and rng.random() < 0.03:  # a stop string seen by the detokenizer
            sched.finish_request(rng.choice(sched.running), FinishReason.STOP)

    def schedule(self) -> SchedulerOutput:
        out = self.sched.schedule()
        if not out.is_empty:
            self.inflight.append(out)
        return out

    def apply_results(self) -> None:
        keep = 1 if self.async_scheduling and self.inflight else 0
        while len(self.inflight) > keep:
            done = self.inflight.pop(0)
            self.sched.update_from_output(done, [self.rng.randrange(0, 12) if s.sample else None for s in done.seqs])


CONFIGS = {
    "sync-chunked-prefix": dict(async_scheduling=False, enable_chunked_prefill=True, enable_prefix_caching=True),
    "async-chunked-prefix": dict(async_scheduling=True, enable_chunked_prefill=True, enable_prefix_caching=True),
    "async-whole-prompts": dict(async_scheduling=True, enable_chunked_prefill=False, enable_prefix_caching=False,
                                max_num_batched_tokens=96),
    "sync-no-prefix": dict(async_scheduling=False, enable_chunked_prefill=True, enable_prefix_caching=False),
    "static": dict(async_scheduling=False, scheduling_policy="static", enable_prefix_caching=True),
}


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoded_steps_equal_the_schedulers(name, seed):
    rng = random.Random(seed)
    mode = {"max_num_batched_tokens": 24, **CONFIGS[name]}
    sim = Simulation(rng, num_blocks=24, max_num_seqs=8, **mode)
    encoder, decoder = StepEncoder(), StepDecoder()
    sent_as_new: set[tuple[int, int]] = set()
    last_table_len: dict[int, int] = {}
    counts = dict(new=0, cached=0, preempted=0, freed=0, predicted=0, bare=0, blocks_sent=0, blocks_scheduled=0)
    for step in range(600):
        sim.disturb()
        out = sim.schedule()
        delta = pickle.loads(pickle.dumps(encoder.encode(out), protocol=pickle.HIGHEST_PROTOCOL))
        assert_same_output(decoder.decode(delta), out, step)
        for seq_no in out.freed_seq_nos:
            last_table_len.pop(seq_no, None)
        for s, d in zip(out.seqs, delta.seqs):
            key = (s.seq_no, s.num_preemptions)
            # in full exactly once per (sequence, preemption): first schedule and each resume
            assert isinstance(d, NewSeq) == (key not in sent_as_new), f"step {step}: seq {s.seq_no}"
            sent_as_new.add(key)
            if isinstance(d, int):  # a one-token decode, as predicted, no new block
                assert len(s.token_ids) == 1 and len(s.block_table) == last_table_len[s.seq_no]
                counts["cached"] += 1
                counts["predicted"] += 1
                counts["bare"] += 1
            elif isinstance(d, CachedSeq):
                assert len(d.new_block_ids) == len(s.block_table) - last_table_len[s.seq_no]
                counts["cached"] += 1
                counts["predicted"] += d.fields is None
                counts["blocks_sent"] += len(d.new_block_ids)
            else:
                counts["new"] += 1
                counts["blocks_sent"] += len(d.block_table)
            last_table_len[s.seq_no] = len(s.block_table)
            counts["blocks_scheduled"] += len(s.block_table)
        counts["preempted"] += out.num_preempted
        counts["freed"] += len(out.freed_seq_nos)
        sim.apply_results()
    # the run exercised what it claims to, and the delta carried far less than the tables
    if name != "static":
        assert counts["preempted"] > 0, counts
    assert counts["cached"] > counts["new"] > 10 and counts["freed"] > 10, counts
    assert counts["predicted"] > counts["cached"] // 2, counts
    assert counts["bare"] > counts["cached"] // 3, counts
    assert counts["blocks_sent"] * 2 < counts["blocks_scheduled"], counts
    assert not set(decoder.seqs) - set(encoder.seqs) and len(decoder.seqs) == len(encoder.seqs)


def _scheduled(seq_no: int, table: list[int], start: int, preemptions: int = 0) -> ScheduledSequence:
    return ScheduledSequence(f"r{seq_no}", [0], start, table, True, SamplingParams(), 1, preemptions, [], seq_no, True)


def test_a_table_that_does_not_extend_the_sent_one_is_sent_in_full():
    encoder, decoder = StepEncoder(), StepDecoder()
    params = SamplingParams()
    steps = [
        [_scheduled(1, [4, 5], 5)],
        [_scheduled(1, [4, 5, 6], 6)],  # another list object that extends the sent one: a delta
        [_scheduled(1, [4, 9, 6], 7)],  # rewritten (not the scheduler's behaviour): in full again
    ]
    kinds = []
    for seqs in steps:
        for s in seqs:
            s.sampling_params = params
        out = SchedulerOutput(seqs)
        delta = encoder.encode(out)
        kinds.append(type(delta.seqs[0]))
        assert_same_output(decoder.decode(delta), out, len(kinds))
    assert kinds == [NewSeq, CachedSeq, NewSeq]


def test_a_decoder_that_missed_a_step_refuses_to_guess():
    encoder = StepEncoder()
    params = SamplingParams()
    first = _scheduled(3, [1], 2)
    first.sampling_params = params
    encoder.encode(SchedulerOutput([first]))
    second = _scheduled(3, [1], 3)
    second.sampling_params = params
    with pytest.raises(RuntimeError, match="does not hold"):
        StepDecoder().decode(encoder.encode(SchedulerOutput([second])))


# ---- the message at 256 running decodes of ~1,000-token contexts ----------------------------
RUNNING, CONTEXT, BLOCK = 256, 1000, 16


class DecodeBatch:
    """Consecutive async decode steps of RUNNING sequences near CONTEXT tokens (tables of ~64
    blocks, a new block every BLOCK steps), each with its own sampling params as in serving;
    the tables are live lists that grow, like the scheduler's."""

    def __init__(self, placeholder: bool = True) -> None:
        self.placeholder = placeholder  # async scheduling; else each decode carries its known token
        self.params = [SamplingParams(temperature=0.7, top_p=0.9, seed=i, max_tokens=2048) for i in range(RUNNING)]
        self.tables: list[list[int]] = [[] for _ in range(RUNNING)]
        self.k = 0

    def next(self) -> SchedulerOutput:
        seqs = []
        for i, table in enumerate(self.tables):
            pos = CONTEXT - 8 + self.k + i % 8
            while pos // BLOCK >= len(table):
                table.append(128 * i + len(table))
            token = 0 if self.placeholder else 1 + (pos + i) % 1000
            seqs.append(ScheduledSequence(f"req-{i:08d}", [token], pos, table, True, self.params[i], pos - 200, 0, [],
                                          i, self.placeholder))
        self.k += 1
        return SchedulerOutput(seqs, num_decode_tokens=RUNNING)


def _full_pickle_round_trip(out: SchedulerOutput) -> SchedulerOutput:
    return pickle.loads(pickle.dumps(("execute_model", (out,)), protocol=pickle.HIGHEST_PROTOCOL))[1][0]


def test_full_pickle_message_at_256_decodes(benchmark):
    out = DecodeBatch().next()
    assert max(len(s.block_table) for s in out.seqs) == 63
    benchmark.extra_info["bytes"] = len(pickle.dumps(("execute_model", (out,)), protocol=pickle.HIGHEST_PROTOCOL))
    assert_same_output(benchmark(_full_pickle_round_trip, out), out, 0)


@pytest.mark.parametrize("scheduling", ["async", "sync"])
def test_delta_message_at_256_decodes(benchmark, scheduling):
    batch, encoder, decoder = DecodeBatch(placeholder=scheduling == "async"), StepEncoder(), StepDecoder()
    decoder.decode(encoder.encode(batch.next()))  # every sequence known: the steady state
    sizes: list[int] = []

    def one_step(out: SchedulerOutput) -> tuple[SchedulerOutput, SchedulerOutput]:
        wire = pickle.dumps(("execute_step", (encoder.encode(out),)), protocol=pickle.HIGHEST_PROTOCOL)
        sizes.append(len(wire))
        return decoder.decode(pickle.loads(wire)[1][0]), out

    # each round the next step, as the driver sends them (built outside the timing)
    got, want = benchmark.pedantic(one_step, setup=lambda: ((batch.next(),), {}), rounds=200, iterations=1)
    assert_same_output(got, want, len(sizes))
    benchmark.extra_info["bytes"] = max(sizes)
    assert min(len(s.block_table) for s in want.seqs) >= 62
