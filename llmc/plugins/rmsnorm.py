"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight.

ONNX Runtime: the standard opset-23 `RMSNormalization` node (one kernel). TensorRT's ONNX parser
has no RMSNormalization importer, so for TensorRT it is lowered to Pow/ReduceMean/Add/Sqrt/Div/
Mul, the pattern TensorRT's normalization fusion recognises. Both are exact to float rounding.
"""

from __future__ import annotations

import numpy as np

from llmc.plugins.graph import CONTRIB_DOMAIN, GraphBuilder
from llmc.plugins.base import Target


def emit_rmsnorm(g: GraphBuilder, t: Target, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    w = g.weight(f"{name}.weight", weight.astype(np.float32), t.dtype)
    if not t.is_trt:
        return g.op("RMSNormalization", [x, w], name=name, axis=-1, epsilon=float(eps))
    sq = g.op("Pow", [x, g.const(np.float32(2.0), t.dtype)], name=f"{name}_sq")
    mean = g.op("ReduceMean", [sq, g.const([-1])], name=f"{name}_mean", keepdims=1)
    var = g.op("Add", [mean, g.const(np.float32(eps), t.dtype)], name=f"{name}_eps")
    rms = g.op("Sqrt", [var], name=f"{name}_rms")
    normed = g.op("Div", [x, rms], name=f"{name}_div")
    return g.op("Mul", [normed, w], name=name)


def emit_add_rmsnorm(g: GraphBuilder, t: Target, x: str, skip: str | None, weight: np.ndarray, eps: float,
                     name: str) -> tuple[str, str]:
    """(RMSNorm(x + skip), x + skip): a residual add and the norm after it. On ONNX Runtime one
    com.microsoft SkipSimplifiedLayerNormalization kernel returns both (its sum output carries the
    residual stream on); TensorRT gets the standard Add and norm. skip None: no add."""
    if skip is None:
        return emit_rmsnorm(g, t, x, weight, eps, name), x
    if t.is_trt:
        total = g.op("Add", [x, skip], name=f"{name}_residual")
        return emit_rmsnorm(g, t, total, weight, eps, name), total
    w = g.weight(f"{name}.weight", weight.astype(np.float32), t.dtype)
    normed, total = g.fresh(name), g.fresh(f"{name}_residual")
    g.op("SkipSimplifiedLayerNormalization", [x, skip, w], name=name, outputs=[normed, "", "", total],
         domain=CONTRIB_DOMAIN, epsilon=float(eps))
    return normed, total
