"""Paged KV-cache block manager with prefix caching (bookkeeping only, no tensors).

The KV cache is one pool of `num_blocks` fixed-size blocks of `block_size` token slots. A
sequence owns a *block table* (list of block ids); token position `p` lives in slot
`table[p // block_size] * block_size + p % block_size`. Why paged: blocks are taken on demand as
a sequence grows and returned the moment it finishes, so memory tracks the tokens that actually
exist instead of `max_seq_len` per request, and many more requests fit in the same pool.

Prefix caching: a FULL block is identified by a chained hash of (parent block hash, its token
ids), so equal hashes mean equal whole prefixes, and such blocks can be shared (ref-counted) by
every request starting with that prefix (a shared system prompt is stored once). Partial blocks
are never shared because their tail is still being written. Blocks whose refcount drops to zero
keep their contents and hash in an LRU "evictable" set so later requests can still hit them;
they are only reclaimed when the plain free list is empty.

Contiguity: a sequence's next block is, when it can be, the block after its last one (block 0 for
its first), so a lone sequence's table reads 0, 1, 2, ...: its cache is then one run of slots
from slot 0, which ONNX Runtime engines decode with one GroupQueryAttention kernel per layer
instead of the paged gathers (`llmc.plugins.attention.emit_contiguous_attention`; single-stream
decode 1.08x fp32 and int8_sq, 1.19x int4_awq on SmolLM2, measured). The wanted block is taken
from the free list, or, when the sequence is the only one holding blocks, even from the cached
(evictable) set: a lone request, the single-stream case, gives up cached prefixes it did not hit
rather than its fast path.

This module imports nothing heavy (no torch/onnxruntime) so the scheduler and its tests stay fast.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Hashable, Sequence

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Chained hash of one full block: H(parent hash || token ids).

    A cryptographic digest rather than Python's 64-bit `hash()`: a collision would silently make
    a request attend to another prompt's KV, and tuple hashes are easy to collide on purpose
    (vLLM switched to sha256 for the same reason). The root block has an empty parent; since all
    full blocks have the same length the encoding is unambiguous.
    """
    h = hashlib.sha256(parent or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()[:16]


def blocks_for_budget(budget_bytes: int, bytes_per_block: int) -> int:
    """How many KV blocks fit in `budget_bytes` (rounded down)."""
    if bytes_per_block <= 0:
        raise ValueError(f"bytes_per_block must be positive, got {bytes_per_block}")
    return max(0, int(budget_bytes) // int(bytes_per_block))


class BlockManager:
    """Allocates KV blocks to sequences; shares full prefix blocks between them.

    Every block is in exactly one state: referenced (refcount > 0, in one or more block tables),
    free (no hash, in `_free`) or evictable (refcount 0 but hashed, in `_evictable`, LRU first).
    `num_free_blocks` counts both of the last two because both can be handed out.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash_of: list[BlockHash | None] = [None] * num_blocks  # set only on the canonical holder
        self._by_hash: dict[BlockHash, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # FIFO
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._tables: dict[Hashable, list[int]] = {}
        self._num_tokens: dict[Hashable, int] = {}  # tokens that have a slot, per sequence
        self._seq_hashes: dict[Hashable, list[BlockHash]] = {}  # hash chain of computed full blocks
        self._peak = 0
        self.prefix_queried_tokens = 0  # metrics: prompt tokens looked up / found in the cache
        self.prefix_hit_tokens = 0

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (plain free + evictable cached)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Unreferenced blocks kept only for possible prefix hits."""
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def peak_used_blocks(self) -> int:
        return self._peak

    def reset_peak(self) -> None:
        self._peak = self.num_used_blocks

    def has_seq(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The sequence's block table (the live list: copy it before handing it out)."""
        return self._tables[seq_id]

    def num_tokens(self, seq_id: Hashable) -> int:
        """Number of token slots reserved for the sequence so far."""
        return self._num_tokens[seq_id]

    def slot_mapping(self, seq_id: Hashable, start: int, end: int) -> list[int]:
        """Flat cache slots for token positions [start, end) of the sequence."""
        if not 0 <= start <= end <= self._num_tokens[seq_id]:
            raise ValueError(
                f"positions [{start}, {end}) outside the {self._num_tokens[seq_id]} slots of {seq_id!r}"
            )
        table, bs = self._tables[seq_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _lookup(self, token_ids: Sequence[int]) -> tuple[list[int], list[BlockHash]]:
        """Longest run of cached full blocks prefixing `token_ids`, leaving the last token out.

        The cap at len-1 (rounded down to a block) guarantees at least one token is recomputed,
        so the model produces logits for the next token even when the whole prompt is cached.
        """
        blocks: list[int] = []
        hashes: list[BlockHash] = []
        if not self.enable_prefix_caching:
            return blocks, hashes
        bs = self.block_size
        parent: BlockHash | None = None
        for i in range(max(0, len(token_ids) - 1) // bs):
            h = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            b = self._by_hash.get(h)
            if b is None:
                break
            blocks.append(b)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def lookup_prefix(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens `allocate_prompt(token_ids)` would find cached (read-only)."""
        return len(self._lookup(token_ids)[0]) * self.block_size

    def can_allocate(self, token_ids: Sequence[int], num_new_tokens: int | None = None) -> bool:
        """Would `allocate_prompt(token_ids)` then `append_slots(num_new_tokens)` succeed?

        `num_new_tokens` counts tokens after the cached prefix; None means the rest of the prompt.
        Cached blocks that are currently evictable stop being allocatable once hit, hence the
        subtraction.
        """
        hit, _ = self._lookup(token_ids)
        cached = len(hit) * self.block_size
        n_new = len(token_ids) - cached if num_new_tokens is None else num_new_tokens
        need = self._blocks_needed(cached + n_new) - len(hit)
        hit_evictable = sum(1 for b in hit if self._ref[b] == 0)
        return need <= self.num_free_blocks - hit_evictable

    # ---- mutations -----------------------------------------------------------------------
    def _take_block(self, want: int, lone: bool) -> int:
        """A block for new contents: `want` (the block after the sequence's last, see
        Contiguity) if it is free, or cached and the sequence is `lone`; else the plain free list
        first, else evict the LRU cached block."""
        if want in self._free:
            del self._free[want]
            b = want
        elif lone and want in self._evictable:
            del self._evictable[want]
            b = self._uncache(want)
        elif self._free:
            b, _ = self._free.popitem(last=False)
        else:
            b = self._uncache(self._evictable.popitem(last=False)[0])
        self._ref[b] = 1
        return b

    def _uncache(self, b: int) -> int:
        del self._by_hash[self._hash_of[b]]  # type: ignore[arg-type]
        self._hash_of[b] = None
        return b

    def _note_peak(self) -> None:
        self._peak = max(self._peak, self.num_used_blocks)

    def allocate_prompt(self, seq_id: Hashable, token_ids: Sequence[int]) -> int:
        """Start a sequence, sharing every cached full block that prefixes `token_ids`.

        Returns the number of cached tokens (a multiple of block_size, at most len-1); the
        caller must still `append_slots` for the tokens it is about to compute. Hits never fail
        for lack of memory since they reuse blocks already in the pool.
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        hit, hashes = self._lookup(token_ids)
        for b in hit:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
        self._tables[seq_id] = hit
        self._seq_hashes[seq_id] = hashes
        cached = len(hit) * self.block_size
        self._num_tokens[seq_id] = cached
        if self.enable_prefix_caching:
            self.prefix_queried_tokens += len(token_ids)
            self.prefix_hit_tokens += cached
        self._note_peak()
        return cached

    def append_slots(self, seq_id: Hashable, num_new_tokens: int) -> bool:
        """Reserve slots for `num_new_tokens` more tokens, taking blocks only as needed.

        All-or-nothing: returns False and changes nothing when the pool cannot cover it, so the
        scheduler can preempt someone and retry.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        table = self._tables[seq_id]
        total = self._num_tokens[seq_id] + num_new_tokens
        need = self._blocks_needed(total) - len(table)
        if need > self.num_free_blocks:
            return False
        lone = len(self._tables) == 1
        for _ in range(need):
            table.append(self._take_block(table[-1] + 1 if table else 0, lone))
        self._num_tokens[seq_id] = total
        self._note_peak()
        return True

    def mark_computed(
        self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int | None = None
    ) -> None:
        """Register hashes of blocks that became full with computed KV.

        `token_ids` is the sequence's token history; the first `num_computed` (default: all) have
        their KV written. Only called after the model ran, so a hashed block always holds valid
        KV. Work is proportional to newly filled blocks. If another block already holds the same
        content (two requests computed it concurrently), the first stays canonical and this one
        is simply released to the free list later.
        """
        if not self.enable_prefix_caching:
            return
        n = len(token_ids) if num_computed is None else num_computed
        if n > self._num_tokens[seq_id]:
            raise ValueError(f"{n} computed tokens but only {self._num_tokens[seq_id]} slots for {seq_id!r}")
        bs, table, hashes = self.block_size, self._tables[seq_id], self._seq_hashes[seq_id]
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), n // bs):
            h = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            hashes.append(h)
            parent = h
            b = table[i]
            if self._hash_of[b] is None and h not in self._by_hash:
                self._hash_of[b] = h
                self._by_hash[h] = b

    def free(self, seq_id: Hashable) -> None:
        """Release a sequence's blocks now (no-op for unknown ids, so aborts are idempotent).

        Blocks are released tail first, so under LRU eviction the deepest (least shareable)
        blocks of a prefix go before its root.
        """
        table = self._tables.pop(seq_id, None)
        if table is None:
            return
        del self._num_tokens[seq_id], self._seq_hashes[seq_id]
        for b in reversed(table):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash_of[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free[b] = None

    # ---- checking ------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (used by tests)."""

        def fail(msg: str) -> None:
            raise AssertionError(f"BlockManager invariant violated: {msg}")

        counts = [0] * self.num_blocks
        for sid, table in self._tables.items():
            if len(set(table)) != len(table):
                fail(f"{sid!r} references a block twice: {table}")
            if len(table) != self._blocks_needed(self._num_tokens[sid]):
                fail(f"{sid!r} has {len(table)} blocks for {self._num_tokens[sid]} tokens")
            if len(self._seq_hashes[sid]) > self._num_tokens[sid] // self.block_size:
                fail(f"{sid!r} has hashes for blocks that are not full")
            for b in table:
                counts[b] += 1
        if counts != self._ref:
            fail("refcounts do not match block tables")
        free, evict = set(self._free), set(self._evictable)
        if len(free) != len(self._free):
            fail("duplicate block in the free list")
        if free & evict:
            fail(f"blocks both free and evictable: {sorted(free & evict)}")
        for b in range(self.num_blocks):
            in_lists = (b in free) + (b in evict)
            if self._ref[b] > 0 and in_lists:
                fail(f"block {b} is referenced and also free/evictable")
            if self._ref[b] == 0 and in_lists != 1:
                fail(f"block {b} is unreferenced but not free/evictable")
            if b in free and self._hash_of[b] is not None:
                fail(f"free block {b} still has a hash")
            if b in evict and self._hash_of[b] is None:
                fail(f"evictable block {b} has no hash")
        for h, b in self._by_hash.items():
            if self._hash_of[b] != h:
                fail(f"hash index points to block {b} which holds another hash")
        if sum(h is not None for h in self._hash_of) != len(self._by_hash):
            fail("hashed blocks missing from the hash index")
        if self.num_used_blocks > self._peak:
            fail("peak_used_blocks below current usage")
