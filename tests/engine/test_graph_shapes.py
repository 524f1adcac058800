"""Which CUDA graph a step replays (engine/graph_shapes.py, StepGraphs.lookup), on the CPU: the
decode and prefill ladders, the padded (T, S) of each kind of step, and the steps that stay eager.
Run: pytest tests/engine/test_graph_shapes.py"""

from __future__ import annotations

import pytest

from engine.cuda_graphs import StepGraphs, collector_paused
from engine.graph_shapes import GraphLadder, GraphShape, decode_graph_sizes, prefill_graph_sizes
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSequence, SchedulerOutput


@pytest.mark.parametrize("limit, max_tokens, want", [
    (512, 8192, [16, 32, 48, 64, 96, 128, 192, 256, 384, 512]),
    (100, 8192, [16, 32, 48, 64, 96, 100]),  # the limit ends the ladder even off its grid
    (512, 200, [16, 32, 48, 64, 96, 128, 192, 200]),  # no step has more tokens than the buffers
    (16, 8192, [16]),
    (8, 8192, [8]),
    (0, 8192, []),  # 0 switches prefill graphs off
])
def test_prefill_ladder(limit, max_tokens, want):
    assert prefill_graph_sizes(limit, max_tokens) == want


def test_decode_ladder():
    assert decode_graph_sizes(1) == [1]
    assert decode_graph_sizes(12) == [1, 2, 4, 8, 12]
    assert decode_graph_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


@pytest.mark.parametrize("max_seqs, tokens, seqs, decode, want", [
    (8, 3, 3, True, GraphShape(4, 4, True)),  # decode batch padded to the next batch size
    (8, 8, 8, True, GraphShape(8, 8, True)),
    (8, 128, 1, False, GraphShape(128, 8, False)),  # one 128-token prompt: no token padding
    (8, 129, 1, False, GraphShape(192, 8, False)),
    (8, 10, 3, False, GraphShape(16, 8, False)),  # mixed: S = max_num_seqs rows
    (256, 10, 3, False, GraphShape(16, 16, False)),  # S = T when T < max_num_seqs
    (256, 300, 120, False, GraphShape(384, 256, False)),
    (8, 512, 8, False, GraphShape(512, 8, False)),
    (8, 513, 2, False, None),  # past the ladder: eager
])
def test_shape_for(max_seqs, tokens, seqs, decode, want):
    ladder = GraphLadder.build(max_seqs, 512, 8192)
    assert ladder.shape_for(tokens, seqs, decode) == want


def test_prefill_graphs_off_keeps_decode_graphs():
    ladder = GraphLadder.build(8, 0, 8192)
    assert ladder.shape_for(5, 5, True) == GraphShape(8, 8, True)
    assert ladder.shape_for(5, 1, False) is None
    assert all(s.decode for s in ladder.shapes())


def test_capture_list_largest_first_and_complete():
    ladder = GraphLadder.build(256, 512, 8192)
    shapes = ladder.shapes()
    assert len(shapes) == len(set(shapes)) == 20 + 10  # the defaults: 20 decode + 10 prefill graphs
    assert shapes[0] == GraphShape(512, 256, False)
    assert [s.num_tokens for s in shapes] == sorted((s.num_tokens for s in shapes), reverse=True)
    # at 256 tokens the prefill graph comes before the decode one
    assert shapes.index(GraphShape(256, 256, False)) < shapes.index(GraphShape(256, 256, True))
    for s in shapes:  # any step routed to a shape fits in it
        assert s.num_seqs <= min(s.num_tokens, 256)


def _seq(n: int, sample: bool = True) -> ScheduledSequence:
    return ScheduledSequence("r", list(range(n)), 0, [1], sample, SamplingParams(), 0)


def _lookup(out: SchedulerOutput) -> GraphShape | None:
    """StepGraphs.lookup with a graph (its shape, standing in) for every shape of the ladder."""
    ladder = GraphLadder.build(8, 64, 8192)
    graphs = StepGraphs(forward=None, buffers=None, ladder=ladder, max_model_len=64)
    graphs.graphs = {s: s for s in ladder.shapes()}
    return graphs.lookup(out)


def test_lookup_routes_each_kind_of_step():
    decodes = [_seq(1) for _ in range(3)]
    assert _lookup(SchedulerOutput(decodes, 0, 3)) == GraphShape(4, 4, True)
    # a prefill with decodes (mixed), a prefix-cache hit's remainder, a prefill chunk
    assert _lookup(SchedulerOutput(decodes + [_seq(20)], 20, 3)) == GraphShape(32, 8, False)
    assert _lookup(SchedulerOutput([_seq(5)], 5, 0)) == GraphShape(16, 8, False)
    assert _lookup(SchedulerOutput([_seq(64, sample=False)], 64, 0)) == GraphShape(64, 8, False)
    assert _lookup(SchedulerOutput([_seq(65)], 65, 0)) is None  # over max_graph_prefill_tokens
    # one token each, but a one-token prefill among them: not a decode step
    assert _lookup(SchedulerOutput(decodes + [_seq(1)], 1, 3)) == GraphShape(16, 8, False)
    # decode-region tokens of a recomputed sequence (two in one row), or a row that does not
    # sample: decode graphs need one sampled token per row, so the prefill graph takes them
    assert _lookup(SchedulerOutput([_seq(2), _seq(1)], 0, 3)) == GraphShape(16, 8, False)
    assert _lookup(SchedulerOutput([_seq(1, sample=False), _seq(1)], 0, 2)) == GraphShape(16, 8, False)


def test_lookup_counts_the_steps_without_a_graph():
    """StepGraphs.misses: the steps that ran eagerly (the latency study checks its timed window)."""
    ladder = GraphLadder.build(8, 64, 8192)
    graphs = StepGraphs(forward=None, buffers=None, ladder=ladder, max_model_len=64)
    graphs.graphs = {s: s for s in ladder.shapes() if s != GraphShape(2, 2, True)}  # one graph missing
    decode = SchedulerOutput([_seq(1), _seq(1)], 0, 2)
    assert [graphs.lookup(SchedulerOutput([_seq(1)], 0, 1)), graphs.lookup(decode)] == [GraphShape(1, 1, True), None]
    assert graphs.lookup(SchedulerOutput([_seq(65)], 65, 0)) is None and graphs.misses == 2


def test_persistent_graph_takes_one_short_sequence():
    """With persistent_max_context, the ladder adds a batch-1 persistent decode graph, which a
    decode step of one sequence replays while it holds at most that many tokens; longer ones,
    batches and prefill steps take the usual graphs. Without it there is no such graph."""
    ladder = GraphLadder.build(8, 64, 8192, persistent_max_context=100)
    assert GraphShape(1, 1, True, True) in ladder.shapes() and len(ladder.shapes()) == len(set(ladder.shapes()))
    assert GraphShape(1, 1, True, True) not in GraphLadder.build(8, 64, 8192).shapes()
    graphs = StepGraphs(forward=None, buffers=None, ladder=ladder, max_model_len=200)
    graphs.graphs = {s: s for s in ladder.shapes()}

    def decode(*start_pos: int) -> SchedulerOutput:
        seqs = [ScheduledSequence("r", [7], p, [1], True, SamplingParams(), 0) for p in start_pos]
        return SchedulerOutput(seqs, 0, len(seqs))

    assert graphs.lookup(decode(99)) == GraphShape(1, 1, True, True)  # 100 tokens after the step
    assert graphs.lookup(decode(100)) == GraphShape(1, 1, True)
    assert graphs.lookup(decode(5, 5)) == GraphShape(2, 2, True)
    assert graphs.lookup(SchedulerOutput([_seq(5)], 5, 0)) == GraphShape(16, 8, False)
    assert [graphs.for_batch(1, 100), graphs.for_batch(1, 101)] == [GraphShape(1, 1, True, True), GraphShape(1, 1, True)]


def test_persistent_graphs_take_few_short_sequences():
    """persistent_max_seqs 3: persistent decode graphs of 1, 2 and 4 rows (the ladder's sizes up to
    the first that holds 3), which decode steps of up to 3 sequences replay (padded) while their
    longest holds at most persistent_max_context tokens; 4 sequences, longer ones and prefill steps
    take the usual graphs."""
    ladder = GraphLadder.build(8, 64, 8192, persistent_max_context=100, persistent_max_seqs=3)
    assert ladder.persistent_sizes() == [1, 2, 4]
    assert {s for s in ladder.shapes() if s.persistent} == {GraphShape(b, b, True, True) for b in (1, 2, 4)}
    graphs = StepGraphs(forward=None, buffers=None, ladder=ladder, max_model_len=200)
    graphs.graphs = {s: s for s in ladder.shapes()}

    def decode(*start_pos: int) -> SchedulerOutput:
        seqs = [ScheduledSequence(f"r{i}", [7], p, [1], True, SamplingParams(), 0) for i, p in enumerate(start_pos)]
        return SchedulerOutput(seqs, 0, len(seqs))

    assert graphs.lookup(decode(5, 99)) == GraphShape(2, 2, True, True)
    assert graphs.lookup(decode(5, 99, 7)) == GraphShape(4, 4, True, True)  # padded to 4 rows
    assert graphs.lookup(decode(5, 100, 7)) == GraphShape(4, 4, True)  # the longest holds 101
    assert graphs.lookup(decode(5, 5, 5, 5)) == GraphShape(4, 4, True)  # more than 3 sequences
    assert graphs.for_batch(3, 50) == GraphShape(4, 4, True, True)
    assert GraphLadder.build(2, 64, 8192, persistent_max_context=100, persistent_max_seqs=16).persistent_sizes() == \
        [1, 2]  # never past max_num_seqs


def test_capture_pauses_the_garbage_collector():
    """collector_paused (around every capture): garbage already unreachable is collected on entry,
    none while the block runs, and automatic collection is back afterwards, also after an error;
    a collector that was off stays off."""
    import gc
    import weakref

    class Cycle:
        pass

    def garbage() -> weakref.ref:
        a, b = Cycle(), Cycle()
        a.other, b.other = b, a
        return weakref.ref(a)

    before = garbage()
    with collector_paused():
        assert before() is None and not gc.isenabled()
        during = garbage()
        kept = [Cycle() for _ in range(3 * gc.get_threshold()[0])]  # enough to start a collection
        assert during() is not None and len(kept) > 0
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("capture failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
