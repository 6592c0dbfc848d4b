"""The serving core: one thread owns the `LLM` and steps it; frontends only submit and listen.

    loop = EngineLoop(LLM(engine_dir), max_queue=256)
    loop.start()                                   # warms the engine up, then runs the thread
    rid = loop.submit("Hello", SamplingParams(max_tokens=16), sink)
    loop.abort(rid)                                # a client went away
    loop.shutdown(drain=True)

Why a thread and callbacks: the engine step is one blocking ONNX Runtime call (which releases the
GIL), and the runtime is not thread-safe, so exactly one thread must drive it. Requests that arrive
at any moment are queued under a lock and join the running batch at the next step (in-flight
batching across clients). Each request has a *sink*, a callable that the loop thread calls with a
`TokenEvent` once per step in which the request produced text or finished; sinks must not block
(an asyncio frontend hands the event to its event loop with `call_soon_threadsafe`; Triton's
Python backend sends a response).

Tokenisation of a submitted prompt happens in the caller's thread, so a prompt the engine cannot
take is refused synchronously (HTTP 400) instead of as a late event. Submitters use their own
tokenizer instance (Hugging Face fast tokenizers are not safe to share across threads, and the
loop thread's detokenises during every step), so a submit never waits for a step.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from llmc.errors import LlmcError
from llmc.runtime.llm import LLM, RequestOutput, encode_prompt
from llmc.runtime.sampling import SamplingParams


# What `EngineLoop.stats()` reports, for every metrics exporter (llmc serve's /metrics names them
# like vLLM under `llmc:`, the Triton backend under `llmc_`): (stats key, help, kind, name for
# llmc serve, name for Triton). requests_finished (by reason) is exported separately.
ENGINE_STATS = [
    ("num_running", "Requests in the running batch.", "gauge", "num_requests_running", "num_running"),
    ("num_waiting", "Requests waiting for a batch slot.", "gauge", "num_requests_waiting", "num_waiting"),
    ("kv_blocks_used", "KV cache blocks held by requests.", "gauge", "kv_blocks_used", "kv_blocks_used"),
    ("kv_blocks_total", "KV cache blocks in the pool.", "gauge", "kv_blocks_total", "kv_blocks_total"),
    ("prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.", "counter",
     "prefix_cache_hit_tokens", "prefix_cache_hit_tokens"),
    ("num_preemptions", "Requests preempted (recomputed later) for lack of KV blocks.", "counter",
     "num_preemptions", "num_preemptions"),
    ("steps", "Engine iterations run.", "counter", "engine_steps", "steps"),
    ("prompt_tokens_total", "Prompt tokens of admitted requests.", "counter", "prompt_tokens", "prompt_tokens"),
    ("generation_tokens_total", "Tokens generated.", "counter", "generation_tokens", "generation_tokens"),
]


class QueueFull(LlmcError):
    """More requests are waiting than the server admits (--max-queue): retry later (HTTP 503)."""


class ShuttingDown(QueueFull):
    """The loop stopped accepting requests."""


@dataclass
class TokenEvent:
    """What one step produced for one request (see ENGINE_LOOP contract in the module docstring).

    Concatenating the `text` of all of a request's events gives exactly its final output text:
    text that could still become a stop string is held back, text after a stop string is never
    sent.
    """

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict] | None = None
    finished: bool = False
    output: RequestOutput | None = None


Sink = Callable[[TokenEvent], None]


@dataclass
class _Submission:
    request_id: str
    token_ids: list[int]
    prompt: str | None
    params: SamplingParams
    sink: Sink
    arrival_time: float


class EngineLoop:
    """One thread that owns an `LLM`: submit / abort / stats / shutdown are thread-safe."""

    WARMUP_TOKENS = 2

    def __init__(self, llm: LLM, max_queue: int | None = None, idle_wait: float = 0.5):
        if max_queue is not None and max_queue < 0:
            raise LlmcError(f"max_queue must be >= 0, got {max_queue}")
        self.llm = llm
        self.max_queue = max_queue
        self.idle_wait = idle_wait
        self.ready = False
        self.error: str | None = None  # set if the engine failed; the loop then stops
        self._encoder = copy.deepcopy(llm.tokenizer)  # submitters' own instance (see _encode)
        self._encoder_lock = threading.Lock()
        self._cond = threading.Condition()
        self._pending: list[_Submission] = []
        self._aborts: set[str] = set()
        self._sinks: dict[Hashable, Sink] = {}
        self._accepting = True
        self._stopping = False
        self._drain = True
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._finished_by_reason: dict[str, int] = {}
        self._snapshot: dict[str, Any] = {}
        self._refresh_snapshot()

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self, warmup: bool = True) -> "EngineLoop":
        """Warm the engine up (one tiny request, so the first client does not pay for ONNX
        Runtime's first-run allocations), then start the loop thread. `ready` turns True after."""
        if self._thread is not None:
            raise RuntimeError("EngineLoop already started")
        if warmup:
            self._warmup()
        self.llm.record_step_stats = False  # a server runs for days: `counters` carry what it reports
        self._thread = threading.Thread(target=self._run, name="llmc-engine-loop", daemon=True)
        self._thread.start()
        self.ready = True
        return self

    def _warmup(self) -> None:
        llm = self.llm
        tok = llm.bos_token_id
        ids = [tok if tok is not None else 0] * 4
        params = SamplingParams(max_tokens=self.WARMUP_TOKENS, ignore_eos=True)
        saved = dict(llm.counters)
        llm.generate([ids], params)
        llm.counters.update(saved)  # warm-up is not traffic
        llm.step_stats.clear()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting requests; finish (drain=True) or abort (drain=False) the rest, then stop
        the thread. Returns True if the thread ended within `timeout`."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._drain = self._drain and drain
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- requests -------------------------------------------------------------------------------
    def submit(self, prompt: str | list[int] | list[dict], params: SamplingParams | None, sink: Sink,
               chat: bool = False, request_id: str | None = None) -> str:
        """Queue a request; its events go to `sink` (called in the loop thread).

        Raises QueueFull when `max_queue` requests already wait, ShuttingDown after shutdown(),
        LlmcError for a prompt this engine cannot take (too long, empty with no BOS token).
        """
        params = params or SamplingParams()
        token_ids, text = self._encode(prompt, chat)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        sub = _Submission(rid, token_ids, text, params, sink, time.perf_counter())
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if self.error is not None:
                raise LlmcError(f"the engine failed: {self.error}")
            if rid in self._sinks:  # pending requests are in _sinks too
                raise LlmcError(f"request id {rid!r} is already in use")
            if self.max_queue is not None and self._num_waiting_locked() >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting; retry later")
            self._pending.append(sub)
            self._sinks[rid] = sink
            self._cond.notify_all()
        return rid

    def _encode(self, prompt: str | list[int] | list[dict], chat: bool) -> tuple[list[int], str | None]:
        """Tokenise in the caller's thread with the submitters' own tokenizer instance: the loop
        thread detokenises with the LLM's for whole engine steps, and a submit that waited for it
        would let requests trickle into the batch one step apart instead of joining it together."""
        llm = self.llm
        if isinstance(prompt, str) or (prompt and all(isinstance(m, dict) for m in prompt)):
            with self._encoder_lock:
                ids = encode_prompt(self._encoder, prompt, chat)
            text = prompt if isinstance(prompt, str) else None
        else:
            ids, text = [int(t) for t in prompt], None
        ids = llm.admit_prompt(ids)
        return ids, text

    def abort(self, request_id: str) -> None:
        """Cancel a request (idempotent, thread-safe): its blocks are freed before the next step and
        its sink gets a final event with finish_reason "abort"."""
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify_all()

    def _num_waiting_locked(self) -> int:
        return len(self._pending) + int(self._snapshot.get("num_waiting", 0))

    # ---- stats ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """A consistent snapshot taken after the latest step (thread-safe, cheap)."""
        with self._cond:
            snap = dict(self._snapshot)
            snap["num_waiting"] = self._num_waiting_locked()
            snap["requests_finished"] = dict(self._finished_by_reason)
            snap["ready"] = self.ready and self.error is None
            return snap

    def _refresh_snapshot(self) -> None:
        llm = self.llm
        c = llm.counters
        snap = {
            "num_running": llm.scheduler.num_running,
            "num_waiting": llm.scheduler.num_waiting,
            "kv_blocks_used": llm.block_manager.num_used_blocks,
            "kv_blocks_total": llm.num_blocks,
            "prefix_cache_hit_tokens": c["prefix_cache_hit_tokens"],
            "num_preemptions": c["preemptions"],
            "steps": c["steps"],
            "prompt_tokens_total": c["prompt_tokens"],
            "generation_tokens_total": c["generation_tokens"],
        }
        with self._cond:
            self._snapshot = snap

    # ---- the thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        llm = self.llm
        try:
            while True:
                with self._cond:
                    while not (self._pending or self._aborts or llm.has_unfinished() or self._stopping):
                        self._cond.wait(self.idle_wait)
                    pending, self._pending = self._pending, []
                    aborts, self._aborts = self._aborts, set()
                    if self._stopping and not self._drain:
                        aborts |= {p.request_id for p in pending} | set(self._sinks)
                    if self._stopping and not pending and not llm.has_unfinished():
                        break
                for sub in pending:
                    try:
                        llm.add_request(sub.token_ids, sub.params, request_id=sub.request_id,
                                        arrival_time=sub.arrival_time, prompt_text=sub.prompt)
                    except LlmcError as exc:  # refused: only this request fails
                        with self._cond:
                            self._sinks.pop(sub.request_id, None)
                        out = RequestOutput(sub.request_id, sub.prompt, sub.token_ids,
                                            finish_reason="error", error=str(exc))
                        self._send(sub.sink, TokenEvent(sub.request_id, finished=True, output=out))
                for rid in aborts:
                    llm.abort(rid)
                self._step()
        except BaseException as exc:  # the engine failed: fail every request, stay observable
            self.error = f"{type(exc).__name__}: {exc}"
            with self._cond:
                self._accepting = False
                sinks, self._sinks = dict(self._sinks), {}
                self._pending = []
            for rid, sink in sinks.items():
                out = RequestOutput(rid, None, [], finish_reason="error", error=self.error)
                self._send(sink, TokenEvent(str(rid), finished=True, output=out))
            raise
        finally:
            self._refresh_snapshot()

    def _step(self) -> None:
        events: dict[Hashable, TokenEvent] = {}

        def on_token(rid: Hashable, tok: int | None, text: str) -> None:
            ev = events.get(rid)
            if ev is None:
                ev = events[rid] = TokenEvent(str(rid))
            if tok is not None:
                ev.token_ids.append(tok)
            ev.text += text

        finished = self.llm.step(on_token)
        done = {o.request_id: o for o in finished}
        for out in finished:
            events.setdefault(out.request_id, TokenEvent(str(out.request_id)))
        self._refresh_snapshot()
        with self._cond:
            for out in finished:
                reason = out.finish_reason or "unknown"
                self._finished_by_reason[reason] = self._finished_by_reason.get(reason, 0) + 1
            sinks = {rid: self._sinks.get(rid) for rid in events}
            for rid in done:
                self._sinks.pop(rid, None)
        for rid, ev in events.items():
            out = done.get(rid) or self.llm.get_output(rid)
            if out is not None and out.logprobs is not None:  # this step's tokens are the last ones
                ev.logprobs = out.logprobs[len(out.logprobs) - len(ev.token_ids):]
            if rid in done:
                ev.finished, ev.output = True, done[rid]
            sink = sinks.get(rid)
            if sink is not None:
                self._send(sink, ev)

    @staticmethod
    def _send(sink: Sink, ev: TokenEvent) -> None:
        try:
            sink(ev)
        except Exception:  # a broken client must never take the loop (and everyone else) down
            pass
