"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight.

ONNX Runtime: the standard opset-23 `RMSNormalization` node (one kernel). TensorRT's ONNX parser
has no RMSNormalization importer, so for TensorRT it is lowered to Pow/ReduceMean/Add/Sqrt/Div/
Mul, the pattern TensorRT's normalization fusion recognises. Both are exact to float rounding.

`emit_add_rmsnorm` is the residual add and the next norm together: on ONNX Runtime one
com.microsoft SkipSimplifiedLayerNormalization node (float sum, then the same RMSNorm; it also
returns the sum, the new residual stream), on TensorRT Add + the standard lowering.
"""

from __future__ import annotations

import numpy as np

from llmc.engine.graph import GraphBuilder
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


def emit_add_rmsnorm(g: GraphBuilder, t: Target, x: str, delta: str, weight: np.ndarray, eps: float,
                     name: str) -> tuple[str, str]:
    """(rmsnorm(x + delta), x + delta): the residual add fused into the norm that follows it."""
    if t.is_trt:
        s = g.op("Add", [x, delta], name=f"{name}_residual")
        return emit_rmsnorm(g, t, s, weight, eps, name), s
    w = g.weight(f"{name}.weight", weight.astype(np.float32), t.dtype)
    h = g.fresh(name)
    s = g.fresh(f"{name}_residual")
    g.op("SkipSimplifiedLayerNormalization", [x, delta, w], name=name, outputs=[h, "", "", s],
         domain="com.microsoft", epsilon=float(eps))
    return h, s
