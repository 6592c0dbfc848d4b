"""Rotary position embedding (rotate-half / GPT-NeoX layout) as four standard ops.

The cos/sin tables [max_pos, head_dim] are computed at build time with `llmc.models.rope` (the
same frequencies the reference model uses, every scaling type), gathered once per step by the
packed token positions, and applied to Q and K together:

    out = x * cos + swap_halves(x) * sin_signed,   sin_signed = [-sin_half, sin_half]

swap_halves is one Gather along the last axis, so RoPE costs Gather + 2 Mul + Add per layer.
It runs on the whole QKV output [T, q + k + v heads, hd] with per-head tables that are the
identity on the V heads (cos 1, sin 0: v * 1 + swapped * 0 == v exactly), so q, k and v need one
Split after it instead of one before and one after.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

from llmc.checkpoint.config import CheckpointConfig
from llmc.plugins.graph import GraphBuilder
from llmc.errors import UnsupportedError
from llmc.plugins.base import Target


def rope_tables(cfg: CheckpointConfig, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos [P, hd], sin_signed [P, hd]) in float32, matching llmc.models.rope.rope_cos_sin."""
    from llmc.models.rope import rope_cos_sin

    rot = cfg.rotary_dim or cfg.head_size
    if rot != cfg.head_size:
        raise UnsupportedError(f"partial rotary embeddings (rotary_dim {rot} != head_size "
                               f"{cfg.head_size}) are not supported by the engine builder")
    scaling = (cfg.rotary_scaling or {}).get("type", "default")
    if scaling == "dynamic" and max_positions > cfg.max_position_embeddings:
        raise UnsupportedError("dynamic-NTK RoPE depends on the running length; build with "
                               f"--max-seq-len <= {cfg.max_position_embeddings}")
    pos = torch.arange(max_positions)
    cos, sin = rope_cos_sin(cfg, pos)
    cos, sin = cos.float().numpy(), sin.float().numpy()
    half = cfg.head_size // 2
    sin_signed = np.concatenate([-sin[:, :half], sin[:, half:]], -1)
    return np.ascontiguousarray(cos), np.ascontiguousarray(sin_signed)


def emit_rope_tables(g: GraphBuilder, t: Target, cos: np.ndarray, sin: np.ndarray, positions: str) -> tuple[str, str]:
    """Per-step cos/sin [T, 1, hd] gathered by the packed positions (shared by every layer) from
    `rope_tables`' (cos, sin_signed)."""
    cos_w = g.weight("rope.cos", cos, t.dtype)
    sin_w = g.weight("rope.sin_signed", sin, t.dtype)
    axes = g.const([1])
    c = g.op("Unsqueeze", [g.op("Gather", [cos_w, positions], name="rope_cos_t", axis=0), axes], name="rope_cos")
    s = g.op("Unsqueeze", [g.op("Gather", [sin_w, positions], name="rope_sin_t", axis=0), axes], name="rope_sin")
    return c, s


def emit_rope(g: GraphBuilder, x: str, cos: str, sin: str, head_dim: int, name: str) -> str:
    """x [T, heads, hd] -> rotated x."""
    half = head_dim // 2
    perm = g.const(np.concatenate([np.arange(half, head_dim), np.arange(0, half)]).astype(np.int64))
    swapped = g.op("Gather", [x, perm], name=f"{name}_swap", axis=-1)
    a = g.op("Mul", [x, cos], name=f"{name}_cos")
    b = g.op("Mul", [swapped, sin], name=f"{name}_sin")
    return g.op("Add", [a, b], name=name)


def emit_head_tables(g: GraphBuilder, t: Target, cos: str, sin: str, rotated: int, total: int) -> tuple[str, str]:
    """cos/sin [T, 1, hd] -> [T, total, hd] tables that rotate the first `rotated` heads and leave
    the others unchanged (cos 1, sin 0), once per step."""
    rot = g.const((np.arange(total) < rotated).reshape(1, total, 1), TensorProto.BOOL, hint="rope_rotated_heads")
    c = g.op("Where", [rot, cos, g.const(np.float32(1.0), t.dtype)], name="rope_cos_heads")
    s = g.op("Where", [rot, sin, g.const(np.float32(0.0), t.dtype)], name="rope_sin_heads")
    return c, s
