"""Rotary position embedding frequencies for every scaling type a checkpoint can carry.

One table maps `rotary_scaling["type"]` to a function returning (inv_freq, attention_factor);
the reference model and the engine builder both call `rope_frequencies`, so the two can only
disagree through the arithmetic that follows, which the parity tests check against transformers.
Frequencies are computed in float32, as transformers does, so long positions round identically.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from llmc.checkpoint.config import CheckpointConfig


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _default(cfg: CheckpointConfig, s: dict[str, Any], dim: int, seq_len: int | None):
    return _base_inv_freq(cfg.rotary_base, dim), 1.0


def _linear(cfg, s, dim, seq_len):
    return _base_inv_freq(cfg.rotary_base, dim) / s["factor"], 1.0


def _dynamic(cfg, s, dim, seq_len):
    """Dynamic NTK: the base grows once the sequence passes max_position_embeddings."""
    max_pos = cfg.max_position_embeddings
    seq_len = max(seq_len or max_pos, max_pos)
    factor = s["factor"]
    base = cfg.rotary_base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim), 1.0


def _llama3(cfg, s, dim, seq_len):
    inv_freq = _base_inv_freq(cfg.rotary_base, dim)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def _yarn(cfg, s, dim, seq_len):
    base = cfg.rotary_base
    orig = s.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = s.get("factor") or cfg.max_position_embeddings / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


ROPE_TYPES: dict[str, Callable[..., tuple[torch.Tensor, float]]] = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "llama3": _llama3,
    "yarn": _yarn,
}


def rope_frequencies(cfg: CheckpointConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [head_dim/2], attention_factor applied to cos and sin)."""
    scaling = cfg.rotary_scaling or {}
    dim = cfg.rotary_dim or cfg.head_size
    return ROPE_TYPES[scaling.get("type", "default")](cfg, scaling, dim, seq_len)


def rope_cos_sin(cfg: CheckpointConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [..., head_dim] for integer positions, in the rotate-half (GPT-NeoX) layout."""
    seq_len = int(positions.max()) + 1 if positions.numel() else None
    inv_freq, attn_factor = rope_frequencies(cfg, seq_len)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos() * attn_factor, emb.sin() * attn_factor
