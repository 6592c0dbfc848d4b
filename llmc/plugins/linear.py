"""Linear layers, float and quantized, as MatMul patterns backends accelerate.

The canonical weight layout in `LinearSpec` is the checkpoint's [out, in]; the emitted MatMul
weight is [in, out] (transposed once at build time). Per kind:

- float:    MatMul(x, W).
- int8_sq:  SmoothQuant W8A8. x * pre_quant_scale -> QuantizeLinear/DequantizeLinear (int8,
            per-tensor, zero point 0) -> MatMul <- DequantizeLinear(W int8, per-output-channel
            scale, axis 1, zero point 0). ONNX Runtime fuses this into its int8 GEMM; TensorRT
            into an INT8 GEMM.
- w8a16:    int8 weight-only, per-channel: MatMul(x, DequantizeLinear(W int8)).
- int4_awq / w4a16: MatMul(x * pre_quant_scale, DequantizeLinear(W int4 [in,out], block scales
            [in/g, out], axis 0, block_size g, no zero point)). ONNX Runtime fuses it into its
            4-bit MatMul (MatMulNBits); TensorRT into its INT4 weight-only GEMM.
- fp8:      TensorRT: FP8 Q/DQ on activations and weights. ONNX Runtime CPU (no FP8 GEMM): the
            weight is dequantized at build time from its exact FP8 values (fp8 * scale in
            float32: the same numbers the Q/DQ graph computes) and activations are rounded
            through Div -> Cast(float8e4m3fn, saturate) -> Cast -> Mul, which is exactly
            QuantizeLinear/DequantizeLinear's arithmetic.
- w4a8_awq: INT4 block weights (block scale x weight_scale_2) and FP8 activations, lowered like
            int4_awq for the weight and like fp8 for the activation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from llmc.engine.graph import GraphBuilder, pack_int4
from llmc.plugins.base import Target

KINDS = ("float", "int8_sq", "w8a16", "int4_awq", "w4a16", "fp8", "w4a8_awq")
FP8_MAX = 448.0


@dataclass
class LinearSpec:
    """One linear in canonical form (all arrays numpy, weight [out, in]).

    weight: float32 for "float" and "fp8" (exact FP8 values, i.e. the unscaled e4m3 numbers);
    int8 for int8 kinds; int8 holding values in [-8, 7] for int4 kinds.
    weight_scale: [] / [out] / [out, in // group_size] (float32).
    input_scale: per-tensor activation scale (int8_sq, fp8, w4a8_awq).
    pre_quant_scale: [in], multiplied into the activation before the matmul (AWQ, SmoothQuant).
    weight_scale_2: per-tensor second-level weight scale (w4a8_awq); folded into the block scales.
    """

    kind: str
    weight: np.ndarray
    weight_scale: np.ndarray | None = None
    input_scale: float | None = None
    pre_quant_scale: np.ndarray | None = None
    weight_scale_2: float | None = None
    group_size: int | None = None
    bias: np.ndarray | None = None

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def dequantized(self) -> np.ndarray:
        """The float32 [out, in] weight this spec stands for."""
        w = self.weight.astype(np.float32)
        if self.kind == "float":
            return w
        s = np.asarray(self.weight_scale, np.float32)
        if self.weight_scale_2 is not None:
            s = s * np.float32(self.weight_scale_2)
        if s.ndim == 2 and s.shape[1] != w.shape[1]:  # block scales
            g = w.shape[1] // s.shape[1]
            return (w.reshape(w.shape[0], -1, g) * s[:, :, None]).reshape(w.shape)
        if s.ndim == 1:
            return w * s[:, None]
        return w * s


def concat_out(specs: list[LinearSpec]) -> LinearSpec:
    """Stack linears that share an input along the output dim (gated MLP fc + gate).

    Per-tensor weight scales become per-channel vectors; activation scales and pre-quant scales
    must agree (they do for llmc checkpoints: the reference model calibrates the fused gate_up).
    """
    first = specs[0]
    if any(s.kind != first.kind for s in specs):
        raise ValueError("cannot fuse linears of different quantization kinds")
    weight = np.concatenate([s.weight for s in specs], 0)
    scale = None
    if first.weight_scale is not None:
        parts = []
        for s in specs:
            ws = np.asarray(s.weight_scale, np.float32)
            if s.weight_scale_2 is not None:
                ws = ws * np.float32(s.weight_scale_2)
            if ws.size == 1 and ws.ndim <= 1:
                ws = np.full(s.out_features, float(ws.reshape(-1)[0]), np.float32)
            parts.append(ws)
        scale = np.concatenate(parts, 0)
    input_scale = None
    if first.input_scale is not None:
        input_scale = max(float(s.input_scale) for s in specs)
    pqs = first.pre_quant_scale
    for s in specs[1:]:
        if (pqs is None) != (s.pre_quant_scale is None) or (
                pqs is not None and not np.array_equal(pqs, s.pre_quant_scale)):
            raise ValueError("linears sharing an input have different pre-quant scales")
    bias = None
    if any(s.bias is not None for s in specs):
        bias = np.concatenate([s.bias if s.bias is not None else np.zeros(s.out_features, np.float32)
                               for s in specs])
    return LinearSpec(first.kind, weight, scale, input_scale, pqs, None, first.group_size, bias)


def _fake_quant_fp8(g: GraphBuilder, t: Target, x: str, scale: float, name: str) -> str:
    s = g.const(np.float32(scale), t.dtype)
    if t.fp8 == "qdq":
        zp = g.const(np.zeros((), np.float32), TensorProto.FLOAT8E4M3FN)
        q = g.op("QuantizeLinear", [x, s, zp], name=f"{name}_aq")
        return g.op("DequantizeLinear", [q, s], name=f"{name}_adq")
    scaled = g.op("Div", [x, s], name=f"{name}_adiv")
    q = g.op("Cast", [scaled], name=f"{name}_afp8", to=TensorProto.FLOAT8E4M3FN, saturate=1)
    back = g.op("Cast", [q], name=f"{name}_aback", to=t.dtype)
    return g.op("Mul", [back, s], name=f"{name}_adq")


def _fp8_bits(values: np.ndarray) -> bytes:
    import ml_dtypes

    return np.ascontiguousarray(values.astype(np.float32).astype(ml_dtypes.float8_e4m3fn)).view(np.uint8).tobytes()


def emit_linear(g: GraphBuilder, t: Target, x: str, spec: LinearSpec, name: str) -> str:
    """x [..., in] -> [..., out] (+ bias)."""
    k = spec.kind
    if spec.pre_quant_scale is not None:
        x = g.op("Mul", [x, g.weight(f"{name}.pre_quant_scale", spec.pre_quant_scale.astype(np.float32), t.dtype)],
                 name=f"{name}_smooth")
    if k == "float" or (k == "fp8" and t.fp8 == "emulate"):
        if k == "fp8":
            x = _fake_quant_fp8(g, t, x, float(spec.input_scale), name)
        w = g.weight(f"{name}.weight", spec.dequantized().T, t.dtype)
        y = g.op("MatMul", [x, w], name=name)
    elif k in ("int8_sq", "w8a16"):
        if k == "int8_sq":
            s = g.const(np.float32(spec.input_scale), t.dtype)
            zp = g.const(np.int8(0), TensorProto.INT8)
            q = g.op("QuantizeLinear", [x, s, zp], name=f"{name}_aq")
            x = g.op("DequantizeLinear", [q, s, zp], name=f"{name}_adq")
        w = g.weight(f"{name}.weight", spec.weight.T.astype(np.int8))
        ws = np.asarray(spec.weight_scale, np.float32).reshape(-1)
        if ws.size == 1:
            ws = np.full(spec.out_features, ws[0], np.float32)
        s_w = g.weight(f"{name}.weight_scale", ws, t.dtype)
        zp_w = g.weight(f"{name}.weight_zero_point", np.zeros(spec.out_features, np.int8))
        wd = g.op("DequantizeLinear", [w, s_w, zp_w], name=f"{name}_wdq", axis=1)
        y = g.op("MatMul", [x, wd], name=name)
    elif k in ("int4_awq", "w4a16", "w4a8_awq"):
        if k == "w4a8_awq":
            x = _fake_quant_fp8(g, t, x, float(spec.input_scale), name)
        gs = int(spec.group_size)
        wt = np.ascontiguousarray(spec.weight.T)  # [in, out]
        w = g.raw_weight(f"{name}.weight", TensorProto.INT4, wt.shape, pack_int4(wt))
        bs = np.asarray(spec.weight_scale, np.float32)
        if spec.weight_scale_2 is not None:
            bs = bs * np.float32(spec.weight_scale_2)
        s_w = g.weight(f"{name}.weight_scale", np.ascontiguousarray(bs.T), t.dtype)  # [in/g, out]
        wd = g.op("DequantizeLinear", [w, s_w], name=f"{name}_wdq", axis=0, block_size=gs)
        y = g.op("MatMul", [x, wd], name=name)
    elif k == "fp8":  # TensorRT: Q/DQ both sides
        x = _fake_quant_fp8(g, t, x, float(spec.input_scale), name)
        wt = np.ascontiguousarray(spec.weight.T)
        w = g.raw_weight(f"{name}.weight", TensorProto.FLOAT8E4M3FN, wt.shape, _fp8_bits(wt))
        ws = np.asarray(spec.weight_scale, np.float32).reshape(-1)
        if ws.size == 1:
            s_w = g.const(np.float32(ws[0]), t.dtype)
            wd = g.op("DequantizeLinear", [w, s_w], name=f"{name}_wdq")
        else:
            s_w = g.weight(f"{name}.weight_scale", ws, t.dtype)
            wd = g.op("DequantizeLinear", [w, s_w], name=f"{name}_wdq", axis=1)
        y = g.op("MatMul", [x, wd], name=name)
    else:
        raise ValueError(f"unknown linear kind {k!r}")
    if spec.bias is not None:
        y = g.op("Add", [y, g.weight(f"{name}.bias", spec.bias.astype(np.float32), t.dtype)], name=f"{name}_bias")
    return y
