"""Tensor-parallel sharding, as TensorRT-LLM shards a Llama-family checkpoint.

Column-parallel layers (qkv, mlp.fc, mlp.gate, lm_head) split their output dimension; row-parallel
layers (attention.dense, mlp.proj) split their input dimension; everything else is replicated.
The fused qkv is split per head group: rank r holds [q_r; k_r; v_r]. lm_head's vocabulary is
padded to a multiple of tp_size, as TensorRT-LLM does. Merging is the exact inverse, so a
checkpoint of any rank count loads into one reference model.
"""

from __future__ import annotations

import re

import torch

from llmc.checkpoint.config import CheckpointConfig
from llmc.errors import LlmcError

# (pattern on the tensor name, how it is sharded). First match wins; no match = replicated.
SHARD_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\.attention\.qkv\.(weight|bias)$"), "qkv"),
    (re.compile(r"\.mlp\.(fc|gate)\.(weight|bias)$"), "column"),
    (re.compile(r"\.(attention\.dense|mlp\.proj)\.weight$"), "row"),
    (re.compile(r"^lm_head\.weight$"), "vocab"),
]


def shard_kind(name: str) -> str:
    for pattern, kind in SHARD_RULES:
        if pattern.search(name):
            return kind
    return "replicated"


def check_tp_size(cfg: CheckpointConfig, tp: int, source: str) -> None:
    """Reject a tp size that does not divide what it must split, naming each offender."""
    if tp < 1:
        raise LlmcError(f"--tp-size must be >= 1, got {tp}")
    bad = [f"{what}={n}" for what, n in (
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
        ("intermediate_size", cfg.intermediate_size),
    ) if n % tp]
    if bad:
        raise LlmcError(f"--tp-size {tp} does not divide {', '.join(bad)}", source)


def _qkv_sizes(cfg: CheckpointConfig) -> list[int]:
    return [cfg.q_size, cfg.kv_size, cfg.kv_size]


def padded_vocab(cfg: CheckpointConfig, tp: int) -> int:
    return -(-cfg.vocab_size // tp) * tp


def shard(name: str, t: torch.Tensor, rank: int, tp: int, cfg: CheckpointConfig) -> torch.Tensor:
    if tp == 1:
        return t
    kind = shard_kind(name)
    if kind == "replicated":
        return t
    if kind == "qkv":
        return torch.cat([p.chunk(tp, 0)[rank] for p in t.split(_qkv_sizes(cfg), 0)], 0).contiguous()
    if kind == "column":
        return t.chunk(tp, 0)[rank].contiguous()
    if kind == "row":
        return t.chunk(tp, -1)[rank].contiguous()
    # vocab: pad rows to a multiple of tp, then split
    pad = padded_vocab(cfg, tp) - t.shape[0]
    if pad:
        t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))], 0)
    return t.chunk(tp, 0)[rank].contiguous()


def shard_shape(name: str, shape: tuple[int, ...], tp: int, cfg: CheckpointConfig) -> tuple[int, ...]:
    kind = shard_kind(name)
    if tp == 1 or kind == "replicated":
        return shape
    if kind == "row":
        return (*shape[:-1], shape[-1] // tp)
    if kind == "vocab":
        return (padded_vocab(cfg, tp) // tp, *shape[1:])
    return (shape[0] // tp, *shape[1:])


def merge(name: str, shards: list[torch.Tensor], cfg: CheckpointConfig) -> torch.Tensor:
    tp = len(shards)
    if tp == 1:
        return shards[0]
    kind = shard_kind(name)
    if kind == "replicated":
        return shards[0]
    if kind == "qkv":
        sizes = [s // tp for s in _qkv_sizes(cfg)]
        parts = [s.split(sizes, 0) for s in shards]
        return torch.cat([torch.cat([p[j] for p in parts], 0) for j in range(3)], 0)
    if kind == "row":
        return torch.cat(shards, -1)
    merged = torch.cat(shards, 0)
    return merged[: cfg.vocab_size] if kind == "vocab" else merged
