"""Linear layers, float and quantized, as MatMul patterns each backend accelerates.

A `LinearSpec` is a linear in canonical form: a weight format (float / int8 / int4 / fp8), an
activation treatment (none / int8 static / int8 per-token / fp8 static), an optional pre-quant
scale and bias. The emitted MatMul weight is [in, out] (transposed once at build time).

Weights
- float: MatMul(x, W).
- int8:  DequantizeLinear(W int8 [in, out], per-output-channel scale, axis 1, zero point 0);
         with block scales [in/g, out]: opset-21 blocked DQ, axis 0, which ONNX Runtime fuses
         into its 8-bit MatMulNBits (see `exact_int8_blocks`). Weight-only int8 (W8A16) on ONNX
         Runtime is always emitted blocked (`blocked_int8`: the per-channel scale repeated per
         block, the same numbers), since ORT would fold a per-channel DQ into an fp32 weight.
- int4:  DequantizeLinear(W int4 [in, out], block scales [in/g, out], axis 0, block_size g, no
         zero point): opset-21 blocked DQ; ONNX Runtime fuses DQ+MatMul into MatMulNBits,
         TensorRT into its INT4 weight-only GEMM.
- zero points (groupwise int4/int8 with real = q * s + z, e.g. GGUF Q4_1): the symmetric part as
  above plus a small float MatMul of per-group activation sums with z (`_zero_term`); exact in
  real arithmetic, and keeps the fused kernels.
- fp8:   TensorRT: DequantizeLinear(W float8e4m3fn, scale). ONNX Runtime CPU has no FP8 GEMM
         (DQ from FP8 runs but is 14-30x slower than fp32): the weight is dequantized at build
         time from its exact FP8 values (fp8 * scale in float32, the same numbers DQ yields).
Activations
- int8 (SmoothQuant, static per-tensor): QuantizeLinear/DequantizeLinear, int8, zero point 0.
  With int8 weights ONNX Runtime fuses Q/DQ + MatMul into its int8 GEMM; TensorRT likewise.
- int8 per-token (dynamic): scale = max|x| / 127 per row, rounded with Div/Round/Clip/Mul (exact
  fake quantization; neither backend takes non-constant per-axis activation scales in Q/DQ).
- fp8 per-token (dynamic, FP8_PER_CHANNEL_PER_TOKEN): scale = max|x| / 448 per row, then the
  saturating Cast pair below (exact fake quantization; emitted alike for both backends).
- fp8 (static per-tensor): TensorRT: FP8 QuantizeLinear/DequantizeLinear (fused into the FP8
  GEMM). ONNX Runtime CPU: Div -> Cast(float8e4m3fn, saturate) -> Cast -> Mul, which is exactly
  QuantizeLinear/DequantizeLinear's arithmetic (round to nearest even, saturate at +-448).
- pre_quant_scale (AWQ, SmoothQuant): one Mul on the activation before anything else.

W4A8 AWQ is executed as TensorRT-LLM does: the INT4 weight becomes FP8 per group,
fp8(q * s_group / s2), so the graph stores those FP8 values (one byte per weight) with the
per-tensor scale s2 and treats the layer as FP8 x FP8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from llmc.plugins.graph import GraphBuilder, pack_int4
from llmc.plugins.base import Target

WEIGHT_FORMATS = ("float", "int8", "int4", "fp8")
ACTIVATIONS = (None, "int8", "int8_token", "fp8", "fp8_token")


@dataclass
class LinearSpec:
    """One linear in canonical form (numpy; weight [out, in]).

    weight: float32 for "float" and "fp8" (fp8: the exact FP8 values, unscaled); int8 for "int8";
    int8 holding values in [-8, 7] for "int4".
    weight_scale: None (float) / [] / [out] / [out, in // group_size] float32.
    """

    wfmt: str
    weight: np.ndarray
    weight_scale: np.ndarray | None = None
    group_size: int | None = None
    act: str | None = None
    input_scale: float | None = None
    pre_quant_scale: np.ndarray | None = None
    bias: np.ndarray | None = None
    zero: np.ndarray | None = None  # [out, in // group_size] additive zeros (groupwise with zero points)

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def kind(self) -> str:
        return self.wfmt if self.act is None else f"{self.wfmt}/{self.act}"

    def scale_per_channel(self) -> np.ndarray:
        """weight_scale as [out] (per-tensor scales broadcast)."""
        s = np.asarray(self.weight_scale, np.float32)
        return np.full(self.out_features, float(s.reshape(-1)[0]), np.float32) if s.size == 1 else s.reshape(-1)

    def dequantized(self) -> np.ndarray:
        """The float32 [out, in] weight this spec stands for."""
        w = self.weight.astype(np.float32)
        if self.wfmt == "float":
            return w
        s = np.asarray(self.weight_scale, np.float32)
        if s.ndim == 2:  # block scales along the input dim
            g = w.shape[1] // s.shape[1]
            w = w.reshape(w.shape[0], -1, g) * s[:, :, None]
            if self.zero is not None:
                w = w + np.asarray(self.zero, np.float32)[:, :, None]
            return w.reshape(self.weight.shape)
        return w * self.scale_per_channel()[:, None]


INT8_BLOCK = 32  # GGUF Q8_0's block: the grid such float weights already lie on


def exact_int8_blocks(weight: np.ndarray, block: int = INT8_BLOCK) -> LinearSpec | None:
    """A float [out, in] weight as int8 x per-block scale, if that is EXACT; else None.

    Weights dequantized from GGUF Q8_0 (SmolLM2's embedded model ships its tied embedding so)
    are d * q with q in [-127, 127] per block of 32 along the input: stored that way they take a
    quarter of the bytes and read back bit for bit. Nothing is rounded here: one element off the
    grid and the weight stays float.
    """
    out, k = weight.shape
    if k % block:
        return None
    w = np.asarray(weight, np.float32).reshape(out, k // block, block)
    scale = np.abs(w).max(-1) / np.float32(127.0)                      # [out, blocks]
    safe = np.where(scale == 0, np.float32(1.0), scale)
    q = np.rint(w / safe[..., None])
    if np.abs(q).max() > 127 or not np.array_equal(q * safe[..., None], w):
        return None
    return LinearSpec("int8", q.astype(np.int8).reshape(out, k), scale.astype(np.float32), block)


def blocked_int8(spec: LinearSpec) -> LinearSpec | None:
    """A per-channel int8 weight-only linear as the same int8 values with its per-channel scale
    repeated over blocks along the input (128, 64 or 32 wide; the first that divides it): an
    exact re-statement that ONNX Runtime runs as its 8-bit MatMulNBits instead of constant-folding
    the per-channel DequantizeLinear into a float32 weight (fp32 speed). None if no block fits."""
    block = next((b for b in (128, 64, INT8_BLOCK) if spec.in_features % b == 0), None)
    if block is None:
        return None
    scale = np.repeat(spec.scale_per_channel()[:, None], spec.in_features // block, axis=1)
    return LinearSpec("int8", spec.weight, scale, block, spec.act, spec.input_scale, spec.pre_quant_scale, spec.bias)


def concat_out(specs: list[LinearSpec]) -> LinearSpec:
    """Stack linears that share an input along the output dim (gated MLP fc + gate).

    Per-tensor weight scales become per-channel vectors. Activation treatment and pre-quant
    scales must agree (they do for llmc checkpoints: the reference model calibrates gate_up
    as one linear); otherwise ValueError.
    """
    first = specs[0]
    for s in specs[1:]:
        if s.wfmt != first.wfmt or s.act != first.act or s.group_size != first.group_size:
            raise ValueError("linears sharing an input are quantized differently")
        if s.input_scale != first.input_scale:
            raise ValueError("linears sharing an input have different activation scales")
        if (first.pre_quant_scale is None) != (s.pre_quant_scale is None) or (
                first.pre_quant_scale is not None and not np.array_equal(first.pre_quant_scale, s.pre_quant_scale)):
            raise ValueError("linears sharing an input have different pre-quant scales")
    weight = np.concatenate([s.weight for s in specs], 0)
    scale = None
    if first.weight_scale is not None:
        if np.asarray(first.weight_scale).ndim == 2:
            scale = np.concatenate([np.asarray(s.weight_scale, np.float32) for s in specs], 0)
        else:
            scale = np.concatenate([s.scale_per_channel() for s in specs], 0)
    zero = None
    if any(s.zero is not None for s in specs):
        zero = np.concatenate([np.asarray(s.zero, np.float32) if s.zero is not None
                               else np.zeros_like(np.asarray(s.weight_scale, np.float32)) for s in specs], 0)
    bias = None
    if any(s.bias is not None for s in specs):
        bias = np.concatenate([s.bias if s.bias is not None else np.zeros(s.out_features, np.float32)
                               for s in specs])
    return LinearSpec(first.wfmt, weight, scale, first.group_size, first.act, first.input_scale,
                      first.pre_quant_scale, bias, zero)


def _fake_quant_fp8(g: GraphBuilder, t: Target, x: str, scale: float, name: str) -> str:
    s = g.const(np.float32(scale), t.dtype)
    if t.fp8 == "qdq":
        zp = g.const(np.zeros((), np.float32), TensorProto.FLOAT8E4M3FN)
        q = g.op("QuantizeLinear", [x, s, zp], name=f"{name}_aq")
        return g.op("DequantizeLinear", [q, s, zp], name=f"{name}_adq")
    scaled = g.op("Div", [x, s], name=f"{name}_adiv")
    q = g.op("Cast", [scaled], name=f"{name}_afp8", to=TensorProto.FLOAT8E4M3FN, saturate=1)
    back = g.op("Cast", [q], name=f"{name}_aback", to=t.dtype)
    return g.op("Mul", [back, s], name=f"{name}_adq")


def _fake_quant_fp8_token(g: GraphBuilder, t: Target, x: str, name: str) -> str:
    """Per-token dynamic FP8 (TensorRT-LLM's FP8 rowwise activations): s_t = max|x_row| / 448,
    fp8(x / s_t) * s_t through a saturating Cast (exactly QuantizeLinear's rounding)."""
    if t.is_trt:
        from llmc.errors import UnsupportedError

        raise UnsupportedError("FP8 per-token (dynamic) activations have no TensorRT ONNX lowering here (TensorRT-LLM "
                               "runs them with its FP8 rowwise plugin: use --backend tensorrt-llm, or onnxruntime)")
    amax = g.op("ReduceMax", [g.op("Abs", [x], name=f"{name}_aabs"), g.const([-1])], name=f"{name}_aamax",
                keepdims=1)
    s = g.op("Div", [amax, g.const(np.float32(448.0), t.dtype)], name=f"{name}_ascale")
    zero = g.op("Equal", [amax, g.const(np.float32(0.0), t.dtype)], name=f"{name}_azero")
    s = g.op("Where", [zero, g.const(np.float32(1.0), t.dtype), s], name=f"{name}_ascale_nz")
    scaled = g.op("Div", [x, s], name=f"{name}_adiv")
    q = g.op("Cast", [scaled], name=f"{name}_afp8", to=TensorProto.FLOAT8E4M3FN, saturate=1)
    back = g.op("Cast", [q], name=f"{name}_aback", to=t.dtype)
    return g.op("Mul", [back, s], name=f"{name}_adq")


def _quant_int8_token(g: GraphBuilder, t: Target, x: str, name: str) -> tuple[str, str]:
    """Per-token symmetric int8: (q as float values in [-128, 127], scale s_t = max|x_row| / 127)."""
    amax = g.op("ReduceMax", [g.op("Abs", [x], name=f"{name}_aabs"), g.const([-1])], name=f"{name}_aamax",
                keepdims=1)
    s = g.op("Div", [amax, g.const(np.float32(127.0), t.dtype)], name=f"{name}_ascale")
    zero = g.op("Equal", [amax, g.const(np.float32(0.0), t.dtype)], name=f"{name}_azero")
    s = g.op("Where", [zero, g.const(np.float32(1.0), t.dtype), s], name=f"{name}_ascale_nz")
    q = g.op("Round", [g.op("Div", [x, s], name=f"{name}_adiv")], name=f"{name}_around")
    q = g.op("Clip", [q, g.const(np.float32(-128.0), t.dtype), g.const(np.float32(127.0), t.dtype)],
             name=f"{name}_aclip")
    return q, s


def _fake_quant_int8_token(g: GraphBuilder, t: Target, x: str, name: str) -> str:
    q, s = _quant_int8_token(g, t, x, name)
    return g.op("Mul", [q, s], name=f"{name}_adq")


def _emit_matmul_integer(g: GraphBuilder, t: Target, x: str, spec: LinearSpec, name: str) -> str:
    """SmoothQuant with per-token dynamic int8 activations on ONNX Runtime: integer GEMM.

    q = clamp(round(x / s_t), -128, 127) with s_t = max|x_row| / 127; y = (q @ W_q) * s_t * s_w.
    MatMulInteger (uint8 - 128 x int8 -> int32) is exact and runs on ORT's int8 GEMM; TensorRT
    has no MatMulInteger importer, so tensorrt targets use the fake-quant form instead.
    """
    q, s = _quant_int8_token(g, t, x, name)
    # As uint8 with zero point 128 (exact: q + 128 - 128): ORT's u8s8 GEMM is 25-40x faster than
    # its s8s8 path (measured, M = 1..256).
    qu = g.op("Add", [q, g.const(np.float32(128.0), t.dtype)], name=f"{name}_aoffset")
    q8 = g.op("Cast", [qu], name=f"{name}_auint8", to=TensorProto.UINT8)
    w = g.weight(f"{name}.weight", np.ascontiguousarray(spec.weight.T.astype(np.int8)))
    acc = g.op("MatMulInteger", [q8, w, g.const(np.uint8(128), TensorProto.UINT8, hint="a_zero_point_128")],
               name=name)
    y = g.op("Cast", [acc], name=f"{name}_acc_float", to=t.dtype)
    y = g.op("Mul", [y, s], name=f"{name}_ascale_out")
    y = g.op("Mul", [y, g.weight(f"{name}.weight_scale", spec.scale_per_channel(), t.dtype)], name=f"{name}_wscale")
    if spec.bias is not None:
        y = g.op("Add", [y, g.weight(f"{name}.bias", spec.bias.astype(np.float32), t.dtype)], name=f"{name}_bias")
    return y


def _fp8_bits(values: np.ndarray) -> bytes:
    import ml_dtypes

    return np.ascontiguousarray(values.astype(np.float32).astype(ml_dtypes.float8_e4m3fn)).view(np.uint8).tobytes()


def emit_linear(g: GraphBuilder, t: Target, x: str, spec: LinearSpec, name: str) -> str:
    """x [..., in] -> [..., out] (+ bias). The MatMul node is named `{name}_node`."""
    if spec.pre_quant_scale is not None:
        pqs = g.weight(f"{name}.pre_quant_scale", spec.pre_quant_scale.astype(np.float32), t.dtype)
        x = g.op("Mul", [x, pqs], name=f"{name}_smooth")
    if spec.act == "int8_token" and spec.wfmt == "int8" and not t.is_trt:
        return _emit_matmul_integer(g, t, x, spec, name)
    if spec.act == "int8":
        s = g.const(np.float32(spec.input_scale), t.dtype)
        zp = g.const(np.int8(0), TensorProto.INT8)
        q = g.op("QuantizeLinear", [x, s, zp], name=f"{name}_aq")
        x = g.op("DequantizeLinear", [q, s, zp], name=f"{name}_adq")
    elif spec.act == "int8_token":
        x = _fake_quant_int8_token(g, t, x, name)
    elif spec.act == "fp8":
        x = _fake_quant_fp8(g, t, x, float(spec.input_scale), name)
    elif spec.act == "fp8_token":
        x = _fake_quant_fp8_token(g, t, x, name)
    elif spec.act is not None:
        raise ValueError(f"unknown activation treatment {spec.act!r}")

    w = spec.wfmt
    if (w == "int8" and spec.act is None and not t.is_trt and np.asarray(spec.weight_scale).ndim < 2
            and (blocked := blocked_int8(spec)) is not None):
        spec = blocked  # W8A16 on ONNX Runtime: 8-bit MatMulNBits
    if w == "float" or (w == "fp8" and t.fp8 == "emulate"):
        wd = g.weight(f"{name}.weight", spec.dequantized().T, t.dtype)
    elif w == "int8" and np.asarray(spec.weight_scale).ndim == 2:  # block scales [out, in/g]
        q = g.weight(f"{name}.weight", np.ascontiguousarray(spec.weight.T.astype(np.int8)))
        s_w = g.weight(f"{name}.weight_scale", np.ascontiguousarray(np.asarray(spec.weight_scale, np.float32).T),
                       t.dtype)
        wd = g.op("DequantizeLinear", [q, s_w], name=f"{name}_wdq", axis=0, block_size=int(spec.group_size))
    elif w == "int8":
        q = g.weight(f"{name}.weight", np.ascontiguousarray(spec.weight.T.astype(np.int8)))
        s_w = g.weight(f"{name}.weight_scale", spec.scale_per_channel(), t.dtype)
        zp_w = g.const(np.zeros(spec.out_features, np.int8), TensorProto.INT8, hint=f"{name}.weight_zero_point")
        wd = g.op("DequantizeLinear", [q, s_w, zp_w], name=f"{name}_wdq", axis=1)
    elif w == "int4":
        wt = np.ascontiguousarray(spec.weight.T)  # [in, out]
        q = g.raw_weight(f"{name}.weight", TensorProto.INT4, wt.shape, pack_int4(wt))
        s_w = g.weight(f"{name}.weight_scale", np.ascontiguousarray(np.asarray(spec.weight_scale, np.float32).T),
                       t.dtype)  # [in/g, out]
        wd = g.op("DequantizeLinear", [q, s_w], name=f"{name}_wdq", axis=0, block_size=int(spec.group_size))
    elif w == "fp8":  # TensorRT: FP8 DQ on the weight
        wt = np.ascontiguousarray(spec.weight.T)
        q = g.raw_weight(f"{name}.weight", TensorProto.FLOAT8E4M3FN, wt.shape, _fp8_bits(wt))
        ws = np.asarray(spec.weight_scale, np.float32)
        if ws.size == 1:
            wd = g.op("DequantizeLinear", [q, g.const(np.float32(ws.reshape(-1)[0]), t.dtype)], name=f"{name}_wdq")
        else:
            s_w = g.weight(f"{name}.weight_scale", spec.scale_per_channel(), t.dtype)
            wd = g.op("DequantizeLinear", [q, s_w], name=f"{name}_wdq", axis=1)
    else:
        raise ValueError(f"unknown weight format {w!r}")
    y = g.op("MatMul", [x, wd], name=name)
    if spec.zero is not None:
        y = g.op("Add", [y, _zero_term(g, t, x, spec, name)], name=f"{name}_zero_add")
    if spec.bias is not None:
        y = g.op("Add", [y, g.weight(f"{name}.bias", spec.bias.astype(np.float32), t.dtype)], name=f"{name}_bias")
    return y


def _zero_term(g: GraphBuilder, t: Target, x: str, spec: LinearSpec, name: str) -> str:
    """The zero points' share of a groupwise linear with real = q * s + z per (row, group):

        x @ (q * s + z)^T = x @ (q * s)^T  +  blocksum(x) @ z^T,   blocksum(x)[.., b] = sum of x over group b

    so the symmetric part keeps the DequantizeLinear -> MatMulNBits fusion (and TensorRT's INT4
    GEMM), and the zeros cost one small [in/g, out] float matmul on per-group activation sums.
    """
    gsize = int(spec.group_size)
    groups = spec.in_features // gsize
    lead = g.op("Shape", [x], name=f"{name}_zshape", end=-1)
    shape = g.op("Concat", [lead, g.const([groups, gsize])], name=f"{name}_zgshape", axis=0)
    xb = g.op("Reshape", [x, shape], name=f"{name}_zgroups")
    sums = g.op("ReduceSum", [xb, g.const([-1])], name=f"{name}_zsum", keepdims=0)
    z = g.weight(f"{name}.zero", np.ascontiguousarray(np.asarray(spec.zero, np.float32).T), t.dtype)  # [in/g, out]
    return g.op("MatMul", [sums, z], name=f"{name}_zmm")
