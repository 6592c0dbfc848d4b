"""`llmc eval`: perplexity of a checkpoint (float or quantized) or an engine on local text.

Perplexity = exp(mean negative log-likelihood) over non-overlapping windows of `seq_len` tokens
of the text (tokenized with the artifact's own tokenizer, no special tokens; a trailing partial
window is dropped). Each window is scored independently from position 0, so every token but the
first of a window is predicted: a run scores `chunks x (seq_len - 1)` tokens.

What is evaluated:
- float checkpoint: llmc's reference model in float32;
- quantized checkpoint: `llmc.quantize.simulate.build_simulated_model`, the exact fake-quant
  simulation of what the engine computes from the stored tensors;
- engine directory (config.json with an "engine" key, top level or under "llmc"):
  `engine_logits_fn`, which drives the engine through its documented step API
  (llmc.engine.load_engine / allocate_kv_pool / step), prefilling each window in chunks of at
  most max_num_tokens tokens and reading the logits of every position.

`compare([A, B, ...])` evaluates each on the same token windows; deltas are against the first.

Distribution-level accuracy (`reference=`, `llmc eval --reference PATH`): perplexity averages
away what users notice, a changed most-likely token. Against a reference artifact (normally the
unquantized checkpoint) each result also carries, on the same windows:
- KL(P_ref || P) per predicted position, its mean and 99th percentile (nats), on the SECOND HALF
  of every window only (logit positions seq_len//2 .. seq_len-2, llama.cpp's
  `--kl-divergence` protocol: every scored prediction has at least half a window of context);
- same-top-1 %: positions of that half where both argmaxes agree;
- perplexity ratio: exp(NLL - NLL_ref) over all positions (the `perplexity` protocol above).
`greedy_agreement` checks generated outputs against the reference's greedy choice token by token.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from llmc.errors import LlmcError, UnsupportedError

DEFAULT_SEQ_LEN = 512
EVAL_BATCH = 4


@dataclass
class EvalResult:
    path: str
    kind: str            # "checkpoint" | "engine"
    quantization: str    # quant_algo (+ KV) or "none"
    perplexity: float
    nll: float           # mean negative log-likelihood per token (nats)
    tokens: int          # tokens scored
    chunks: int
    seq_len: int
    seconds: float
    data: str = ""
    divergence: dict | None = None   # Divergence.to_dict() when evaluated against a reference

    def to_dict(self) -> dict:
        return asdict(self)


def is_engine_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and ("engine" in data or "engine" in (data.get("llmc") or {}))


def token_windows(tokenizer, data: str | Path, seq_len: int, max_chunks: int | None) -> tuple[torch.Tensor, str]:
    """LongTensor [chunks, seq_len] of consecutive non-overlapping windows of the text."""
    from llmc.text import eval_token_stream

    if seq_len < 2:
        raise LlmcError(f"--seq-len must be >= 2, got {seq_len}")
    if max_chunks is not None and max_chunks < 1:
        raise LlmcError(f"--max-chunks must be >= 1, got {max_chunks}")
    ids, desc = eval_token_stream(tokenizer, data)
    n = len(ids) // seq_len
    if n == 0:
        raise LlmcError(f"text has {len(ids):,} tokens, fewer than one --seq-len window of {seq_len}", data)
    if max_chunks is not None:
        n = min(n, max_chunks)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len), desc


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log P of every predicting position of a [B, S, V] logits batch: [B, S - 1, V] (position t
    predicts token t + 1). Computed once per artifact and batch, shared by NLL and KL."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _nll_from_log_probs(logp: torch.Tensor, ids: torch.Tensor) -> float:
    return float(-logp.gather(-1, ids[:, 1:, None]).sum())


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Sum of -log p(ids[t+1] | ..t) over a [B, S, V] logits batch."""
    return _nll_from_log_probs(_log_probs(logits), ids)


def kl_positions(seq_len: int) -> slice:
    """Logit positions of a window scored for KL / same-top-1: llama.cpp's protocol, the second
    half (positions seq_len//2 .. seq_len-2, each predicting the next token of the window), so
    every scored prediction has at least half a window of context."""
    return slice(seq_len // 2, seq_len - 1)


def kl_per_position(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(P_ref || P) in nats, top-1 equal) per position of [..., V] logits, flattened.

    P = softmax(logits) over the vocabulary; KL = sum_v P_ref(v) (log P_ref(v) - log P(v)).
    """
    return kl_from_log_probs(torch.log_softmax(ref_logits.float(), dim=-1), torch.log_softmax(logits.float(), dim=-1))


def kl_from_log_probs(lp_ref: torch.Tensor, lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`kl_per_position` from log-probabilities (argmax of log-softmax = argmax of logits)."""
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1).clamp_min(0.0)
    same = lp_ref.argmax(-1) == lp.argmax(-1)
    return kl.reshape(-1), same.reshape(-1)


@dataclass
class Divergence:
    """Distribution-level accuracy of a model against a reference on the same windows."""

    reference: str
    kl_mean: float         # mean KL(P_ref || P) over scored positions (nats)
    kl_p99: float          # 99th percentile of the per-position KL
    kl_max: float
    same_top1_pct: float   # positions whose argmax equals the reference's
    ppl_ratio: float       # perplexity / reference perplexity (all positions, as `perplexity`)
    positions: int         # positions scored for KL / top-1

    def to_dict(self) -> dict:
        return asdict(self)


class _DivergenceAcc:
    def __init__(self) -> None:
        self.kl: list[torch.Tensor] = []
        self.same: list[torch.Tensor] = []

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor) -> None:
        cut = kl_positions(logits.shape[1])
        kl, same = kl_per_position(ref_logits[:, cut], logits[:, cut])
        self.kl.append(kl.double())
        self.same.append(same)

    def add_log_probs(self, lp_ref: torch.Tensor, lp: torch.Tensor) -> None:
        """As `add`, from `_log_probs` of both ([B, S - 1, V]: logit positions 0 .. S - 2)."""
        cut = kl_positions(lp.shape[1] + 1)
        kl, same = kl_from_log_probs(lp_ref[:, cut], lp[:, cut])
        self.kl.append(kl.double())
        self.same.append(same)

    def result(self, reference: str, ppl_ratio: float) -> Divergence:
        kl = torch.cat(self.kl).numpy()
        same = torch.cat(self.same).numpy()
        return Divergence(reference, float(kl.mean()), float(np.percentile(kl, 99)), float(kl.max()),
                          float(100.0 * same.mean()), ppl_ratio, int(kl.size))


def engine_logits_fn(engine_dir: str | Path, seq_len: int):
    """A function windows [B, S] -> logits [B, S, V] (float32) driving an engine's step API.

    Each window is one sequence: prefilled in chunks of at most max_num_tokens tokens, every
    position's logits requested (logits_indices = all packed tokens), KV in freshly numbered
    blocks of a pool sized for one window.
    """
    try:
        from llmc.engine import load_engine
        from llmc.engine.step import SeqSlice, StepBatch
    except ImportError as exc:
        raise UnsupportedError(f"evaluating an engine needs llmc.engine.load_engine ({exc})") from None

    engine = load_engine(engine_dir)
    ecfg = engine.config

    def opt(*names, default=None):
        for n in names:
            v = ecfg.get(n) if isinstance(ecfg, dict) else getattr(ecfg, n, None)
            if v is not None:
                return v
        return default

    block = int(opt("tokens_per_block", "block_size", default=64))
    max_tokens = int(opt("max_num_tokens", default=seq_len))
    max_seq = opt("max_seq_len")
    if max_seq is not None and seq_len > int(max_seq):
        raise LlmcError(f"--seq-len {seq_len} exceeds the engine's max_seq_len {max_seq}", engine_dir)
    nblocks = -(-seq_len // block)
    # engines may insist on a pool that holds one sequence of max_seq_len
    engine.allocate_kv_pool(max(nblocks, -(-int(max_seq or seq_len) // block)))
    table = list(range(nblocks))

    def run(windows: torch.Tensor) -> torch.Tensor:
        out = []
        for row in windows:
            ids = row.numpy().astype(np.int64)
            n = len(ids)
            parts = []
            for start in range(0, n, max_tokens):
                end = min(n, start + max_tokens)
                pos = np.arange(start, end, dtype=np.int64)
                slots = np.asarray([table[p // block] * block + p % block for p in pos], np.int64)
                batch = StepBatch(input_ids=ids[start:end], positions=pos, slot_mapping=slots,
                                  seqs=[SeqSlice(0, end - start, end, table)],
                                  logits_indices=np.arange(end - start, dtype=np.int64))
                parts.append(np.asarray(engine.step(batch), np.float32))
            out.append(torch.from_numpy(np.concatenate(parts, 0)))
        return torch.stack(out)

    return run


def check_window(path: Path, seq_len: int) -> None:
    """Refuse windows longer than the artifact can attend over, before any text is tokenized."""
    from llmc.checkpoint.config import CheckpointConfig

    if is_engine_dir(path):  # the engine's config is validated in full by load_engine
        from llmc.engine.stamps import read_engine_config

        build = read_engine_config(path).get("build")
        limit = build.get("max_seq_len") if isinstance(build, dict) else None
        if not isinstance(limit, int):
            return
        what = "the engine's max_seq_len"
    else:
        limit, what = CheckpointConfig.load(path / "config.json").max_position_embeddings, \
            "the model's max_position_embeddings"
    if seq_len > limit:
        raise LlmcError(f"--seq-len {seq_len} exceeds {what} ({limit})", path)


def logits_fn(path: str | Path, seq_len: int):
    """windows [B, S] -> logits [B, S, V] for a checkpoint (exact simulation) or an engine."""
    if is_engine_dir(path):
        return engine_logits_fn(path, seq_len)
    from llmc.quantize.simulate import build_simulated_model

    model = build_simulated_model(Path(path))
    return torch.no_grad()(lambda w: model(w).float())


def _load_tokenizer(path: Path):
    from llmc.tokenizer import load_tokenizer

    return load_tokenizer(path)


def _describe_quant(path: Path) -> str:
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "?"
    q = data.get("quantization") or {}
    parts = [q.get("quant_algo") or "none"]
    if q.get("kv_cache_quant_algo"):
        parts.append(f"KV {q['kv_cache_quant_algo']}")
    if q.get("quant_algo") and "W4" in q["quant_algo"] and q.get("group_size"):
        parts.append(f"g{q['group_size']}")
    return ", ".join(parts)


def _score(paths: list[Path], windows: torch.Tensor, reference: Path | None,
           progress: bool) -> list[tuple[float, float, Divergence | None]]:
    """(total NLL, seconds, divergence from `reference`) of each artifact on the windows.

    All artifacts run in lockstep over batches of windows so the reference's logits are computed
    once per batch and never stored whole (40 x 512 positions x 49k vocab would be 4 GB). A
    reference that is also one of `paths` is run once.
    """
    from llmc.progress import stage_progress

    seq_len = windows.shape[1]
    fns = [logits_fn(p, seq_len) for p in paths]
    ref_index = next((i for i, p in enumerate(paths) if reference is not None
                      and Path(p).resolve() == Path(reference).resolve()), None)
    ref_fn = None if reference is None or ref_index is not None else logits_fn(reference, seq_len)
    totals = [0.0] * len(paths)
    seconds = [0.0] * len(paths)
    ref_total = 0.0
    accs = [_DivergenceAcc() for _ in paths] if reference is not None else None
    label = "eval" if len(paths) == 1 else f"eval x{len(paths)}"
    step = EVAL_BATCH
    with stage_progress(progress, len(windows), label, unit="chunks") as advance:
        for batch in windows.split(step):
            ref_lp = _log_probs(ref_fn(batch)) if ref_fn is not None else None
            if ref_lp is not None:
                ref_total += _nll_from_log_probs(ref_lp, batch)
            order = list(range(len(fns)))
            if ref_index is not None:  # the reference first, so every other is compared and dropped at once
                order.insert(0, order.pop(ref_index))
            for i in order:
                t0 = time.perf_counter()
                logits = fns[i](batch)
                seconds[i] += time.perf_counter() - t0
                lp = _log_probs(logits)  # once per artifact and batch: NLL and KL share it
                del logits
                totals[i] += _nll_from_log_probs(lp, batch)
                if i == ref_index:
                    ref_lp = lp
                if accs is not None:
                    accs[i].add_log_probs(ref_lp, lp)
                del lp
            advance(len(batch))
    if ref_index is not None:
        ref_total = totals[ref_index]
    results = []
    for i in range(len(paths)):
        div = None
        if accs is not None:
            div = accs[i].result(str(reference), math.exp((totals[i] - ref_total) / max(1, _ntokens(windows))))
        results.append((totals[i], seconds[i], div))
    return results


def _ntokens(windows: torch.Tensor) -> int:
    return windows.shape[0] * (windows.shape[1] - 1)


def _result(path: Path, total: float, seconds: float, windows: torch.Tensor, desc: str,
            div: Divergence | None) -> EvalResult:
    nll = total / _ntokens(windows)
    return EvalResult(str(path), "engine" if is_engine_dir(path) else "checkpoint", _describe_quant(path),
                      math.exp(nll), nll, _ntokens(windows), windows.shape[0], windows.shape[1], seconds, desc,
                      None if div is None else div.to_dict())


def _check_vocab(paths: list[Path], vocab: int, first: Path) -> None:
    for p in paths:
        if len(_load_tokenizer(Path(p))) != vocab:
            raise LlmcError(f"tokenizer differs from {first}'s: perplexities would not be comparable", p)


def evaluate(path: str | Path, data: str | Path, seq_len: int = DEFAULT_SEQ_LEN,
             max_chunks: int | None = None, progress: bool = True,
             windows: torch.Tensor | None = None, reference: str | Path | None = None) -> EvalResult:
    """Perplexity of a checkpoint or engine directory on the text `data` (and, with `reference`,
    its KL divergence / same-top-1 / perplexity ratio against that checkpoint or engine)."""
    return compare([path], data, seq_len, max_chunks, progress, windows=windows, reference=reference)[0]


def compare(paths: list[str | Path], data: str | Path, seq_len: int = DEFAULT_SEQ_LEN,
            max_chunks: int | None = None, progress: bool = True, windows: torch.Tensor | None = None,
            reference: str | Path | None = None) -> list[EvalResult]:
    """Evaluate several artifacts on identical windows (tokenized once with the first's tokenizer;
    all must share a vocabulary, which they do when they come from one model). With `reference`,
    each result carries `divergence` (see `Divergence`) against it."""
    if not paths:
        raise LlmcError("nothing to evaluate")
    paths = [Path(p) for p in paths]
    ref = None if reference is None else Path(reference)
    for p in paths + ([ref] if ref is not None else []):
        if not p.exists():
            raise LlmcError("no such file or directory", p)
        check_window(p, seq_len if windows is None else windows.shape[1])
    if windows is None:
        first_tok = _load_tokenizer(paths[0])
        windows, desc = token_windows(first_tok, data, seq_len, max_chunks)
        _check_vocab(paths[1:] + ([ref] if ref is not None else []), len(first_tok), paths[0])
    else:
        desc = str(data)
    scores = _score(paths, windows, ref, progress)
    return [_result(p, total, secs, windows, desc, div) for p, (total, secs, div) in zip(paths, scores)]


@dataclass
class GreedyAgreement:
    """How often a model's greedy outputs are exactly what the reference would have generated."""

    reference: str
    prompts: int
    identical: int             # whole output equal to the reference's greedy continuation
    first_token: int           # first generated token equal
    prefix_pct: float          # mean % of each output's tokens before the first disagreement
    differing: list[int] = None  # indices (into the requests) of outputs that are not identical

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def greedy_agreement(requests: list[tuple[list[int], list[int]]], reference: str | Path) -> GreedyAgreement:
    """Agreement of greedy generations (prompt ids, generated ids) with `reference`.

    Teacher-forced: the reference scores prompt + output in one pass; the output is the
    reference's own greedy continuation exactly when its argmax at every generated position is the
    token that was generated (a stop token included), so one forward per request decides it, with
    no second generation loop. Argmax ties count as disagreements.
    """
    reqs = [(list(p), list(o)) for p, o in requests]
    if any(not o for _, o in reqs):
        raise ValueError("greedy_agreement: a request generated no tokens")
    longest = max((len(p) + len(o) for p, o in reqs), default=1)
    fn = logits_fn(reference, longest)
    identical = first = 0
    prefix, differing = [], []
    for index, (prompt, out) in enumerate(reqs):
        ids = torch.tensor([prompt + out[:-1]], dtype=torch.long)
        pred = fn(ids)[0, len(prompt) - 1:].argmax(-1).tolist()
        agree = next((i for i, (a, b) in enumerate(zip(pred, out)) if a != b), len(out))
        identical += agree == len(out)
        first += agree > 0
        if agree < len(out):
            differing.append(index)
        prefix.append(100.0 * agree / len(out))
    return GreedyAgreement(str(reference), len(reqs), identical, first,
                           float(np.mean(prefix)) if prefix else 0.0, differing)
