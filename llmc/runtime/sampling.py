"""Token sampling over numpy logits, and stop-string detection.

Pure numpy: the model step returns logits for the rows that need them, and sampling a handful
of rows on the host is cheap next to the forward pass; keeping it out of the graph lets every
request in a batch have its own temperature / top-k / top-p / seed.

Reproducibility: each request gets its own `numpy.random.Generator` seeded from its `seed`,
consuming exactly one uniform draw per sampled token. A request's tokens therefore do not depend
on which other requests share its batch, nor on preemption and recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

from llmc.errors import LlmcError


@dataclass(init=False)
class SamplingParams:
    """Per-request decoding settings, with vLLM's and TensorRT-LLM's names.

    temperature == 0 means greedy; top_k == 0 and top_p == 1 mean off. `max_tokens` is the most
    tokens to generate (`max_new_tokens` is accepted as an alias: earlier llmc releases used it).
    `logprobs`: None = none; N >= 0 = the sampled token's log-probability plus the N most likely
    alternatives, from the model's raw distribution (before temperature / top-k / top-p).
    Invalid values raise LlmcError (one line), so a server can answer 400 with the message.
    """

    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    max_tokens: int
    stop: list[str]
    ignore_eos: bool
    logprobs: int | None

    MAX_LOGPROBS = 20

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 max_tokens: int | None = None, stop: str | Sequence[str] | None = None,
                 ignore_eos: bool = False, logprobs: int | None = None, *, max_new_tokens: int | None = None):
        if max_tokens is not None and max_new_tokens is not None and max_tokens != max_new_tokens:
            raise LlmcError(f"give max_tokens or max_new_tokens, not both ({max_tokens} vs {max_new_tokens})")
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.seed = seed
        self.max_tokens = 128 if max_tokens is None and max_new_tokens is None else (
            max_tokens if max_tokens is not None else max_new_tokens)
        self.stop = [stop] if isinstance(stop, str) else list(stop or [])
        self.ignore_eos = ignore_eos
        self.logprobs = logprobs
        self._validate()

    def _validate(self) -> None:
        def number(name: str, kinds: tuple[type, ...]) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, kinds):
                raise LlmcError(f"{name} must be a number, got {v!r}")

        number("temperature", (int, float))
        number("top_p", (int, float))
        for name in ("top_k", "max_tokens"):
            number(name, (int,))
        if not 0 <= self.temperature < float("inf"):  # also rejects NaN
            raise LlmcError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LlmcError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LlmcError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise LlmcError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise LlmcError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not all(isinstance(s, str) for s in self.stop):
            raise LlmcError("stop must be a string or a list of strings")
        if any(s == "" for s in self.stop):
            raise LlmcError("stop strings must be non-empty")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= self.MAX_LOGPROBS):
            raise LlmcError(f"logprobs must be an integer in [0, {self.MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def max_new_tokens(self) -> int:
        """Alias of `max_tokens` (the name earlier llmc releases documented)."""
        return self.max_tokens

    @property
    def greedy(self) -> bool:
        # top_k == 1 keeps only the argmax, so it is greedy whatever the temperature.
        return self.temperature == 0 or self.top_k == 1


def token_logprobs(logits: np.ndarray, token_id: int, top: int) -> dict:
    """log-softmax of one raw logits row: the sampled token's logprob and the `top` most likely.

    Computed in float64 on the host only for requests that ask, so it costs nothing otherwise.
    """
    x = np.asarray(logits, dtype=np.float64)
    lse = float(np.max(x) + np.log(np.sum(np.exp(x - np.max(x)))))
    alts: list[tuple[int, float]] = []
    if top > 0:
        idx = np.argpartition(-x, top - 1)[:top]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        alts = [(int(i), float(x[i] - lse)) for i in idx]
    return {"token_id": int(token_id), "logprob": float(x[token_id] - lse), "top": alts}


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Probabilities of one row after temperature, top-k, then top-p (the HF order).

    top-p keeps the smallest set of most likely tokens whose mass reaches top_p, and always at
    least the most likely one, so a tiny top_p degrades to greedy instead of an empty support.
    """
    x = np.asarray(logits, dtype=np.float64) / params.temperature
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        keep = np.argpartition(x, vocab - params.top_k)[vocab - params.top_k :]
        masked = np.full_like(x, -np.inf)
        masked[keep] = x[keep]
        x = masked
    x = x - np.max(x)
    p = np.exp(x)
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        csum = np.cumsum(p[order])
        n_keep = int(np.searchsorted(csum, params.top_p, side="left")) + 1
        drop = order[min(n_keep, vocab) :]
        p[drop] = 0.0
        p /= p.sum()
    return p


class Sampler:
    """Samples one token per logits row; owns one seeded Generator per request.

    Call `free(request_id)` when a request finishes so its generator is dropped.
    """

    def __init__(self) -> None:
        self._rngs: dict[Hashable, np.random.Generator] = {}

    def _rng(self, request_id: Hashable, seed: int | None) -> np.random.Generator:
        rng = self._rngs.get(request_id)
        if rng is None:
            rng = self._rngs[request_id] = np.random.default_rng(seed)
        return rng

    def free(self, request_id: Hashable) -> None:
        self._rngs.pop(request_id, None)

    def sample(
        self,
        logits: np.ndarray,
        params: Sequence[SamplingParams],
        request_ids: Sequence[Hashable],
    ) -> np.ndarray:
        """logits [n, vocab] with row i belonging to request_ids[i] -> int64 token ids [n]."""
        logits = np.asarray(logits)
        if logits.ndim != 2 or not len(params) == len(request_ids) == logits.shape[0]:
            raise ValueError(
                f"logits {logits.shape} must be [n, vocab] with n == len(params) == len(request_ids) "
                f"({len(params)}, {len(request_ids)})"
            )
        out = np.argmax(logits, axis=-1).astype(np.int64)  # greedy rows are done already
        for i, (p, rid) in enumerate(zip(params, request_ids)):
            if p.greedy:
                continue
            probs = filtered_probs(logits[i], p)
            u = self._rng(rid, p.seed).random()
            cdf = np.cumsum(probs)
            # Inverse CDF: "first index whose CDF exceeds u" never lands on a zero-probability
            # token (its CDF equals its predecessor's); the clamp only guards float rounding.
            out[i] = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(probs) - 1)
        return out


class StopChecker:
    """Finds stop strings in incrementally decoded text.

    Feed the whole text decoded so far to `check`; only the tail that could contain a new match
    is searched, so the cost per call is independent of the text length. `safe_len` tells a
    streaming server how much text it may emit without possibly splitting a stop string.
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self._max_len = max((len(s) for s in self.stop), default=0)
        self._searched = 0  # text[:_searched] is known to contain no complete stop string
        self.stopped = False

    def check(self, text: str) -> str | None:
        """Return the text truncated before the earliest stop string, or None if none appears."""
        if not self.stop:
            return None
        start = max(0, min(self._searched, len(text)) - self._max_len + 1)
        best: int | None = None
        for s in self.stop:
            j = text.find(s, start)
            if j != -1 and (best is None or j < best):
                best = j
        self._searched = len(text)
        if best is None:
            return None
        self.stopped = True
        return text[:best]

    def safe_len(self, text: str) -> int:
        """Length of the prefix of `text` that cannot turn into part of a stop string."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return len(text) - hold
