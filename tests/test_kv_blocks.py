"""BlockManager: unit tests plus a hypothesis state machine against a reference model.

The reference model keeps a fake KV store (slot -> token) that is written exactly where the
manager's slot mapping says, like a real model would. Reading every live sequence back through its
block table after each step catches any block handed out while still referenced, any wrong prefix
hit and any slot-mapping mistake, not just bookkeeping inconsistencies.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llmc.runtime.kv_blocks import BlockManager, blocks_for_budget, hash_block


def compute(bm: BlockManager, kv: dict, seq, tokens, start: int) -> None:
    """Pretend to run the model on tokens[start:]: write their 'KV' and register full blocks."""
    for p, slot in zip(range(start, len(tokens)), bm.slot_mapping(seq, start, len(tokens))):
        kv[slot] = tokens[p]
    bm.mark_computed(seq, tokens)


def read_back(bm: BlockManager, kv: dict, seq, n: int) -> list:
    return [kv.get(slot) for slot in bm.slot_mapping(seq, 0, n)]


def test_blocks_are_allocated_on_demand_and_freed_at_once():
    bm = BlockManager(num_blocks=10, block_size=4)
    assert bm.allocate_prompt("a", [1, 2, 3]) == 0
    assert bm.block_table("a") == [] and bm.num_used_blocks == 0
    assert bm.append_slots("a", 3)
    assert len(bm.block_table("a")) == 1
    assert bm.append_slots("a", 1) and len(bm.block_table("a")) == 1  # 4 tokens: still one block
    assert bm.append_slots("a", 1) and len(bm.block_table("a")) == 2
    assert bm.slot_mapping("a", 3, 5) == [bm.block_table("a")[0] * 4 + 3, bm.block_table("a")[1] * 4]
    bm.free("a")
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 10
    assert bm.peak_used_blocks == 2
    bm.check_invariants()


def test_append_slots_failure_leaves_state_unchanged():
    bm = BlockManager(num_blocks=2, block_size=2)
    bm.allocate_prompt("a", [1, 2, 3])
    assert bm.append_slots("a", 3)
    table, free = list(bm.block_table("a")), bm.num_free_blocks
    assert not bm.append_slots("a", 2)  # needs a third block
    assert bm.block_table("a") == table and bm.num_free_blocks == free and bm.num_tokens("a") == 3
    assert bm.append_slots("a", 1)  # still room in the last block
    bm.check_invariants()


def test_shared_system_prompt_is_stored_once():
    bm, kv = BlockManager(num_blocks=16, block_size=4), {}
    system = list(range(100, 108))  # two full blocks
    a, b = system + [1, 2], system + [3, 4, 5]
    assert bm.allocate_prompt("a", a) == 0
    bm.append_slots("a", len(a))
    compute(bm, kv, "a", a, 0)
    assert bm.allocate_prompt("b", b) == 8
    bm.append_slots("b", len(b) - 8)
    compute(bm, kv, "b", b, 8)
    assert bm.block_table("b")[:2] == bm.block_table("a")[:2]
    assert bm.num_used_blocks == 4  # 2 shared + 1 tail each
    assert read_back(bm, kv, "b", len(b)) == b
    bm.free("a")
    assert bm.num_used_blocks == 3  # shared blocks survive while "b" holds them
    bm.check_invariants()


def test_last_prompt_token_is_always_recomputed():
    bm, kv = BlockManager(num_blocks=8, block_size=4), {}
    prompt = list(range(8))  # exactly two full blocks
    bm.allocate_prompt("a", prompt)
    bm.append_slots("a", 8)
    compute(bm, kv, "a", prompt, 0)
    assert bm.allocate_prompt("b", prompt) == 4  # not 8: the last token must produce logits
    assert bm.allocate_prompt("c", prompt + [9]) == 8
    assert bm.allocate_prompt("d", prompt[:1]) == 0


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm, kv = BlockManager(num_blocks=4, block_size=2), {}
    p = [1, 2, 3, 4, 5]
    bm.allocate_prompt("a", p)
    bm.append_slots("a", 5)
    compute(bm, kv, "a", p, 0)
    bm.free("a")
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 2  # the two full blocks
    assert bm.can_allocate(p)
    assert bm.allocate_prompt("b", p) == 4  # hit after the owner finished
    assert read_back(bm, kv, "b", 4) == p[:4]
    bm.free("b")
    # Fill the whole pool with other content: the free list runs dry, cached blocks get evicted.
    q = [9, 9, 8, 8, 7, 7, 6, 6]
    bm.allocate_prompt("c", q)
    assert bm.append_slots("c", 8)
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 0
    assert not bm.can_allocate([5])
    bm.free("c")
    assert bm.allocate_prompt("d", p) == 0
    bm.check_invariants()


def test_eviction_takes_least_recently_used_first():
    bm, kv = BlockManager(num_blocks=5, block_size=1), {}
    bm.allocate_prompt("w", [9])
    bm.append_slots("w", 1)  # w holds block 0 throughout: nobody below is a lone sequence
    for sid, tok in (("x", 1), ("y", 2)):  # x's blocks become evictable first
        bm.allocate_prompt(sid, [tok, 0])
        bm.append_slots(sid, 2)
        compute(bm, kv, sid, [tok, 0], 0)
        bm.free(sid)
    assert bm.num_cached_blocks == 4
    bm.allocate_prompt("z", [5])
    assert bm.append_slots("z", 2)  # free list is empty: evicts the two oldest (x's)
    assert bm.allocate_prompt("y2", [2, 0]) == 1  # y's prefix survived
    assert bm.allocate_prompt("x2", [1, 0]) == 0  # x's was reclaimed
    bm.check_invariants()


def test_lone_sequence_gets_contiguous_blocks_from_zero():
    """A lone sequence's table reads 0, 1, 2, ... (the engines' GroupQueryAttention fast path):
    from the free list, and from cached blocks it did not hit when nothing else runs; a prefix it
    hits stays and the table continues after it. With another sequence running, cached blocks are
    evicted in LRU order only (see test_eviction_takes_least_recently_used_first)."""
    bm, kv = BlockManager(num_blocks=8, block_size=2), {}
    a = [1, 2, 3, 4, 5]
    bm.allocate_prompt("a", a)
    bm.append_slots("a", 5)
    assert bm.block_table("a") == [0, 1, 2]
    compute(bm, kv, "a", a, 0)
    bm.free("a")  # blocks 0 and 1 stay cached (full), block 2 goes back to the free list
    assert bm.num_cached_blocks == 2
    b = [7, 8, 9]  # hits nothing: takes block 0 and 1 back, evicting a's prefix
    bm.allocate_prompt("b", b)
    bm.append_slots("b", 3)
    assert bm.block_table("b") == [0, 1]
    compute(bm, kv, "b", b, 0)
    assert bm.allocate_prompt("a2", a) == 0
    bm.free("a2")
    bm.free("b")
    c = [7, 8, 9, 10, 11, 12]  # hits b's first block and continues after it
    assert bm.allocate_prompt("c", c) == 2
    bm.append_slots("c", 4)
    assert bm.block_table("c") == [0, 1, 2]
    assert read_back(bm, kv, "c", 2) == [7, 8]
    bm.check_invariants()


def test_prefix_caching_disabled_never_hits():
    bm, kv = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False), {}
    p = [1, 2, 3, 4, 5]
    bm.allocate_prompt("a", p)
    bm.append_slots("a", 5)
    compute(bm, kv, "a", p, 0)
    assert bm.allocate_prompt("b", p) == 0
    bm.free("a")
    assert bm.num_cached_blocks == 0
    bm.check_invariants()


def test_hash_is_chained():
    a = hash_block(None, [1, 2])
    assert hash_block(a, [3, 4]) != hash_block(None, [3, 4])
    assert hash_block(a, np.array([3, 4])) == hash_block(a, (3, 4))


def test_budget_helpers():
    per_block = 2 * 2 * 4 * 8 * 16 * 2  # K and V x 2 layers x 4 heads x 8 dims x 16 tokens x fp16
    assert blocks_for_budget(10 * per_block + per_block - 1, per_block) == 10
    assert blocks_for_budget(0, per_block) == 0
    with pytest.raises(ValueError):
        blocks_for_budget(100, 0)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / grow / free with heavy prefix sharing over a tiny pool."""

    PREFIXES = [(), (7, 7, 7), (1, 2, 3, 4, 5, 6, 7, 8), (1, 2, 3, 4, 9, 9)]

    @initialize(
        num_blocks=st.integers(1, 12),
        block_size=st.sampled_from([1, 2, 3, 4]),
        caching=st.booleans(),
    )
    def setup(self, num_blocks, block_size, caching):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.kv: dict[int, int] = {}
        self.seqs: dict[int, list[int]] = {}  # tokens with slots
        self.computed: dict[int, int] = {}  # tokens registered via mark_computed
        self.next_id = 0

    @rule(prefix=st.sampled_from(PREFIXES), suffix=st.lists(st.integers(0, 3), min_size=1, max_size=9))
    def new_seq(self, prefix, suffix):
        prompt = list(prefix) + suffix
        sid, self.next_id = self.next_id, self.next_id + 1
        predicted = self.bm.can_allocate(prompt)
        used = self.bm.num_used_blocks
        looked_up = self.bm.lookup_prefix(prompt)
        cached = self.bm.allocate_prompt(sid, prompt)
        assert cached == looked_up
        assert cached % self.bm.block_size == 0 and 0 <= cached <= len(prompt) - 1
        assert read_back(self.bm, self.kv, sid, cached) == prompt[:cached]  # hits hold the right KV
        ok = self.bm.append_slots(sid, len(prompt) - cached)
        assert ok == predicted
        if not ok:
            self.bm.free(sid)
            assert self.bm.num_used_blocks == used
            return
        compute(self.bm, self.kv, sid, prompt, cached)
        self.seqs[sid] = prompt
        self.computed[sid] = len(prompt)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 3), min_size=1, max_size=6), lag=st.integers(0, 3))
    def append(self, data, tokens, lag):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        table, free = list(self.bm.block_table(sid)), self.bm.num_free_blocks
        if not self.bm.append_slots(sid, len(tokens)):
            assert self.bm.block_table(sid) == table and self.bm.num_free_blocks == free
            return
        old = self.seqs[sid]
        new = old + tokens
        for p, slot in zip(range(len(old), len(new)), self.bm.slot_mapping(sid, len(old), len(new))):
            self.kv[slot] = new[p]
        # Register hashes lagging behind the written tokens, as a scheduler whose step has not
        # been confirmed yet would; the next call catches up.
        upto = max(self.computed[sid], len(new) - lag)
        self.bm.mark_computed(sid, new, upto)
        self.seqs[sid], self.computed[sid] = new, upto

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(sid)
        del self.seqs[sid], self.computed[sid]

    @invariant()
    def consistent(self):
        if not hasattr(self, "bm"):
            return
        self.bm.check_invariants()
        bs = self.bm.block_size
        in_use = set()
        for sid, toks in self.seqs.items():
            table = self.bm.block_table(sid)
            assert len(table) == -(-len(toks) // bs)  # on demand: never more than needed
            assert read_back(self.bm, self.kv, sid, len(toks)) == toks  # nobody overwrote us
            in_use.update(table)
        assert self.bm.num_used_blocks == len(in_use)
        assert self.bm.num_free_blocks == self.bm.num_blocks - len(in_use)
        assert self.bm.peak_used_blocks >= len(in_use)

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for sid in list(self.seqs):
            self.bm.free(sid)
        self.bm.check_invariants()
        assert self.bm.num_used_blocks == 0
        assert self.bm.num_free_blocks == self.bm.num_blocks


BlockManagerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
