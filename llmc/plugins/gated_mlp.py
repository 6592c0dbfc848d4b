"""Gated MLP (SwiGLU): proj(silu(fc(x)) * gate(x)) with fc and gate as ONE matmul.

fc (HF gate_proj, the activated branch) and gate (HF up_proj) share their input, so they are
stacked along the output dim at build time (`llmc.quantize.layout.concat_out`: [fc; gate], the
reference model's `mlp.gate_up`) and
run as a single (possibly quantized) matmul whose output is split in two. SiLU is x*Sigmoid(x):
standard ops that ONNX Runtime and TensorRT both fuse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmc.plugins.graph import GraphBuilder
from llmc.plugins.base import Target
from llmc.plugins.linear import emit_linear

if TYPE_CHECKING:  # pragma: no cover
    from llmc.quantize.layout import QLinear


def emit_gated_mlp(g: GraphBuilder, t: Target, x: str, gate_up: QLinear, proj: QLinear,
                   name: str) -> str:
    inter = gate_up.out_features // 2
    fused = emit_linear(g, t, x, gate_up, f"{name}.gate_up")
    fc, up = g.op("Split", [fused, g.const([inter, inter])], n_out=2, name=f"{name}_split", axis=-1)
    act = g.op("Mul", [fc, g.op("Sigmoid", [fc], name=f"{name}_sigmoid")], name=f"{name}_silu")
    h = g.op("Mul", [act, up], name=f"{name}_gated")
    return emit_linear(g, t, h, proj, f"{name}.proj")
