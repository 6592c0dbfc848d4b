"""Engine-side measurements shared by bench_quantize.py: greedy agreement and decode speed."""

from __future__ import annotations

import statistics
from pathlib import Path

from prompts import PROMPTS

MAX_NEW_TOKENS = 48
DECODE_TOKENS = 64


def greedy_outputs(engine: Path, prompts: list[str] = PROMPTS, max_new_tokens: int = MAX_NEW_TOKENS) -> list:
    """Greedy chat generations of every prompt (in-flight batched; the outputs are identical to
    one-at-a-time runs, a runtime test)."""
    from llmc.runtime.llm import LLM
    from llmc.runtime.sampling import SamplingParams

    llm = LLM(engine)
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens), chat=True)
    return [(o.prompt_token_ids, o.output_token_ids, o.text) for o in outs]


def agreement(outputs: list, reference: Path) -> dict:
    from llmc.evaluate import greedy_agreement

    return greedy_agreement([(p, o) for p, o, _ in outputs], reference).to_dict()


def decode_tok_s(engine: Path, repeats: int = 3, tokens: int = DECODE_TOKENS) -> dict:
    """Single-stream decode speed: 1 / median time per output token over `repeats` runs of one
    request generating `tokens` tokens (EOS ignored); the median of the runs' medians."""
    from llmc.runtime.llm import LLM
    from llmc.runtime.sampling import SamplingParams

    llm = LLM(engine)
    llm.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, ignore_eos=True), chat=True)  # warm-up
    tpots = []
    for _ in range(repeats):
        out = llm.generate([PROMPTS[0]], SamplingParams(max_new_tokens=tokens, ignore_eos=True), chat=True)[0]
        tpots.append(out.tpot)
    tpot = statistics.median(tpots)
    return {"decode_tok_s": 1.0 / tpot, "tpot_ms": 1e3 * tpot, "tpot_ms_all": [round(1e3 * t, 2) for t in tpots]}
