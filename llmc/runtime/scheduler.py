"""Iteration-level (continuous / in-flight) batching scheduler, after vLLM v1.

Each call to `schedule()` decides, for one model step, how many tokens every request feeds; the
result is plain data (`SchedulerOutput`) so the engine loop, tests and benchmarks can read it
without touching scheduler internals. There is no separate "prefill phase": a request just has
`num_tokens - num_computed_tokens` tokens left to feed, which is the rest of its prompt (fed in
chunks that fit the token budget, mixed with other requests' decodes) or one token when decoding.

Policy, and why:
- FCFS. Running requests (arrival order) are served first so started work finishes and frees its
  blocks; then waiting requests are admitted in arrival order, stopping at the first that does not
  fit (no overtaking, so a long prompt cannot starve).
- Budgets: at most `max_batch_size` sequences and `max_num_tokens` fed tokens per step, and
  optionally at most `prefill_budget` prompt tokens per step (decode tokens are not counted), as
  vLLM's chunked prefill does with max_num_batched_tokens. A burst of long prompts then enters in
  small chunks interleaved with the running decodes instead of a few max_num_tokens-sized steps:
  the first requests get their first token after one small step, later ones in arrival order, and
  running streams keep a bounded inter-token latency (see README, serving; bench_runtime shows both
  policies). Off (None): prompts fill whatever max_num_tokens leaves.
- Out of KV blocks while serving a running request: preempt the most recently arrived running
  request (it has done the least work under FCFS), free its blocks and put it back at the front of
  the waiting queue. It later recomputes prompt + generated tokens (prefix-cache hits make that
  cheap), so greedy output is unchanged. No new requests are admitted in a step that preempted.
- Requests that can never fit (prompt too long for `max_seq_len` or for the whole pool) are
  finished with finish_reason="error" instead of being retried forever.

Invariant (checked by `check_invariants`): both queues are sorted by arrival and every running
request arrived before every waiting one, so "preempt running[-1]" is "preempt the newest" and
"re-queue at the front" keeps arrival order.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Hashable, Mapping

import numpy as np

from llmc.errors import LlmcError
from llmc.runtime.kv_blocks import BlockManager

if TYPE_CHECKING:  # pragma: no cover
    from llmc.engine.step import StepBatch


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue; recomputes from scratch when resumed
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One generation request. `sampling_params` is opaque to the scheduler.

    EOS handling lives here as a plain id set (empty it to ignore EOS) so the scheduler never has
    to understand sampling parameters. `arrival` is assigned by `Scheduler.add_request`.
    """

    request_id: Hashable
    prompt_token_ids: list[int]
    max_new_tokens: int
    sampling_params: Any = None
    eos_token_ids: frozenset[int] = frozenset()
    arrival: int = -1
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "error" | "abort" | caller's own
    error: str | None = None
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prefix-cache hit at the latest admission (metrics)
    num_preemptions: int = 0
    _tokens: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = [int(t) for t in self.prompt_token_ids]
        self.output_token_ids = [int(t) for t in self.output_token_ids]
        self.eos_token_ids = frozenset(int(t) for t in self.eos_token_ids)
        self._tokens = self.prompt_token_ids + self.output_token_ids

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + generated tokens (live list, kept incrementally; do not mutate)."""
        return self._tokens

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._tokens.append(token_id)


@dataclass
class ScheduledRequest:
    """What the model must do for one request in this step."""

    request_id: Hashable
    token_ids: list[int]  # tokens to feed
    positions: list[int]  # their absolute positions
    slot_mapping: list[int]  # KV slot per fed token: block_id * block_size + offset
    block_table: list[int]  # blocks covering positions [0, context_len)
    num_computed_tokens: int  # KV already cached before this step (start position)
    context_len: int  # tokens in the KV cache after this step (attention length)
    needs_logits: bool  # chunk ends at the last known token: sample the next one

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_prefill(self) -> bool:
        return self.num_tokens > 1 or not self.needs_logits


@dataclass
class SchedulerOutput:
    """Plain-data result of one `schedule()` call."""

    step: int
    num_scheduled_tokens: dict[Hashable, int]  # {request_id: tokens fed this step}
    scheduled: dict[Hashable, ScheduledRequest]  # same keys; running requests first, then new
    scheduled_new_ids: list[Hashable]  # admitted from the waiting queue (incl. resumed after preemption)
    preempted_ids: list[Hashable]  # blocks freed this step; they will recompute later
    finished_ids: list[Hashable]  # finished since the previous schedule(): drop per-request state

    @property
    def total_num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def logits_request_ids(self) -> list[Hashable]:
        """Requests that need a sampled token from this step, in `scheduled` order."""
        return [rid for rid, s in self.scheduled.items() if s.needs_logits]

    def step_batch(self) -> StepBatch:
        """The engine step for this output: all scheduled tokens concatenated (no padding).

        Row i of the engine's logits belongs to `logits_request_ids[i]`: the last fed token of
        each request that needs logits. The only path from a schedule to the engine (LLM.step).
        """
        from llmc.engine.step import SeqSlice, StepBatch

        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        seqs, rows = [], []
        for s in self.scheduled.values():
            start = len(ids)
            ids += s.token_ids
            pos += s.positions
            slots += s.slot_mapping
            seqs.append(SeqSlice(start, s.num_tokens, s.context_len, s.block_table))
            if s.needs_logits:
                rows.append(len(ids) - 1)
        i64 = np.int64
        return StepBatch(np.array(ids, i64), np.array(pos, i64), np.array(slots, i64), seqs, np.array(rows, i64))


class Scheduler:
    """FCFS continuous-batching scheduler over a `BlockManager` it drives exclusively.

    Loop: `add_request()` any time; `out = schedule()`; run the model on `out`; sample for
    `out.logits_request_ids`; `update(out, {request_id: token})`. Only `update()` advances
    request state, so a step's plan can be inspected or discarded freely until then.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        max_batch_size: int,
        max_num_tokens: int,
        max_seq_len: int,
        chunked_prefill: bool = True,
        prefill_budget: int | None = None,
    ):
        if min(max_batch_size, max_num_tokens, max_seq_len) <= 0:
            raise LlmcError(
                f"max_batch_size ({max_batch_size}), max_num_tokens ({max_num_tokens}) and "
                f"max_seq_len ({max_seq_len}) must all be positive"
            )
        if not chunked_prefill and max_num_tokens < max_seq_len:
            # Without chunking a whole (re)computed sequence must fit in one step's budget.
            raise LlmcError(
                f"max_num_tokens ({max_num_tokens}) must be >= max_seq_len ({max_seq_len}) "
                "when chunked prefill is off"
            )
        if prefill_budget is not None and (prefill_budget < 1 or not chunked_prefill):
            raise LlmcError(f"prefill budget must be >= 1 prompt tokens per step and needs chunked prefill, "
                            f"got {prefill_budget}")
        self.block_manager = block_manager
        self.prefill_budget = prefill_budget
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.max_seq_len = max_seq_len
        self.chunked_prefill = chunked_prefill
        self.waiting: list[Request] = []  # sorted by arrival
        self.running: list[Request] = []  # sorted by arrival
        self._requests: dict[Hashable, Request] = {}  # unfinished requests
        self._arrivals = itertools.count()
        self._step = 0
        self._awaiting_update = False
        self._finished_for_schedule: list[Hashable] = []
        self._finished_for_update: list[Request] = []

    # ---- queries -------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def get_request(self, request_id: Hashable) -> Request | None:
        """An unfinished request by id (None once finished)."""
        return self._requests.get(request_id)

    # ---- request lifecycle ---------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a request (allowed between any two steps).

        A request that can never run is finished at once with finish_reason="error"; it shows up
        in the next `update()` return value and `finished_ids`.
        """
        if req.request_id in self._requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        req.arrival = next(self._arrivals)
        req.status = RequestStatus.WAITING
        error = self._admission_error(req)
        if error:
            self._finish(req, "error", error)
            return
        self._requests[req.request_id] = req
        self.waiting.append(req)  # newest arrival: the end keeps the queue sorted

    def _admission_error(self, req: Request) -> str | None:
        n = req.num_tokens
        bm = self.block_manager
        if req.num_prompt_tokens == 0:
            return "empty prompt"
        if req.max_new_tokens < 1:
            return f"max_new_tokens must be >= 1, got {req.max_new_tokens}"
        if n >= self.max_seq_len:
            return f"prompt has {n} tokens; max_seq_len {self.max_seq_len} leaves no room to generate"
        if -(-n // bm.block_size) > bm.num_blocks:
            return (
                f"prompt has {n} tokens but the KV cache holds only "
                f"{bm.num_blocks * bm.block_size} ({bm.num_blocks} blocks of {bm.block_size})"
            )
        return None

    def finish_request(self, request_id: Hashable, reason: str = "stop", error: str | None = None) -> bool:
        """Finish a request now (stop string found, client abort...) and free its blocks.

        Safe between `schedule()` and `update()`: the in-flight result is then ignored.
        Returns False if the request is unknown or already finished.
        """
        req = self._requests.get(request_id)
        if req is None:
            return False
        self._finish(req, reason, error)
        return True

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.block_manager.free(req.request_id)
        self._requests.pop(req.request_id, None)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.error = error
        self._finished_for_schedule.append(req.request_id)
        self._finished_for_update.append(req)

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req.request_id)
        self.running.remove(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        bisect.insort(self.waiting, req, key=lambda r: r.arrival)

    # ---- one step ------------------------------------------------------------------------
    def _scheduled(self, req: Request, n: int) -> ScheduledRequest:
        start, end = req.num_computed_tokens, req.num_computed_tokens + n
        bm = self.block_manager
        return ScheduledRequest(
            request_id=req.request_id,
            token_ids=req.all_token_ids[start:end],
            positions=list(range(start, end)),
            slot_mapping=bm.slot_mapping(req.request_id, start, end),
            block_table=list(bm.block_table(req.request_id)),
            num_computed_tokens=start,
            context_len=end,
            needs_logits=end == req.num_tokens,
        )

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work. Must be followed by `update()` if anything was scheduled."""
        if self._awaiting_update:
            raise RuntimeError("schedule() called again before update() consumed the previous step")
        self._step += 1
        bm = self.block_manager
        budget = self.max_num_tokens
        prefill_left = self.prefill_budget or budget  # prompt tokens still allowed this step
        scheduled: dict[Hashable, ScheduledRequest] = {}
        new_ids: list[Hashable] = []
        preempted: list[Hashable] = []

        # 1) Running requests, oldest first: continuing prefill chunks and decodes.
        i = 0
        while i < len(self.running) and budget > 0 and len(scheduled) < self.max_batch_size:
            req = self.running[i]
            left = req.num_tokens - req.num_computed_tokens
            prompt = left > 1  # a prompt chunk (a decode feeds one token and is never held back)
            n = min(left, budget)
            if prompt:
                n = min(n, prefill_left)
                if n == 0:
                    i += 1
                    continue
            while not bm.append_slots(req.request_id, n):
                victim = self.running[-1]
                if victim is req and i == 0:
                    # Nothing older holds blocks and nothing newer is left: it cannot ever fit.
                    self._finish(
                        req,
                        "error",
                        f"sequence reached {req.num_computed_tokens + n} tokens but the KV cache "
                        f"holds only {bm.num_blocks * bm.block_size}",
                    )
                    break
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled[req.request_id] = self._scheduled(req, n)
                budget -= n
                if prompt:
                    prefill_left -= n
                i += 1

        # 2) Waiting requests in arrival order, unless memory was just too tight.
        while (
            not preempted
            and self.waiting
            and min(budget, prefill_left) > 0
            and len(scheduled) < self.max_batch_size
        ):
            req = self.waiting[0]
            tokens = req.all_token_ids  # after preemption: prompt + generated, recomputed
            cached = bm.lookup_prefix(tokens)
            n = len(tokens) - cached
            if n > budget and not self.chunked_prefill:
                break
            n = min(n, budget, prefill_left)
            if not bm.can_allocate(tokens, n):
                # Defensive: with add_request's checks this is unreachable today, but a request
                # that does not fit in an empty pool must fail rather than block the queue forever.
                if not self.running:
                    self._finish(
                        req,
                        "error",
                        f"sequence of {len(tokens)} tokens does not fit in the KV cache "
                        f"({bm.num_blocks} blocks of {bm.block_size})",
                    )
                    continue
                break
            bm.allocate_prompt(req.request_id, tokens)
            if not bm.append_slots(req.request_id, n):
                raise AssertionError("can_allocate() promised blocks that append_slots() refused")
            self.waiting.pop(0)
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = cached
            req.num_cached_tokens = cached
            self.running.append(req)  # newest running request: keeps the list sorted
            scheduled[req.request_id] = self._scheduled(req, n)
            new_ids.append(req.request_id)
            budget -= n
            prefill_left -= n

        finished, self._finished_for_schedule = self._finished_for_schedule, []
        self._awaiting_update = bool(scheduled)
        return SchedulerOutput(
            step=self._step,
            num_scheduled_tokens={rid: s.num_tokens for rid, s in scheduled.items()},
            scheduled=scheduled,
            scheduled_new_ids=new_ids,
            preempted_ids=preempted,
            finished_ids=finished,
        )

    def update(self, output: SchedulerOutput, sampled_tokens: Mapping[Hashable, int]) -> list[Request]:
        """Apply a step's results; returns every request finished since the previous update().

        `sampled_tokens` must hold a token for each scheduled request with `needs_logits`
        (others are ignored). Finishing on EOS / max_new_tokens / max_seq_len happens here and
        frees blocks at once; stop strings are the caller's job via `finish_request`.
        """
        if output.step != self._step or (output.scheduled and not self._awaiting_update):
            raise RuntimeError(f"stale or already applied scheduler output (step {output.step})")
        live = [
            (req, s)
            for rid, s in output.scheduled.items()
            # else finished (aborted) while the step ran, possibly with its id already reused
            if (req := self._requests.get(rid)) is not None and req.status is RequestStatus.RUNNING
        ]
        missing = [req.request_id for req, s in live if s.needs_logits and req.request_id not in sampled_tokens]
        if missing:  # checked before touching any state
            raise ValueError(f"no sampled token for requests that needed logits: {missing}")
        self._awaiting_update = False
        bm = self.block_manager
        for req, s in live:
            rid = req.request_id
            req.num_computed_tokens = s.context_len
            bm.mark_computed(rid, req.all_token_ids, s.context_len)
            if not s.needs_logits:
                continue
            tok = int(sampled_tokens[rid])
            req.append_output(tok)
            if tok in req.eos_token_ids:
                self._finish(req, "stop")
            elif len(req.output_token_ids) >= req.max_new_tokens or req.num_tokens >= self.max_seq_len:
                self._finish(req, "length")
        return self.pop_finished()

    def pop_finished(self) -> list[Request]:
        """Requests finished outside `update()` (finish_request, admission errors) and not yet
        returned by it. The engine loop calls this after every step, so a request ended by a
        stop string is handed back even when nothing is left to schedule."""
        done, self._finished_for_update = self._finished_for_update, []
        return done

    # ---- checking ------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError on inconsistent state (used by tests)."""
        self.block_manager.check_invariants()
        arr = [r.arrival for r in self.running]
        warr = [r.arrival for r in self.waiting]
        assert arr == sorted(arr), f"running not in arrival order: {arr}"
        assert warr == sorted(warr), f"waiting not in arrival order: {warr}"
        assert not arr or not warr or arr[-1] < warr[0], "a waiting request arrived before a running one"
        live = {r.request_id for r in itertools.chain(self.running, self.waiting)}
        assert live == set(self._requests), "request index out of sync with the queues"
        for r in self.running:
            assert r.status is RequestStatus.RUNNING
            assert self.block_manager.has_seq(r.request_id)
            assert r.num_computed_tokens < r.num_tokens
        for r in self.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert not self.block_manager.has_seq(r.request_id)
