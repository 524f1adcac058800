"""Paged KV-cache bookkeeping: fixed-size blocks, a block table per sequence, reference counts,
and prefix caching by hashing full blocks chained to the previous block's hash.

Block 0 is a null block that is never handed out: padded block-table entries point at it.
Free blocks sit in an LRU queue (an OrderedDict: O(1) removal on a cache hit) and keep their
hash until they are popped for reuse, so a freed prefix can still be hit.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import xxhash

from engine.sequence import Sequence

NULL_BLOCK_ID = 0


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()  # content of a hashed block, compared on a hit


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    h = xxhash.xxh64()
    if parent_hash is not None:
        h.update(parent_hash.to_bytes(8, "little"))
    h.update(b"".join(t.to_bytes(4, "little", signed=False) for t in token_ids))
    return h.intdigest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_usable_blocks(self) -> int:
        return len(self.blocks) - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached run of full prompt blocks. The last token is never
        served from the cache, so at least one token is computed and produces logits."""
        if not self.enable_prefix_caching:
            return []
        bs, hits, parent = self.block_size, [], None
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            parent = hash_block(parent, tokens)
            block_id = self.hash_to_block.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_query_tokens += num_query_tokens
        self.prefix_hit_tokens += num_hit_tokens

    def allocate_slots(self, seq: Sequence, num_total_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Grow `seq.block_table` (after any `cached_blocks`) to hold `num_total_tokens`.
        Returns False, changing nothing, when free blocks run short."""
        have = len(seq.block_table) + len(cached_blocks)
        num_new = max(0, self.blocks_for(num_total_tokens) - have)
        num_revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if num_new + num_revived > self.num_free_blocks:
            return False
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(block.block_hash)
        for _ in range(num_new):
            seq.block_table.append(self._pop_free_block())
        return True

    def _pop_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.block_hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full of computed tokens."""
        bs = self.block_size
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // bs
        if not self.enable_prefix_caching or full <= len(seq.block_hashes):
            return
        for i in range(len(seq.block_hashes), full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = hash_block(parent, tokens)
            seq.block_hashes.append(block_hash)
            if block_hash not in self.hash_to_block:
                block = self.blocks[seq.block_table[i]]
                block.block_hash, block.token_ids = block_hash, tokens
                self.hash_to_block[block_hash] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; tail blocks go to the free queue first so they are
        evicted before the (more shareable) prefix blocks."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        seq.block_table = []
        seq.block_hashes = []

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (e.g. between benchmark runs that replay the same prompts).
        Only when no block is in use: a live sequence's blocks may still be shared."""
        if self.num_used_blocks:
            raise RuntimeError(f"cannot reset the prefix cache: {self.num_used_blocks} blocks are in use")
        for block in self.blocks:
            block.block_hash, block.token_ids = None, ()
        self.hash_to_block.clear()

    def check_invariants(self, live: list[Sequence]) -> None:
        """Exact reference counts, no leaked or double-freed block (used by property tests)."""
        expected = [0] * len(self.blocks)
        for seq in live:
            for block_id in seq.block_table:
                expected[block_id] += 1
        for block in self.blocks[1:]:
            assert block.ref_count == expected[block.block_id], (block, expected[block.block_id])
            assert (block.ref_count == 0) == (block.block_id in self.free_queue), block
        assert expected[NULL_BLOCK_ID] == 0 and NULL_BLOCK_ID not in self.free_queue
        assert self.num_used_blocks + self.num_free_blocks == self.num_usable_blocks
        for block_hash, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].block_hash == block_hash
