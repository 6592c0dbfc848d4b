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
  `evaluate_engine`, which drives the engine through its documented step API
  (llmc.engine.load_engine / allocate_kv_pool / step), prefilling each window in chunks of at
  most max_num_tokens tokens and reading the logits of every position.

`compare([A, B, ...])` evaluates each on the same token windows; deltas are against the first.
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
    from llmc.quantize.calib_data import eval_token_stream

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


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Sum of -log p(ids[t+1] | ..t) over a [B, S, V] logits batch."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return float(-logp.gather(-1, ids[:, 1:, None]).sum())


@torch.no_grad()
def model_nll(model: torch.nn.Module, windows: torch.Tensor, progress: bool = False,
              label: str = "eval") -> float:
    """Total NLL of a torch model (input_ids [B,S] -> logits [B,S,V]) over the windows."""
    from llmc.progress import stage_progress

    total = 0.0
    with stage_progress(progress, len(windows), label, unit="chunks") as advance:
        for batch in windows.split(EVAL_BATCH):
            total += _nll_sum(model(batch), batch)
            advance(len(batch))
    return total


def evaluate_engine(engine_dir: str | Path, windows: torch.Tensor, progress: bool = False) -> float:
    """Total NLL of an engine over the windows, through llmc.engine's step API.

    Each window is one sequence: prefilled in chunks of at most max_num_tokens tokens, every
    position's logits requested (logits_indices = all packed tokens), KV in freshly numbered
    blocks of a pool sized for one window.
    """
    try:
        from llmc.engine import load_engine
        from llmc.engine.step import SeqSlice, StepBatch
    except ImportError as exc:
        raise UnsupportedError(f"evaluating an engine needs llmc.engine.load_engine ({exc})") from None
    from llmc.progress import stage_progress

    engine = load_engine(engine_dir)
    ecfg = engine.config

    def opt(*names, default=None):
        for n in names:
            v = ecfg.get(n) if isinstance(ecfg, dict) else getattr(ecfg, n, None)
            if v is not None:
                return v
        return default

    block = int(opt("tokens_per_block", "block_size", default=64))
    max_tokens = int(opt("max_num_tokens", default=windows.shape[1]))
    max_seq = opt("max_seq_len")
    seq_len = windows.shape[1]
    if max_seq is not None and seq_len > int(max_seq):
        raise LlmcError(f"--seq-len {seq_len} exceeds the engine's max_seq_len {max_seq}", engine_dir)
    nblocks = -(-seq_len // block)
    # engines may insist on a pool that holds one sequence of max_seq_len
    engine.allocate_kv_pool(max(nblocks, -(-int(max_seq or seq_len) // block)))
    table = list(range(nblocks))
    total = 0.0
    with stage_progress(progress, len(windows), "eval (engine)", unit="chunks") as advance:
        for row in windows:
            ids = row.numpy().astype(np.int64)
            logits_parts = []
            for start in range(0, seq_len, max_tokens):
                end = min(seq_len, start + max_tokens)
                pos = np.arange(start, end, dtype=np.int64)
                slots = np.asarray([table[p // block] * block + p % block for p in pos], np.int64)
                batch = StepBatch(input_ids=ids[start:end], positions=pos, slot_mapping=slots,
                                  seqs=[SeqSlice(0, end - start, end, table)],
                                  logits_indices=np.arange(end - start, dtype=np.int64))
                logits_parts.append(np.asarray(engine.step(batch), np.float32))
            logits = torch.from_numpy(np.concatenate(logits_parts, 0))[None]
            total += _nll_sum(logits, row[None])
            advance(1)
    return total


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


def evaluate(path: str | Path, data: str | Path, seq_len: int = DEFAULT_SEQ_LEN,
             max_chunks: int | None = None, progress: bool = True,
             windows: torch.Tensor | None = None) -> EvalResult:
    """Perplexity of a checkpoint or engine directory on the text `data`."""
    path = Path(path)
    if not path.exists():
        raise LlmcError("no such file or directory", path)
    engine = is_engine_dir(path)
    check_window(path, seq_len if windows is None else windows.shape[1])
    if windows is None:
        windows, desc = token_windows(_load_tokenizer(path), data, seq_len, max_chunks)
    else:
        desc = str(data)
    start = time.perf_counter()
    if engine:
        total = evaluate_engine(path, windows, progress=progress)
    else:
        from llmc.quantize.simulate import build_simulated_model

        model = build_simulated_model(path)
        total = model_nll(model, windows, progress=progress, label=f"eval {path.name}")
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    nll = total / tokens
    return EvalResult(str(path), "engine" if engine else "checkpoint", _describe_quant(path),
                      math.exp(nll), nll, tokens, windows.shape[0], windows.shape[1],
                      time.perf_counter() - start, desc)


def compare(paths: list[str | Path], data: str | Path, seq_len: int = DEFAULT_SEQ_LEN,
            max_chunks: int | None = None, progress: bool = True) -> list[EvalResult]:
    """Evaluate several artifacts on identical windows (tokenized once with the first's tokenizer;
    all must share a vocabulary, which they do when they come from one model)."""
    if not paths:
        raise LlmcError("nothing to evaluate")
    for p in paths:
        if not Path(p).exists():
            raise LlmcError("no such file or directory", p)
        check_window(Path(p), seq_len)
    first_tok = _load_tokenizer(Path(paths[0]))
    windows, desc = token_windows(first_tok, data, seq_len, max_chunks)
    vocab = len(first_tok)
    for p in paths[1:]:
        if len(_load_tokenizer(Path(p))) != vocab:
            raise LlmcError(f"tokenizer differs from {paths[0]}'s: perplexities would not be comparable", p)
    results = []
    for p in paths:
        r = evaluate(p, desc, seq_len, max_chunks, progress, windows=windows)
        results.append(r)
    return results
