"""One engine step: packed tokens of many sequences -> graph feeds.

`StepBatch` is the runtime's contract with the engine (see docs/interfaces.md): the tokens of
every sequence scheduled in the step, concatenated with no padding, so one step mixes prefill
chunks of some requests with decodes of others.

`plan_step` groups each sequence's query tokens into attention rows of Qt tokens and assigns the
rows to the graph's attention buckets (see llmc.plugins.attention). Everything here is numpy on
small arrays; it runs once per step, not per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

I64 = np.int64


@dataclass
class SeqSlice:
    """One sequence's share of a step.

    query_start/query_len: its tokens in the packed arrays. context_len: tokens in its KV cache
    after this step (cached + these), i.e. positions of its query tokens end at context_len - 1.
    block_table: its KV blocks; position p lives at block_table[p // block_size].
    """

    query_start: int
    query_len: int
    context_len: int
    block_table: list[int] = field(default_factory=list)


@dataclass
class StepBatch:
    input_ids: np.ndarray        # int64 [T]
    positions: np.ndarray        # int64 [T]
    slot_mapping: np.ndarray     # int64 [T]: block * block_size + offset of each token's new K/V
    seqs: list[SeqSlice]
    logits_indices: np.ndarray   # int64 [S]: packed tokens whose logits are returned, in order

    @property
    def num_tokens(self) -> int:
        return int(len(self.input_ids))


@dataclass
class _Rows:
    qt: int
    starts: list[int]     # first packed token of each row
    lens: list[int]       # real tokens in each row (<= qt)
    nblocks: list[int]    # blocks each row reads
    tables: list[list[int]]

    def cost(self) -> int:
        return len(self.starts) * (self.qt + 4) * (max(self.nblocks) if self.nblocks else 0)


def _choose_qt(qlens: list[int]) -> int:
    """Tokens per prefill row: fewest padded query slots, counting a small per-row overhead."""
    qmax = max(qlens)
    cands = {qmax}
    c = 16
    while c < qmax:
        cands.add(c)
        c *= 2
    return min(cands, key=lambda qt: (sum(-(-q // qt) for q in qlens) * (qt + 4), -qt))


def _split(rows: _Rows) -> tuple[_Rows, _Rows] | None:
    """Split rows into (short, long) context groups at the point of least total work."""
    n = len(rows.starts)
    if n < 2:
        return None
    order = np.argsort(np.asarray(rows.nblocks), kind="stable")
    mb = np.asarray(rows.nblocks)[order]
    ks = np.arange(1, n)
    costs = ks * mb[ks - 1] + (n - ks) * mb[-1]
    k = int(ks[int(np.argmin(costs))])
    if costs.min() >= n * mb[-1]:
        return None

    def take(idx):
        return _Rows(rows.qt, [rows.starts[i] for i in idx], [rows.lens[i] for i in idx],
                     [rows.nblocks[i] for i in idx], [rows.tables[i] for i in idx])
    return take(order[:k]), take(order[k:])


def _rows(batch: StepBatch, block_size: int) -> tuple[_Rows, _Rows]:
    """(decode rows: one per 1-token sequence, prefill rows: Qt-token chunks of the others)."""
    pos = batch.positions
    dec = _Rows(1, [], [], [], [])
    pre_seqs = []
    for s in batch.seqs:
        if s.query_len == 1:
            dec.starts.append(s.query_start)
            dec.lens.append(1)
            dec.nblocks.append(int(pos[s.query_start]) // block_size + 1)
            dec.tables.append(s.block_table)
        elif s.query_len > 1:
            pre_seqs.append(s)
    pre = _Rows(1, [], [], [], [])
    if pre_seqs:
        pre.qt = _choose_qt([s.query_len for s in pre_seqs])
        for s in pre_seqs:
            for r0 in range(0, s.query_len, pre.qt):
                n = min(pre.qt, s.query_len - r0)
                pre.starts.append(s.query_start + r0)
                pre.lens.append(n)
                pre.nblocks.append(int(pos[s.query_start + r0 + n - 1]) // block_size + 1)
                pre.tables.append(s.block_table)
    return dec, pre


def _split_into(rows: _Rows, n: int) -> list[_Rows]:
    """Split rows into at most n groups by context length, each split where it saves most work."""
    groups = [rows]
    while len(groups) < n:
        best = max(range(len(groups)), key=lambda i: groups[i].cost())
        parts = _split(groups[best])
        if parts is None:
            break
        groups[best:best + 1] = list(parts)
    return groups


def plan_rows(batch: StepBatch, block_size: int, kinds: list[str]) -> list[_Rows | None]:
    """Rows for each attention bucket (None: unused this step).

    kinds[b] is "decode" (1-token rows only) or "any". Decode rows go to the decode buckets, split
    by context length so short sequences do not pay for the longest one; prefill rows go to the
    "any" bucket. Without decode buckets every row shares the "any" bucket(s).
    """
    dec, pre = _rows(batch, block_size)
    dec_ids = [b for b, k in enumerate(kinds) if k == "decode"]
    any_ids = [b for b, k in enumerate(kinds) if k != "decode"]
    plan: list[_Rows | None] = [None] * len(kinds)
    if dec_ids:
        if dec.starts:
            for b, grp in zip(dec_ids, _split_into(dec, len(dec_ids))):
                plan[b] = grp
        if pre.starts:
            for b, grp in zip(any_ids, _split_into(pre, len(any_ids))):
                plan[b] = grp
        return plan
    if dec.starts and pre.starts:  # no decode bucket: decode rows ride along, padded to Qt
        rows = _Rows(pre.qt, dec.starts + pre.starts, dec.lens + pre.lens, dec.nblocks + pre.nblocks,
                     dec.tables + pre.tables)
    else:
        rows = dec if dec.starts else pre
    for b, grp in zip(any_ids, _split_into(rows, len(any_ids))):
        plan[b] = grp
    return plan


def step_feeds(batch: StepBatch, block_size: int, kinds: list[str],
               empty_ok: list[bool] | None = None) -> dict[str, np.ndarray]:
    """The graph inputs for one step (pool tensors excluded: they stay bound).

    A bucket with no rows this step gets zero rows where `empty_ok[b]` (its kernels then do
    nothing), else one dummy row (token 0 against block 0, never read back): ONNX Runtime's
    Attention kernel and TensorRT's shape profiles need at least one.
    """
    lone = _lone_decode_feeds(batch, block_size, kinds, empty_ok)
    return lone if lone is not None else _packed_feeds(batch, block_size, kinds, empty_ok)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # shared by every step's feeds (sessions copy them into their bindings)
    return a


_EMPTY_BUCKET = (_frozen(np.zeros(0, I64)), _frozen(np.zeros((0, 1), I64)), _frozen(np.zeros((0, 1), I64)))
_ROW0 = _frozen(np.zeros(1, I64))


def _lone_decode_feeds(batch: StepBatch, block_size: int, kinds: list[str],
                       empty_ok: list[bool] | None) -> dict[str, np.ndarray] | None:
    """`_packed_feeds` of the commonest step, one token of one sequence (every single-stream
    decode step), without the row planning: a dozen array constructions instead of ~80 numpy
    calls (measured 82 -> 17 us per step, about 1.5% of an int4 SmolLM2 token). None for any
    other step, or when the general path has something to say (a short block table)."""
    if (len(batch.seqs) != 1 or len(batch.input_ids) != 1 or batch.seqs[0].query_len != 1
            or kinds[0] != "decode" or not empty_ok or not all(empty_ok[1:])
            or len(batch.positions) != 1 or len(batch.slot_mapping) != 1):
        return None
    seq = batch.seqs[0]
    pos = np.ascontiguousarray(batch.positions, I64)
    nblocks = int(pos[0]) // block_size + 1
    if seq.query_start != 0 or len(seq.block_table) < nblocks:
        return None
    slot = int(batch.slot_mapping[0])
    feeds = {"input_ids": np.ascontiguousarray(batch.input_ids, I64), "positions": pos,
             "kv_write_index": np.array([[slot // block_size, slot % block_size]], I64),
             "logits_index": np.ascontiguousarray(batch.logits_indices, I64),
             "attn_q_index_0": _ROW0, "attn_kv_blocks_0": np.array([seq.block_table[:nblocks]], I64),
             "attn_q_pos_0": pos.reshape(1, 1)}
    for b in range(1, len(kinds)):
        feeds[f"attn_q_index_{b}"], feeds[f"attn_kv_blocks_{b}"], feeds[f"attn_q_pos_{b}"] = _EMPTY_BUCKET
    feeds["attn_out_index"] = _ROW0
    return feeds


def _packed_feeds(batch: StepBatch, block_size: int, kinds: list[str],
                  empty_ok: list[bool] | None = None) -> dict[str, np.ndarray]:
    """`step_feeds` of any step: rows planned into buckets (`plan_rows`)."""
    T = len(batch.input_ids)
    if T == 0:
        raise ValueError("empty step: no tokens")
    if len(batch.positions) != T or len(batch.slot_mapping) != T:
        raise ValueError("input_ids, positions and slot_mapping must have the same length")
    slots = np.asarray(batch.slot_mapping, I64)
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.ascontiguousarray(batch.input_ids, I64),
        "positions": np.ascontiguousarray(batch.positions, I64),
        "kv_write_index": np.stack([slots // block_size, slots % block_size], 1),
        "logits_index": np.ascontiguousarray(batch.logits_indices, I64),
    }
    groups = plan_rows(batch, block_size, kinds)
    out_index = np.zeros(T, I64)
    covered = 0
    offset = 0
    pos = feeds["positions"]
    for b in range(len(kinds)):
        rows = groups[b]
        if rows is not None:
            R, qt, mb = len(rows.starts), rows.qt, max(rows.nblocks)
            blocks = np.zeros((R, mb), I64)
            for r, (n, table) in enumerate(zip(rows.nblocks, rows.tables)):
                if len(table) < n:
                    raise ValueError(f"block table of {len(table)} blocks cannot hold position "
                                     f"{n * block_size - 1} (block size {block_size})")
                blocks[r, :n] = table[:n]
            if qt == 1:
                q_index = np.asarray(rows.starts, I64)
                q_pos = pos[q_index].reshape(R, 1)
                out_index[q_index] = offset + np.arange(R, dtype=I64)
            else:
                starts = np.asarray(rows.starts, I64)[:, None]
                lens = np.asarray(rows.lens, I64)[:, None]
                j = np.arange(qt, dtype=I64)[None, :]
                valid = j < lens
                tok = np.where(valid, starts + j, 0)
                q_index = tok.reshape(-1)
                q_pos = np.where(valid, pos[tok], 0)
                slot_ids = offset + np.arange(R * qt, dtype=I64).reshape(R, qt)
                out_index[tok[valid]] = slot_ids[valid]
            covered += int(sum(rows.lens))
            offset += R * qt
        elif empty_ok and empty_ok[b]:
            q_index, q_pos, blocks = np.zeros(0, I64), np.zeros((0, 1), I64), np.zeros((0, 1), I64)
        else:
            q_index, q_pos, blocks = np.zeros(1, I64), np.zeros((1, 1), I64), np.zeros((1, 1), I64)
            offset += 1
        feeds[f"attn_q_index_{b}"] = q_index
        feeds[f"attn_kv_blocks_{b}"] = blocks
        feeds[f"attn_q_pos_{b}"] = np.ascontiguousarray(q_pos)
    if covered != T:
        raise ValueError(f"sequences cover {covered} tokens but the step has {T}")
    feeds["attn_out_index"] = out_index
    return feeds
