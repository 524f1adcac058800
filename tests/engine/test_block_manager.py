"""Block manager: exact block ids, free-queue order, prefix hits, and invariants under random
operations (hypothesis). Run: pytest tests/test_block_manager.py"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_manager import NULL_BLOCK_ID, BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BS = 4


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=8))


def compute_all(bm: BlockManager, s: Sequence) -> None:
    assert bm.allocate_slots(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_blocks(s)


def test_allocation_order_and_null_block():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = seq("a", list(range(9)))  # 3 blocks
    assert bm.allocate_slots(a, 9)
    assert a.block_table == [1, 2, 3] and NULL_BLOCK_ID not in a.block_table
    assert bm.num_free_blocks == 2
    b = seq("b", list(range(100, 112)))  # needs 3, only 2 free
    assert not bm.allocate_slots(b, 12)
    assert b.block_table == [] and bm.num_free_blocks == 2  # nothing changed on shortage
    bm.free(a)
    # tail blocks are queued first, so they are evicted first
    assert list(bm.free_queue) == [4, 5, 3, 2, 1]


def test_prefix_hit_compares_tokens_and_keeps_last_token_uncached():
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = seq("a", list(range(8)))  # exactly two full blocks
    compute_all(bm, a)
    b = seq("b", list(range(8)))
    # the last token must be computed, so only the first block can be served from the cache
    assert bm.find_cached_prefix(b) == [a.block_table[0]]
    c = seq("c", list(range(8)) + [99])
    assert bm.find_cached_prefix(c) == a.block_table[:2]
    d = seq("d", [0, 1, 2, 7, 4, 5, 6, 7, 8])
    assert bm.find_cached_prefix(d) == []


def test_freed_blocks_keep_their_hash_until_reused():
    bm = BlockManager(num_blocks=4, block_size=BS)  # 3 usable
    a = seq("a", list(range(8)) + [50])
    compute_all(bm, a)
    first_two = a.block_table[:2]
    bm.free(a)
    c = seq("c", list(range(8)) + [60])
    hits = bm.find_cached_prefix(c)
    assert hits == first_two
    assert bm.allocate_slots(c, c.num_tokens, hits)
    assert c.block_table[:2] == first_two
    assert [bm.blocks[i].ref_count for i in first_two] == [1, 1]
    bm.free(c)
    other = seq("o", list(range(200, 212)))
    assert bm.allocate_slots(other, 12)  # takes every block: hashes evicted
    assert bm.hash_to_block == {}
    bm.free(other)
    bm.check_invariants([])


def test_shared_blocks_are_refcounted():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = seq("a", list(range(8)) + [1])
    compute_all(bm, a)
    b = seq("b", list(range(8)) + [2])
    hits = bm.find_cached_prefix(b)
    assert bm.allocate_slots(b, b.num_tokens, hits)
    assert [bm.blocks[i].ref_count for i in hits] == [2, 2]
    bm.check_invariants([a, b])
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in hits] == [1, 1]
    bm.check_invariants([b])


ops = st.lists(
    st.tuples(st.sampled_from(["add", "grow", "free", "compute"]), st.integers(0, 7), st.integers(1, 12)),
    min_size=1, max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, caching=st.booleans())
def test_random_operations_keep_invariants(ops, caching):
    bm = BlockManager(num_blocks=12, block_size=BS, enable_prefix_caching=caching)
    live: dict[int, Sequence] = {}
    for op, key, n in ops:
        s = live.get(key)
        if op == "add" and s is None:
            new = seq(str(key), [key % 3] * n)  # few distinct contents: many prefix hits
            hits = bm.find_cached_prefix(new)
            if bm.allocate_slots(new, new.num_tokens, hits):
                new.num_computed_tokens = len(hits) * BS
                live[key] = new
        elif op == "grow" and s is not None:
            s.token_ids += [key] * n
            bm.allocate_slots(s, s.num_tokens)  # may fail: then nothing changes
        elif op == "compute" and s is not None:
            s.num_computed_tokens = min(s.num_tokens, len(s.block_table) * BS)
            bm.cache_full_blocks(s)
        elif op == "free" and s is not None:
            bm.free(live.pop(key))
        bm.check_invariants(list(live.values()))
    for s in list(live.values()):
        bm.free(s)
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_usable_blocks
