"""The generation loop: scheduler + engine + sampler + tokenizer, one iteration at a time.

`LLM` owns the KV block pool (sized from a memory budget), the block manager and the
scheduler; each `step()` asks the scheduler what to run, packs it into one `StepBatch` (prefill
chunks and decodes together, no padding), runs the engine once, samples, and streams tokens. It
is small on purpose, like vLLM v1's engine core: everything clever lives in the scheduler and
the graph.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterable, Iterator


from llmc.errors import LlmcError
from llmc.runtime.kv_blocks import BlockManager, blocks_for_budget
from llmc.runtime.sampling import Sampler, SamplingParams, StopChecker, token_logprobs
from llmc.runtime.scheduler import Request, Scheduler

DEFAULT_KV_FRACTION = 0.3  # of available memory, when no --kv-cache-mb is given


@dataclass
class RequestOutput:
    request_id: Hashable
    prompt: str | None
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    logprobs: list[dict] | None = None  # per output token when SamplingParams.logprobs is set

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        n = len(self.output_token_ids)
        if n < 2 or self.finish_time is None or self.first_token_time is None:
            return None
        return (self.finish_time - self.first_token_time) / (n - 1)


@dataclass
class StepStats:
    step: int
    num_tokens: int
    num_seqs: int
    num_decode: int
    seconds: float
    used_blocks: int
    kv_tokens_read: int  # sum of context lengths attended over in this step


# (request_id, token_id or None, new_text). Text that could still become a stop string (or an
# incomplete UTF-8 character) is held back until it cannot; a finishing request gets one last call
# with token None carrying whatever was held back, so the pieces always add up to `output.text`.
TokenCallback = Callable[[Hashable, int | None, str], None]


def encode_prompt(tokenizer, prompt: str | list[dict], chat: bool = False) -> list[int]:
    """Token ids of a prompt: plain text as is (no special tokens added), or through the chat
    template for `chat=True` (one user turn) or a list of {"role", "content"} messages."""
    if isinstance(prompt, str) and not chat:
        return list(tokenizer.encode(prompt, add_special_tokens=False))
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


class LLM:
    """Serve requests on a built engine with a paged KV cache and in-flight batching."""

    def __init__(self, engine_dir: str | Path, kv_cache_mb: float | None = None,
                 kv_fraction: float | None = None, max_batch_size: int | None = None,
                 max_num_tokens: int | None = None, enable_prefix_caching: bool = True,
                 num_blocks: int | None = None, num_threads: int | None = None,
                 prefill_budget: int | None = None, spinning: bool | None = None):
        """prefill_budget: at most this many prompt tokens per step (decodes not counted), which
        bounds TTFT and inter-token latency under a burst of prompts (see Scheduler); None: prompts
        take whatever max_num_tokens leaves. num_threads / spinning: ONNX Runtime's intra-op pool
        (None: LLMC_ORT_THREADS / LLMC_ORT_SPINNING, else physical cores, spinning)."""
        from llmc.engine import load_engine
        from llmc.tokenizer import eos_token_ids, load_tokenizer

        self.engine = load_engine(engine_dir, threads=num_threads, spinning=spinning)
        cfg = self.engine.config
        self.max_batch_size = min(max_batch_size or cfg.max_batch_size, cfg.max_batch_size)
        self.max_num_tokens = min(max_num_tokens or cfg.max_num_tokens, cfg.max_num_tokens)
        self.max_seq_len = cfg.max_seq_len
        self.max_input_len = cfg.max_input_len
        self.block_size = cfg.tokens_per_block
        per_block = self.engine.kv_bytes_per_block
        if num_blocks is None:
            import psutil

            available = psutil.virtual_memory().available
            if kv_cache_mb is not None:
                if not 0 < kv_cache_mb < float("inf"):
                    raise LlmcError(f"--kv-cache-mb must be a positive number, got {kv_cache_mb}")
                budget = int(kv_cache_mb * 2**20)
                if budget > available:
                    raise LlmcError(f"--kv-cache-mb {kv_cache_mb:g} exceeds the memory available now "
                                    f"({available / 2**20:.0f} MiB)")
            else:
                budget = int(available * (kv_fraction or DEFAULT_KV_FRACTION))
                # No point in a pool larger than max_batch_size full-length sequences.
                budget = min(budget, self.max_batch_size * -(-self.max_seq_len // self.block_size) * per_block)
            num_blocks = blocks_for_budget(budget, per_block)
            need = -(-self.max_seq_len // self.block_size)
            if num_blocks < need:
                raise LlmcError(f"KV cache budget holds {num_blocks} blocks of {self.block_size} tokens "
                                f"({per_block} bytes each) but one max-length sequence ({self.max_seq_len} "
                                f"tokens) needs {need}; raise --kv-cache-mb")
        # An explicit num_blocks may be smaller (tests force preemption that way): requests that
        # can never fit are failed by the scheduler, the others queue or get preempted.
        self.num_blocks = num_blocks
        self.engine.allocate_kv_pool(num_blocks)
        self.block_manager = BlockManager(num_blocks, self.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.max_batch_size, self.max_num_tokens,
                                   self.max_seq_len, prefill_budget=prefill_budget)
        self.tokenizer = load_tokenizer(Path(engine_dir))
        self.eos_ids = frozenset(eos_token_ids(Path(engine_dir)))
        self.bos_token_id = self.tokenizer.bos_token_id
        self.sampler = Sampler()
        self._ids = itertools.count()
        self._outputs: dict[Hashable, RequestOutput] = {}
        self._params: dict[Hashable, SamplingParams] = {}
        self._stops: dict[Hashable, StopChecker] = {}
        self._sent: dict[Hashable, int] = {}  # characters of out.text handed to on_token so far
        # Requests whose out.text lags their tokens: without stop strings and without a token
        # callback nothing reads the text mid-request, so decoding it every step (O(length) each)
        # is deferred to get_output() / the finish.
        self._stale_text: set[Hashable] = set()
        self.step_stats: list[StepStats] = []
        # One StepStats per step for benchmarks; a long-running server turns it off (the list would
        # grow without bound) and reads `counters` instead.
        self.record_step_stats = True
        self._early_finished: list[RequestOutput] = []  # rejected at admission
        # Cumulative counters for metrics (servers read them; nothing here resets them).
        self.counters = {"prefix_cache_hit_tokens": 0, "preemptions": 0, "prompt_tokens": 0,
                         "generation_tokens": 0, "steps": 0}

    # ---- requests ---------------------------------------------------------------------------
    def encode(self, prompt: str | list[dict], chat: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: Hashable | None = None, chat: bool = False,
                    arrival_time: float | None = None, prompt_text: str | None = None) -> Hashable:
        """Queue a request; it joins the running batch at the next step.

        Documented edge cases: a prompt longer than the engine's max_input_len fails that request
        (finish_reason "error") and the others go on; an empty prompt is seeded with the BOS token
        (or fails if the tokenizer has none); max_new_tokens is capped so prompt + output fits
        max_seq_len, and such a request finishes with reason "length".
        """
        params = params or SamplingParams()
        rid = request_id if request_id is not None else next(self._ids)
        if rid in self._outputs:
            raise LlmcError(f"request id {rid!r} is already in use")
        text = prompt if isinstance(prompt, str) else prompt_text
        ids = self.encode(prompt, chat) if isinstance(prompt, str) else [int(t) for t in prompt]
        out = RequestOutput(rid, text, ids, arrival_time=arrival_time or time.perf_counter())
        self._outputs[rid] = out
        try:
            ids = out.prompt_token_ids = self.admit_prompt(ids)
        except LlmcError as exc:
            out.finish_reason, out.error, out.finish_time = "error", str(exc), time.perf_counter()
            self._early_finished.append(out)
            return rid
        max_new = max(1, min(params.max_tokens, self.max_seq_len - len(ids)))
        self._params[rid] = params
        self._stops[rid] = StopChecker(params.stop)
        self._sent[rid] = 0
        if params.logprobs is not None:
            out.logprobs = []
        eos = frozenset() if params.ignore_eos else self.eos_ids
        self.scheduler.add_request(Request(rid, ids, max_new, sampling_params=params, eos_token_ids=eos))
        return rid

    def admit_prompt(self, ids: list[int]) -> list[int]:
        """The token ids this engine will run for a prompt: an empty prompt becomes the BOS token;
        LlmcError if there is none, if an id is outside the vocabulary, or if the prompt is longer
        than the engine's max_input_len. Reads no tokenizer, so any thread may call it."""
        vocab = self.engine.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise LlmcError(f"prompt token ids must be in [0, {vocab})")
        if not ids:
            if self.bos_token_id is None:
                raise LlmcError("empty prompt and the tokenizer has no BOS token to start from")
            ids = [self.bos_token_id]
        if len(ids) > self.max_input_len:
            raise LlmcError(f"prompt has {len(ids)} tokens; this engine allows at most {self.max_input_len} "
                            "(rebuild with a larger --max-input-len)")
        return ids

    def get_output(self, request_id: Hashable) -> RequestOutput | None:
        """The live output of a request not yet handed back by `step()` (None otherwise)."""
        if request_id in self._stale_text:
            self._detokenize(request_id)
        return self._outputs.get(request_id)

    def has_unfinished(self) -> bool:
        """True while any request has not yet been handed back by `step()`."""
        return bool(self._outputs) or bool(self._early_finished)

    def abort(self, request_id: Hashable) -> bool:
        """Finish a request now (finish_reason "abort"), freeing its KV blocks; `step()` hands it
        back. Returns False if it is unknown or already finished."""
        return self.scheduler.finish_request(request_id, "abort")

    # ---- one iteration ----------------------------------------------------------------------
    def step(self, on_token: TokenCallback | None = None) -> list[RequestOutput]:
        """Run one engine iteration; return every request that finished since the last call.

        That includes requests finished outside the model step (a stop string, `abort()`, a
        prompt rejected at admission), even when nothing was left to schedule.
        """
        sched = self.scheduler.schedule()
        now = time.perf_counter()
        sampled: dict[Hashable, int] = {}
        done: list = []
        if not sched.is_empty:
            batch = sched.step_batch()
            logit_rids = sched.logits_request_ids
            t0 = time.perf_counter()
            logits = self.engine.step(batch, scratch=True)  # sampled below, before the next step
            now = time.perf_counter()
            if self.record_step_stats:
                self.step_stats.append(StepStats(sched.step, batch.num_tokens, len(batch.seqs),
                                                 sum(1 for s in sched.scheduled.values() if not s.is_prefill),
                                                 now - t0, self.block_manager.num_used_blocks,
                                                 sum(s.context_len for s in batch.seqs)))
            self._count(sched)
            if logit_rids:
                tokens = self.sampler.sample(logits, [self._params[r] for r in logit_rids], logit_rids)
                sampled = {rid: int(t) for rid, t in zip(logit_rids, tokens)}
            done = self.scheduler.update(sched, sampled)
            for row, (rid, tok) in enumerate(sampled.items()):
                out = self._outputs[rid]
                if out.first_token_time is None:
                    out.first_token_time = now
                out.output_token_ids.append(tok)
                if out.logprobs is not None:
                    out.logprobs.append(token_logprobs(logits[row], tok, self._params[rid].logprobs))
                if on_token is not None or self._stops[rid].stop:
                    self._detokenize(rid)
                else:
                    self._stale_text.add(rid)
            self.counters["generation_tokens"] += len(sampled)
        # Requests finished outside update(): stop strings found just now, aborts, admission errors
        # of requests that never ran.
        done += self.scheduler.pop_finished()
        finished: list[RequestOutput] = []
        for req in done:
            out = self._outputs.get(req.request_id)
            if out is None:  # already handed back
                continue
            out.finish_reason = out.finish_reason or req.finish_reason
            out.error = out.error or req.error
            out.num_preemptions = req.num_preemptions
            out.num_cached_tokens = req.num_cached_tokens
            if req.request_id in self._stale_text:
                self._detokenize(req.request_id)
            finished.append(out)
        ended = {o.request_id for o in finished}
        if on_token is not None:
            for rid, tok in sampled.items():
                if rid not in ended:
                    self._deliver(rid, tok, on_token, final=False)
            for out in finished:
                self._deliver(out.request_id, sampled.get(out.request_id), on_token, final=True)
        for out in finished:
            self._finalise(out.request_id, now)
        return self._collect_finished(finished)

    def _count(self, sched) -> None:
        c = self.counters
        c["steps"] += 1
        c["preemptions"] += len(sched.preempted_ids)
        for rid in sched.scheduled_new_ids:
            req = self.scheduler.get_request(rid)
            if req is not None:
                c["prefix_cache_hit_tokens"] += req.num_cached_tokens
                if req.num_preemptions == 0:
                    c["prompt_tokens"] += req.num_prompt_tokens

    def _detokenize(self, rid: Hashable) -> None:
        """Refresh out.text from the tokens; a stop string truncates it and finishes the request."""
        self._stale_text.discard(rid)
        out = self._outputs[rid]
        stops = self._stops[rid]
        if stops.stopped:  # a stop string already ended it; drop trailing tokens
            return
        text = self.tokenizer.decode(out.output_token_ids, skip_special_tokens=True)
        truncated = stops.check(text)
        if truncated is not None:
            text = truncated
            self.scheduler.finish_request(rid, "stop")
        out.text = text

    def _deliver(self, rid: Hashable, tok: int | None, on_token: TokenCallback, final: bool) -> None:
        """Hand on_token the text that can no longer change: all of it once the request is over;
        while it runs, nothing that could still be the start of a stop string or an incomplete
        character (decoded as U+FFFD until its last byte arrives)."""
        out = self._outputs[rid]
        text = out.text
        end = len(text)
        if not final:
            stops = self._stops.get(rid)
            if stops is not None:
                end = stops.safe_len(text)
            while end > 0 and text[end - 1] == "\ufffd":
                end -= 1
        sent = self._sent.get(rid, 0)
        if end > sent or tok is not None:
            on_token(rid, tok, text[sent:max(end, sent)])
            self._sent[rid] = max(end, sent)

    def _finalise(self, rid: Hashable, now: float) -> None:
        out = self._outputs[rid]
        out.finish_time = now
        self.sampler.free(rid)
        self._params.pop(rid, None)
        self._stops.pop(rid, None)
        self._sent.pop(rid, None)

    def _collect_finished(self, finished: list[RequestOutput]) -> list[RequestOutput]:
        """Add requests rejected at admission, and forget everything that finished."""
        finished = self._early_finished + finished
        self._early_finished = []
        for out in finished:
            self._outputs.pop(out.request_id, None)
        return finished

    # ---- convenience --------------------------------------------------------------------------
    def generate(self, prompts: str | Iterable[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 chat: bool = False, on_token: TokenCallback | None = None) -> list[RequestOutput]:
        """Run all prompts with in-flight batching; outputs in prompt order.

        A single string is one prompt (as in vLLM), not one request per character.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if isinstance(params, list) and len(params) != len(prompts):
            raise LlmcError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        rids = [self.add_request(p, sp, chat=chat) for p, sp in zip(prompts, plist)]
        results: dict[Hashable, RequestOutput] = {}
        for out in self.run_until_done(on_token):
            results[out.request_id] = out
        return [results[r] for r in rids]

    def run_until_done(self, on_token: TokenCallback | None = None) -> Iterator[RequestOutput]:
        while self.has_unfinished():
            yield from self.step(on_token)

    def stream(self, prompt: str, params: SamplingParams | None = None, chat: bool = False) -> Iterator[str]:
        """Yield text pieces of one request as they are generated (other requests keep running)."""
        pieces: list[str] = []
        rid = self.add_request(prompt, params, chat=chat)
        while True:
            done = self.step(lambda r, t, text: pieces.append(text) if r == rid and text else None)
            yield from pieces
            pieces.clear()
            mine = [o for o in done if o.request_id == rid]
            if mine:
                if mine[0].error:
                    raise LlmcError(mine[0].error)
                return
