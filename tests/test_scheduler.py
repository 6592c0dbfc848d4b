"""Scheduler tests, asserting on the plain-data SchedulerOutput.

A fake "model" drives the scheduler: it writes every fed token into a paged fake KV store at the
slots the scheduler handed out, and computes each next token as a hash of the full history READ
BACK through the block table. So a request's output equals running it alone only if chunking,
prefix sharing, preemption/recomputation and slot mapping are all right.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llmc.errors import LlmcError
from llmc.runtime.kv_blocks import BlockManager
from llmc.runtime.scheduler import Request, RequestStatus, Scheduler, SchedulerOutput

VOCAB = 50


def next_token(history) -> int:
    return zlib.crc32(np.asarray(history, dtype=np.int64).tobytes()) % VOCAB


def solo(prompt, max_new_tokens, max_seq_len, eos=()):
    """The request run alone, without any KV cache: the ground truth."""
    toks, out = list(prompt), []
    while True:
        t = next_token(toks)
        out.append(t)
        toks.append(t)
        if t in eos:
            return out, "stop"
        if len(out) >= max_new_tokens or len(toks) >= max_seq_len:
            return out, "length"


class FakeModel:
    def __init__(self, bm: BlockManager):
        self.bs = bm.block_size
        self.tok = np.full(bm.num_blocks * bm.block_size, -1, dtype=np.int64)
        self.pos = np.full_like(self.tok, -1)

    def step(self, out: SchedulerOutput) -> dict:
        sampled = {}
        for rid, s in out.scheduled.items():
            n = s.num_tokens
            assert out.num_scheduled_tokens[rid] == n >= 1
            assert s.positions == list(range(s.num_computed_tokens, s.context_len))
            assert len(s.slot_mapping) == n and s.context_len == s.num_computed_tokens + n
            assert len(s.block_table) == -(-s.context_len // self.bs)
            for p, slot in zip(s.positions, s.slot_mapping):
                assert slot == s.block_table[p // self.bs] * self.bs + p % self.bs
            self.tok[s.slot_mapping] = s.token_ids
            self.pos[s.slot_mapping] = s.positions
        for rid, s in out.scheduled.items():
            if s.needs_logits:
                slots = [s.block_table[p // self.bs] * self.bs + p % self.bs for p in range(s.context_len)]
                assert list(self.pos[slots]) == list(range(s.context_len)), f"{rid}: KV corrupted"
                sampled[rid] = next_token(self.tok[slots])
        return sampled


def run(sched: Scheduler, arrivals: dict[int, list[Request]], max_steps=5000, on_step=None, model=None):
    """Engine loop; returns ({request_id: finished Request}, [SchedulerOutput...])."""
    model, done, outputs = model or FakeModel(sched.block_manager), {}, []
    last_arrival = max(arrivals, default=0)
    for step in range(max_steps):
        for req in arrivals.get(step, []):
            sched.add_request(req)
        if step > last_arrival and not sched.has_unfinished():
            for r in sched.update(sched.schedule(), {}):
                done[r.request_id] = r
            return done, outputs
        out = sched.schedule()
        assert len(out.scheduled) <= sched.max_batch_size
        assert out.total_num_tokens <= sched.max_num_tokens
        assert not set(out.preempted_ids) & set(out.scheduled)
        outputs.append(out)
        if on_step:
            on_step(out)
        for r in sched.update(out, model.step(out)):
            done[r.request_id] = r
        sched.check_invariants()
    raise AssertionError("scheduler did not finish")


def make(rid, prompt, max_new=5, eos=()):
    return Request(rid, list(prompt), max_new_tokens=max_new, eos_token_ids=frozenset(eos))


def assert_matches_solo(done, reqs, max_seq_len):
    for r in reqs:
        got = done[r.request_id]
        exp_out, exp_reason = solo(r.prompt_token_ids, r.max_new_tokens, max_seq_len, r.eos_token_ids)
        assert got.status is RequestStatus.FINISHED
        assert (got.output_token_ids, got.finish_reason) == (exp_out, exp_reason), r.request_id


def test_budgets_respected_and_outputs_match_solo():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_batch_size=3, max_num_tokens=7, max_seq_len=64)
    rng = np.random.default_rng(0)
    reqs = [
        make(i, rng.integers(0, VOCAB, size=int(rng.integers(1, 20))), max_new=int(rng.integers(1, 8)))
        for i in range(10)
    ]
    done, outputs = run(sched, {0: reqs[:5], 3: reqs[5:]})
    assert_matches_solo(done, reqs, 64)
    assert max(len(o.scheduled) for o in outputs) == 3
    assert max(o.total_num_tokens for o in outputs) == 7
    assert bm.num_used_blocks == 0


def test_chunked_prefill_mixes_with_decode():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=6, max_seq_len=64)
    a = make("a", [1, 2, 3], max_new=20)
    b = make("b", list(range(10, 30)), max_new=2)  # 20 tokens: 4 chunks at most
    sched.add_request(a)
    model = FakeModel(bm)
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 3} and out.scheduled["a"].needs_logits
    sched.update(out, model.step(out))
    sched.add_request(b)
    chunks = []
    for _ in range(4):
        out = sched.schedule()
        assert out.num_scheduled_tokens["a"] == 1 and out.scheduled["a"].needs_logits  # decode goes on
        s = out.scheduled["b"]
        chunks.append((s.num_computed_tokens, s.num_tokens, s.needs_logits))
        sched.update(out, model.step(out))
    assert chunks == [(0, 5, False), (5, 5, False), (10, 5, False), (15, 5, True)]
    assert out.scheduled["b"].is_prefill and not out.scheduled["a"].is_prefill


def test_prefill_budget_chunks_a_burst_and_never_holds_back_decodes():
    """At most `prefill_budget` prompt tokens per step; running decodes always go on; requests
    get their first token in arrival order, the first after one small step."""
    bm = BlockManager(num_blocks=256, block_size=4)
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=64, max_seq_len=64, prefill_budget=6)
    reqs = [make(i, list(range(10 * i + 1, 10 * i + 11)), max_new=6) for i in range(5)]
    first_token_step: dict = {}

    def check(out):
        prompt = sum(s.num_tokens for s in out.scheduled.values() if s.is_prefill)
        assert prompt <= 6
        for rid, s in out.scheduled.items():
            if s.needs_logits:
                first_token_step.setdefault(rid, out.step)
        decoding = [r.request_id for r in sched.running if r.num_computed_tokens == r.num_tokens - 1
                    and r.output_token_ids]
        assert set(decoding) <= set(out.scheduled)  # no decode held back by the budget

    done, outputs = run(sched, {0: reqs}, on_step=check)
    assert_matches_solo(done, reqs, 64)
    steps = [first_token_step[r.request_id] for r in reqs]
    assert steps == sorted(steps) and steps[0] == 2  # 10 prompt tokens: chunks of 6 + 4
    with pytest.raises(LlmcError):
        Scheduler(bm, 8, 64, 64, prefill_budget=0)


def test_fcfs_admission_order_and_batch_limit():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_batch_size=2, max_num_tokens=100, max_seq_len=64)
    reqs = [make(f"r{i}", [i, i + 1], max_new=3 + i) for i in range(5)]
    done, outputs = run(sched, {0: reqs[:3], 1: reqs[3:]})
    admitted = [rid for o in outputs for rid in o.scheduled_new_ids]
    assert admitted == [r.request_id for r in reqs]
    first_step = {rid: i for i, o in reversed(list(enumerate(outputs))) for rid in o.scheduled_new_ids}
    finish_step = {rid: i for i, o in enumerate(outputs) for rid in o.finished_ids}
    # r2 only starts after r0 (the first to finish) has left the batch.
    assert first_step["r2"] >= finish_step["r0"]
    assert_matches_solo(done, reqs, 64)


def test_waiting_request_blocks_later_ones_fcfs():
    """A big head-of-queue request is not overtaken by a small later one."""
    bm = BlockManager(num_blocks=6, block_size=2)
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=64, max_seq_len=12, chunked_prefill=False)
    a = make("a", [1] * 7, max_new=4)  # 4 blocks now, 6 at the end
    b = make("b", [2] * 9, max_new=1)  # 5 blocks: cannot start while "a" runs
    c = make("c", [3], max_new=1)  # would fit, but arrived after b
    done, outputs = run(sched, {0: [a], 1: [b, c]})
    admitted = [rid for o in outputs for rid in o.scheduled_new_ids]
    assert admitted.index("b") < admitted.index("c")
    assert_matches_solo(done, [a, b, c], 12)


def test_preemption_under_tiny_pool_recovers():
    bs, max_seq_len = 2, 24
    bm = BlockManager(num_blocks=12, block_size=bs)  # one max-length sequence fits, not many
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=16, max_seq_len=max_seq_len)
    system = [40, 41, 42, 43, 44]
    reqs = [make(f"r{i}", system + [i] * (i % 3 + 1), max_new=12) for i in range(6)]
    reqs.append(make("long", list(range(20)), max_new=10))
    preempted = []
    done, outputs = run(
        sched, {0: reqs[:3], 2: reqs[3:5], 5: reqs[5:]}, on_step=lambda o: preempted.extend(o.preempted_ids)
    )
    assert preempted, "pool should have been too small"
    assert_matches_solo(done, reqs, max_seq_len)
    assert any(done[rid].num_preemptions for rid in preempted)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks
    assert bm.peak_used_blocks <= bm.num_blocks


def test_preempts_newest_and_requeues_at_front_in_arrival_order():
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=64, max_seq_len=8)
    reqs = [make(f"r{i}", [i, i + 10, i + 20], max_new=4) for i in range(3)]  # 2 blocks each
    late = make("late", [9], max_new=1)
    model = FakeModel(bm)
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    assert out.scheduled_new_ids == ["r0", "r1"]  # r2 does not fit
    sched.update(out, model.step(out))
    out = sched.schedule()  # 4th tokens still fit in their second blocks
    assert not out.preempted_ids
    sched.update(out, model.step(out))
    sched.add_request(late)
    out = sched.schedule()  # both need a third block for their 5th token: r1 (newest) goes
    assert out.preempted_ids == ["r1"] and list(out.scheduled) == ["r0"]
    assert [r.request_id for r in sched.waiting] == ["r1", "r2", "late"]
    assert reqs[1].status is RequestStatus.PREEMPTED and reqs[1].num_computed_tokens == 0
    sched.update(out, model.step(out))
    sched.check_invariants()
    done, _ = run(sched, {}, model=model)
    assert_matches_solo(done, reqs + [late], 8)


def test_prefix_cache_hit_skips_computation():
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=64, max_seq_len=64)
    prompt = list(range(13))
    first = make("first", prompt, max_new=1)
    second = make("second", prompt + [99], max_new=3)
    done, outputs = run(sched, {0: [first], 3: [second]})
    s = next(o.scheduled["second"] for o in outputs if "second" in o.scheduled_new_ids)
    assert s.num_computed_tokens == 12 and s.num_tokens == 2
    assert done["second"].num_cached_tokens == 12
    assert_matches_solo(done, [first, second], 64)


def test_impossible_requests_fail_instead_of_looping():
    bm = BlockManager(num_blocks=4, block_size=2)  # holds 8 tokens
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=16, max_seq_len=16)
    too_long = make("too_long", [1] * 16)  # no room below max_seq_len
    too_big = make("too_big", [1] * 9)  # more than the whole pool
    grows = make("grows", [1] * 6, max_new=10)  # fits at first, then outgrows the pool
    ok = make("ok", [2, 3], max_new=2)
    empty = make("empty", [])
    done, _ = run(sched, {0: [too_long, too_big, grows, empty], 1: [ok]})
    for rid in ("too_long", "too_big", "grows", "empty"):
        assert done[rid].finish_reason == "error" and done[rid].error, rid
    assert "max_seq_len" in done["too_long"].error and "KV cache" in done["too_big"].error
    assert len(done["grows"].output_token_ids) >= 1
    assert done["ok"].finish_reason == "length" and len(done["ok"].output_token_ids) == 2
    assert bm.num_used_blocks == 0


def test_eos_and_max_seq_len_finish():
    prompt = [5, 6, 7]
    eos = solo(prompt, 10, 100)[0][2]  # make the third generated token an EOS
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=32, max_seq_len=8)
    a = make("a", prompt, max_new=10, eos=[eos])
    b = make("b", [1, 2, 3], max_new=100)  # capped by max_seq_len
    done, _ = run(sched, {0: [a, b]})
    assert done["a"].finish_reason == "stop" and done["a"].output_token_ids[-1] == eos
    assert done["b"].finish_reason == "length" and done["b"].num_tokens == 8
    assert_matches_solo(done, [a, b], 8)


def test_finish_request_frees_blocks_even_mid_step():
    bm = BlockManager(num_blocks=16, block_size=2)
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=32, max_seq_len=32)
    model = FakeModel(bm)
    a, b = make("a", [1, 2, 3], max_new=10), make("b", [4, 5, 6], max_new=10)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.update(out, model.step(out))
    out = sched.schedule()
    assert sched.finish_request("a", "stop")  # e.g. a stop string seen while the step runs
    assert not bm.has_seq("a")
    finished = sched.update(out, model.step(out))
    assert [r.request_id for r in finished] == ["a"] and a.output_token_ids == solo([1, 2, 3], 1, 32)[0]
    assert not sched.finish_request("a")
    assert sched.schedule().finished_ids == ["a"]


def test_aborted_id_reused_before_update_is_not_confused():
    bm = BlockManager(num_blocks=16, block_size=2)
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=32, max_seq_len=32)
    model = FakeModel(bm)
    sched.add_request(make("a", [1, 2, 3], max_new=3))
    out = sched.schedule()
    sched.finish_request("a", "abort")
    again = make("a", [7, 8], max_new=2)
    sched.add_request(again)
    sched.update(out, model.step(out))
    assert again.output_token_ids == [] and again.status is RequestStatus.WAITING
    done, _ = run(sched, {}, model=model)
    assert_matches_solo(done, [again], 32)


def test_no_chunked_prefill_feeds_whole_prompt():
    bm = BlockManager(num_blocks=64, block_size=4)
    with pytest.raises(LlmcError):
        Scheduler(bm, max_batch_size=4, max_num_tokens=8, max_seq_len=32, chunked_prefill=False)
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=32, max_seq_len=32, chunked_prefill=False)
    reqs = [make("a", range(20), max_new=3), make("b", range(30, 50), max_new=3)]
    done, outputs = run(sched, {0: reqs})
    for o in outputs:
        for s in o.scheduled.values():
            assert s.needs_logits  # never a partial prompt
    assert_matches_solo(done, reqs, 32)


def test_step_batch_matches_per_request_view():
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=10, max_seq_len=64)
    model = FakeModel(bm)
    sched.add_request(make("a", [1, 2, 3], max_new=5))
    out = sched.schedule()
    sched.update(out, model.step(out))
    sched.add_request(make("b", list(range(20)), max_new=5))
    out = sched.schedule()  # a decodes (1 token), b prefills a 9-token chunk without logits
    sb = out.step_batch()
    assert [(s.query_start, s.query_len) for s in sb.seqs] == [(0, 1), (1, 9)]
    assert list(sb.input_ids) == out.scheduled["a"].token_ids + out.scheduled["b"].token_ids
    assert list(sb.slot_mapping) == out.scheduled["a"].slot_mapping + out.scheduled["b"].slot_mapping
    assert list(sb.positions[:2]) == [3, 0] and [s.context_len for s in sb.seqs] == [4, 9]
    assert [s.block_table for s in sb.seqs] == [out.scheduled["a"].block_table, out.scheduled["b"].block_table]
    assert list(sb.logits_indices) == [0] and out.logits_request_ids == ["a"]
    sched.update(out, model.step(out))
    empty = Scheduler(bm, 1, 1, 8).schedule().step_batch()
    assert empty.input_ids.shape == (0,) and empty.logits_indices.shape == (0,)


def test_protocol_errors():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=32, max_seq_len=32)
    sched.add_request(make("a", [1, 2]))
    with pytest.raises(ValueError):
        sched.add_request(make("a", [1]))
    out = sched.schedule()
    with pytest.raises(RuntimeError):
        sched.schedule()
    with pytest.raises(ValueError):
        sched.update(out, {})  # "a" needed a token
    sched.update(out, {"a": 1})
    with pytest.raises(RuntimeError):
        sched.update(out, {"a": 1})  # applying a step twice would corrupt the KV bookkeeping


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    block_size=st.sampled_from([1, 2, 4]),
    max_seq_len=st.integers(8, 24),
    max_batch_size=st.integers(1, 5),
    max_num_tokens=st.integers(1, 24),
    caching=st.booleans(),
    n_req=st.integers(1, 8),
)
def test_random_workloads_match_solo(data, block_size, max_seq_len, max_batch_size, max_num_tokens, caching, n_req):
    # The pool always fits one max-length sequence, so everything must finish normally.
    min_blocks = -(-max_seq_len // block_size)
    num_blocks = data.draw(st.integers(min_blocks, 2 * min_blocks), label="num_blocks")
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    budget = data.draw(st.one_of(st.none(), st.integers(1, 8)), label="prefill_budget")
    sched = Scheduler(bm, max_batch_size, max_num_tokens, max_seq_len, prefill_budget=budget)
    prefixes = [[], [3, 1, 4, 1, 5], [3, 1, 4, 2]]
    arrivals: dict[int, list[Request]] = {}
    reqs = []
    for i in range(n_req):
        prefix = data.draw(st.sampled_from(prefixes), label="prefix")
        room = max_seq_len - 1 - len(prefix)
        suffix = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=room), label="suffix")
        r = make(i, prefix + suffix, max_new=data.draw(st.integers(1, 12), label="max_new"))
        reqs.append(r)
        arrivals.setdefault(data.draw(st.integers(0, 6), label="arrival"), []).append(r)
    done, outputs = run(sched, arrivals)
    assert_matches_solo(done, reqs, max_seq_len)
    assert bm.num_used_blocks == 0
    if budget is not None:
        assert all(sum(s.num_tokens for s in o.scheduled.values() if s.is_prefill) <= budget for o in outputs)
    event(f"preempted={any(o.preempted_ids for o in outputs)}")
    event(f"prefix hit={bm.prefix_hit_tokens > 0}")
    event(f"chunked={any(s.is_prefill and not s.needs_logits for o in outputs for s in o.scheduled.values())}")
