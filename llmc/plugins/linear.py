"""Linear layers, float and quantized, as MatMul patterns each backend accelerates.

`emit_linear` lowers the canonical quantized linear, `llmc.quantize.layout.QLinear` (the same
object the fake-quant simulation runs, read by `read_quantized_linear`), to ONNX. Its weight
format comes from the quant_algo table (`llmc.checkpoint.quant_algos.weight_format(kind)`: float /
int8 / int4 / fp8), its activation treatment from (act_dtype, act_granularity), plus an optional
pre-quant scale and bias. The emitted MatMul weight is [in, out] (transposed once at build time).
This module reads QLinear's tensors through numpy and never imports torch itself.

Weights
- float: MatMul(x, W).
- int8:  DequantizeLinear(W int8 [in, out], per-output-channel scale, axis 1, zero point 0);
         with block scales [in/g, out]: on ONNX Runtime an 8-bit com.microsoft MatMulNBits
         (`_nbits_operands`; see `exact_int8_blocks`), on TensorRT opset-21 blocked DQ, axis 0.
         Weight-only int8 (W8A16) on ONNX Runtime is always blocked (`blocked_int8_scale`: the
         per-channel scale repeated per block, the same numbers), since ORT would fold a
         per-channel DQ into an fp32 weight.
- int4:  ONNX Runtime: a 4-bit MatMulNBits node (`_nbits_operands`: what ORT's own fusion makes
         of the DQ below, emitted directly so it also works inside If bodies); TensorRT:
         DequantizeLinear(W int4 [in, out], block scales [in/g, out], axis 0, block_size g, no
         zero point), opset-21 blocked DQ, fused into its INT4 weight-only GEMM.
- int8 with --matmul-accuracy fp32 (ONNX Runtime): an explicit 8-bit MatMulNBits at accuracy
  level 4 on error-compensated activations (`_emit_nbits8_compensated`): ORT has no fast float
  kernel for 8-bit weights (its fallback is 30-50x slower), so the activation is split into its
  int8-grid part, the remainder's grid part and the rest, and the three rows go through the int8
  kernel in one call: float32-accurate (tests/test_matmul_accuracy.py, against numpy).
- zero points (groupwise int4/int8 with real = q * s + z, e.g. GGUF Q4_1): the symmetric part as
  above plus a small float Gemm of per-group activation sums with z (`_add_zero_term`); exact in
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
fp8(q * s_group / s2) (`QLinear.as_fp8`, exact), so the graph stores those FP8 values (one byte
per weight) with the per-tensor scale s2 and treats the layer as FP8 x FP8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import TensorProto

from llmc.checkpoint.quant_algos import QUANT_ALGOS, weight_format
from llmc.plugins.graph import CONTRIB_DOMAIN, GraphBuilder, pack_int4_onnx
from llmc.engine.onnx_graph import SESSION_LEVEL_DOC
from llmc.plugins.base import Target

if TYPE_CHECKING:  # pragma: no cover - torch-side type, only read here
    from llmc.quantize.layout import QLinear


def _np(t: Any) -> np.ndarray | None:
    """A (float) tensor of a QLinear as float32 numpy."""
    return None if t is None else t.detach().float().contiguous().numpy()


def _int8_t(t: Any) -> np.ndarray:
    """An integer weight [out, in] of a QLinear as int8 numpy [in, out]."""
    return np.ascontiguousarray(t.detach().contiguous().numpy().astype(np.int8, copy=False).T)


def _scale_per_row(q: QLinear) -> np.ndarray:
    """weight_scale as [out] float32 (per-tensor scales repeated)."""
    s = _np(q.weight_scale)
    return np.full(q.out_features, float(s.reshape(-1)[0]), np.float32) if s.size == 1 else s.reshape(-1)


INT8_BLOCK = 32  # GGUF Q8_0's block: the grid such float weights already lie on


@dataclass
class Int8Blocks:
    """A float weight found to be exactly int8 values x per-block scales (`exact_int8_blocks`)."""

    weight: np.ndarray         # int8 [out, in]
    weight_scale: np.ndarray   # float32 [out, in / block]
    block: int

    def dequantized(self) -> np.ndarray:
        out, k = self.weight.shape
        return (self.weight.astype(np.float32).reshape(out, -1, self.block)
                * self.weight_scale[:, :, None]).reshape(out, k)

    def to_qlinear(self, prefix: str, bias: Any = None) -> QLinear:
        """The canonical linear: groupwise weight-only INT8 (W8A16_GPTQ's kind, no zero points)."""
        import torch

        from llmc.quantize.layout import QLinear

        return QLinear(prefix, QUANT_ALGOS["W8A16_GPTQ"].kind, torch.from_numpy(self.weight),
                       torch.from_numpy(self.weight_scale), group_size=self.block, bias=bias)


def exact_int8_blocks(weight: np.ndarray, block: int = INT8_BLOCK) -> Int8Blocks | None:
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
    return Int8Blocks(q.astype(np.int8).reshape(out, k), scale.astype(np.float32), block)


def blocked_int8_scale(scale_per_row: np.ndarray, in_features: int) -> tuple[np.ndarray, int] | None:
    """A per-channel int8 weight-only linear's scale repeated over blocks along the input (128, 64
    or 32 wide; the first that divides it): an exact re-statement (the same int8 values) that ONNX
    Runtime runs as its 8-bit MatMulNBits instead of constant-folding the per-channel
    DequantizeLinear into a float32 weight (fp32 speed). None if no block fits."""
    block = next((b for b in (128, 64, INT8_BLOCK) if in_features % b == 0), None)
    if block is None:
        return None
    return np.repeat(scale_per_row[:, None], in_features // block, axis=1), block


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


def _emit_matmul_integer(g: GraphBuilder, t: Target, x: str, lin: QLinear, name: str) -> str:
    """SmoothQuant with per-token dynamic int8 activations on ONNX Runtime: integer GEMM.

    q = clamp(round(x / s_t), -128, 127) with s_t = max|x_row| / 127 (1 for an all-zero row);
    y = (q @ W_q) * s_t * s_w. The activation goes to uint8 with zero point 128 (ORT's u8s8 GEMM is
    25-40x faster than its s8s8 path, measured, M = 1..256) through ONE per-row QuantizeLinear,
    saturate(round(x / s_t) + 128): the same numbers as Div, Round, Clip, +128 and Cast, bit for bit
    (round half to even both; checked on 2,000 random batches with ties). MatMulInteger is exact.
    TensorRT has no MatMulInteger importer, so tensorrt targets use the fake-quant form instead.
    """
    amax = g.op("ReduceMax", [g.op("Abs", [x], name=f"{name}_aabs"), g.const([-1])], name=f"{name}_aamax",
                keepdims=0)                                                                       # [T]
    s = g.op("Div", [amax, g.const(np.float32(127.0), t.dtype)], name=f"{name}_ascale")
    zero = g.op("Equal", [amax, g.const(np.float32(0.0), t.dtype)], name=f"{name}_azero")
    s = g.op("Where", [zero, g.const(np.float32(1.0), t.dtype), s], name=f"{name}_ascale_nz")
    q8 = g.op("QuantizeLinear", [x, s, _zero_point_128_rows(g, x)], name=f"{name}_aq", axis=0)
    w = g.weight(f"{name}.weight", _int8_t(lin.weight))
    acc = g.op("MatMulInteger", [q8, w, _zero_point_128(g)], name=name)
    y = g.op("Cast", [acc], name=f"{name}_acc_float", to=t.dtype)
    s_col = g.op("Unsqueeze", [s, g.const([-1])], name=f"{name}_ascale_col")
    y = g.op("Mul", [y, s_col], name=f"{name}_ascale_out")
    y = g.op("Mul", [y, g.weight(f"{name}.weight_scale", _scale_per_row(lin), t.dtype)], name=f"{name}_wscale")
    return _add_bias(g, t, y, lin, name)


def _zero_point_128(g: GraphBuilder) -> str:
    """uint8 128: the activations' zero point (MatMulInteger's scalar, expanded per row for QuantizeLinear)."""
    return g.const(np.uint8(128), TensorProto.UINT8, hint="a_zero_point_128")


def _zero_point_128_rows(g: GraphBuilder, x: str) -> str:
    """uint8 128 per activation row ([T]: a per-axis QuantizeLinear wants one zero point per scale),
    once per step in a model graph (`g.rows_source`), else next to this linear."""
    def make(rows_of: str) -> str:
        shape = g.op("Slice", [g.op("Shape", [rows_of], name="rows_shape"), g.const([0]), g.const([1])],
                     name="rows_count")
        return g.op("Expand", [_zero_point_128(g), shape], name="zero_point_128_rows")
    if g.rows_source is None:
        return make(x)
    return g.shared("zero_point_128_rows", lambda: make(g.rows_source))


def _add_bias(g: GraphBuilder, t: Target, y: str, lin: QLinear, name: str) -> str:
    if lin.bias is None:
        return y
    return g.op("Add", [y, g.weight(f"{name}.bias", _np(lin.bias), t.dtype)], name=f"{name}_bias")


def _fp8_bits(values: np.ndarray) -> bytes:
    import ml_dtypes

    return np.ascontiguousarray(values.astype(np.float32).astype(ml_dtypes.float8_e4m3fn)).view(np.uint8).tobytes()


def _act_int8(g: GraphBuilder, t: Target, x: str, lin: QLinear, name: str) -> str:
    s = g.const(np.float32(float(lin.input_scale)), t.dtype)
    zp = g.const(np.int8(0), TensorProto.INT8)
    q = g.op("QuantizeLinear", [x, s, zp], name=f"{name}_aq")
    return g.op("DequantizeLinear", [q, s, zp], name=f"{name}_adq")


# (act_dtype, act_granularity) -> the activation's (fake) quantization in the graph.
_ACTIVATIONS = {
    ("int8", "tensor"): _act_int8,
    ("int8", "token"): lambda g, t, x, lin, name: _fake_quant_int8_token(g, t, x, name),
    ("fp8", "tensor"): lambda g, t, x, lin, name: _fake_quant_fp8(g, t, x, float(lin.input_scale), name),
    ("fp8", "token"): lambda g, t, x, lin, name: _fake_quant_fp8_token(g, t, x, name),
}


def _blocked_weight(g: GraphBuilder, t: Target, q8: np.ndarray, scale: np.ndarray, group: int, name: str) -> str:
    """int8 [in, out] x block scales [out, in/g] -> opset-21 blocked DequantizeLinear along the input."""
    qw = g.weight(f"{name}.weight", q8)
    s_w = g.weight(f"{name}.weight_scale", np.ascontiguousarray(scale.T), t.dtype)
    return g.op("DequantizeLinear", [qw, s_w], name=f"{name}_wdq", axis=0, block_size=int(group))


def _weight(g: GraphBuilder, t: Target, lin: QLinear, name: str) -> str:
    """The [in, out] weight operand of the MatMul (see the module doc, "Weights")."""
    w = weight_format(lin.kind)
    if w == "float" or (w == "fp8" and t.fp8 == "emulate"):
        return g.weight(f"{name}.weight", _np(lin.dequantize()).T, t.dtype)
    if w == "int8":
        if (blocked := _int8_block_scales(lin, t)) is not None:  # 8-bit MatMulNBits on ONNX Runtime
            return _blocked_weight(g, t, _int8_t(lin.weight), *blocked, name)
        qw = g.weight(f"{name}.weight", _int8_t(lin.weight))
        s_w = g.weight(f"{name}.weight_scale", _scale_per_row(lin), t.dtype)
        zp_w = g.const(np.zeros(lin.out_features, np.int8), TensorProto.INT8, hint=f"{name}.weight_zero_point")
        return g.op("DequantizeLinear", [qw, s_w, zp_w], name=f"{name}_wdq", axis=1)
    if w == "int4":
        wt = _int8_t(lin.weight)  # [in, out], values in [-8, 7]
        qw = g.raw_weight(f"{name}.weight", TensorProto.INT4, wt.shape, pack_int4_onnx(wt))
        s_w = g.weight(f"{name}.weight_scale", np.ascontiguousarray(_np(lin.weight_scale).T), t.dtype)  # [in/g, out]
        return g.op("DequantizeLinear", [qw, s_w], name=f"{name}_wdq", axis=0, block_size=int(lin.group_size))
    if w == "fp8":  # TensorRT: FP8 DQ on the weight
        wt = np.ascontiguousarray(_np(lin.weight).T)
        qw = g.raw_weight(f"{name}.weight", TensorProto.FLOAT8E4M3FN, wt.shape, _fp8_bits(wt))
        ws = _np(lin.weight_scale)
        if ws.size == 1:
            return g.op("DequantizeLinear", [qw, g.const(np.float32(ws.reshape(-1)[0]), t.dtype)], name=f"{name}_wdq")
        s_w = g.weight(f"{name}.weight_scale", _scale_per_row(lin), t.dtype)
        return g.op("DequantizeLinear", [qw, s_w], name=f"{name}_wdq", axis=1)
    raise ValueError(f"unknown weight format {w!r}")


def any_rank(t: Target, lin: QLinear) -> bool:
    """Whether `emit_linear`'s nodes for `lin` take activations of any rank, [..., in] (the
    contiguous decode body's [1, 1, hidden] stream): all but the per-token int8 integer GEMM (one
    per-row QuantizeLinear), the zero-point term (a 2-D Gemm) and the exact 8-bit compensation
    (rows stacked along axis 0)."""
    if lin.weight_scale_2 is not None:
        lin = lin.as_fp8()
    act = None if lin.act_dtype is None else (lin.act_dtype, lin.act_granularity)
    if act == ("int8", "token") and weight_format(lin.kind) == "int8" and not t.is_trt:
        return False
    if lin.zero is not None:
        return False
    return not (t.exact_nbits and act is None and _int8_block_scales(lin, t) is not None)


def emit_linear(g: GraphBuilder, t: Target, x: str, lin: QLinear, name: str) -> str:
    """x [tokens, in] -> [tokens, out] (+ bias); [..., in] -> [..., out] where `any_rank`. The
    MatMul node is named `{name}`."""
    if lin.weight_scale_2 is not None:  # W4A8: lowered to FP8 x FP8 (module doc)
        lin = lin.as_fp8()
    if lin.pre_quant_scale is not None:
        pqs = g.weight(f"{name}.pre_quant_scale", _np(lin.pre_quant_scale), t.dtype)
        x = g.op("Mul", [x, pqs], name=f"{name}_smooth")
    act = None if lin.act_dtype is None else (lin.act_dtype, lin.act_granularity)
    if act == ("int8", "token") and weight_format(lin.kind) == "int8" and not t.is_trt:
        return _emit_matmul_integer(g, t, x, lin, name)
    if act is not None:
        if act not in _ACTIVATIONS:
            raise ValueError(f"unknown activation treatment {act!r}")
        x = _ACTIVATIONS[act](g, t, x, lin, name)
    blocked = _int8_block_scales(lin, t) if t.exact_nbits and act is None else None
    if blocked is not None:
        y = _emit_nbits8_compensated(g, t, x, _int8_t(lin.weight), *blocked, name)
    elif (nbits := _nbits_operands(g, t, lin, name)) is not None:
        y = g.op("MatMulNBits", [x, *nbits[0]], name=name, domain=CONTRIB_DOMAIN, doc_string=SESSION_LEVEL_DOC,
                 **nbits[1], accuracy_level=t.nbits_level)
    else:
        y = g.op("MatMul", [x, _weight(g, t, lin, name)], name=name)
    if lin.zero is not None:
        y = _add_zero_term(g, t, x, y, lin, name)
    return _add_bias(g, t, y, lin, name)


def _int8_block_scales(lin: QLinear, t: Target) -> tuple[np.ndarray, int] | None:
    """(block scales [out, in/g], g) of an int8 weight that runs as 8-bit MatMulNBits: its own block
    scales, or on ONNX Runtime a weight-only per-channel scale restated per block
    (`blocked_int8_scale`); None for other weights (per-channel DequantizeLinear)."""
    if weight_format(lin.kind) != "int8":
        return None
    scale = _np(lin.weight_scale)
    if scale.ndim == 2:
        return scale, int(lin.group_size)
    if lin.act_dtype is None and not t.is_trt:
        return blocked_int8_scale(_scale_per_row(lin), lin.in_features)
    return None


def _nbits_operands(g: GraphBuilder, t: Target, lin: QLinear, name: str) -> tuple[list[str], dict] | None:
    """ONNX Runtime: (inputs, attributes) of the MatMulNBits node for a 4-bit or block-scaled 8-bit
    weight, or None (other weights and TensorRT: DequantizeLinear + MatMul).

    The node is what ORT's DequantizeLinear + MatMul fusion makes of the blocked DQ (same packed
    weights, same kernel): emitted directly because that fusion cannot read weights from the outer
    scope of a subgraph (ORT 1.32: "Missing required weight"), and the step variants
    (`llmc.plugins.attention.step_variants`) put every layer inside an If branch. Packing
    (com.microsoft MatMulNBits): B [N, K/g, g*bits/8] uint8 holding q + 2^(bits-1) (no zero-point
    input: that is the default zero point), scales [N * K/g], low nibble first.
    """
    if t.is_trt:
        return None
    w = weight_format(lin.kind)
    if w == "int4":
        q = _int8_t(lin.weight).T.astype(np.int16) + 8                       # [out, in] in [0, 15]
        scale, group, bits = _np(lin.weight_scale), int(lin.group_size), 4
    elif w == "int8" and (blocked := _int8_block_scales(lin, t)) is not None:
        q = _int8_t(lin.weight).T.astype(np.int16) + 128
        (scale, group), bits = blocked, 8
    else:
        return None
    n, k = q.shape
    if k % group:
        return None
    u = q.astype(np.uint8).reshape(n, k // group, group)
    if bits == 4:
        u = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    data = g.weight(f"{name}.weight_nbits", np.ascontiguousarray(u))
    scales = g.weight(f"{name}.weight_scale", np.ascontiguousarray(scale, np.float32).reshape(-1), t.dtype)
    return [data, scales], {"K": k, "N": n, "bits": bits, "block_size": group}


COMPENSATION_TERMS = 3  # rows through the int8 kernel: error ~ (1/254)^terms of max|x| per block


def _int8_grid(g: GraphBuilder, t: Target, x: str, blocks: int, block: int, k: int, name: str) -> str:
    """x [tokens, in] rounded onto the grid the int8 kernel uses: per block of `block` inputs,
    round(x / s) * s with s = max|x_block| / 127 (so the kernel re-quantizes it losslessly)."""
    xb = g.op("Reshape", [x, g.const([-1, blocks, block])], name=f"{name}_blocks")
    amax = g.op("ReduceMax", [g.op("Abs", [xb], name=f"{name}_abs"), g.const([-1])], name=f"{name}_amax",
                keepdims=1)
    s = g.op("Div", [amax, g.const(np.float32(127.0), t.dtype)], name=f"{name}_scale")
    s = g.op("Max", [s, g.const(np.float32(np.finfo(np.float32).tiny), t.dtype)], name=f"{name}_scale_nz")
    xq = g.op("Mul", [g.op("Round", [g.op("Div", [xb, s], name=f"{name}_div")], name=f"{name}_round"), s],
              name=f"{name}_grid")
    return g.op("Reshape", [xq, g.const([-1, k])], name=f"{name}_flat")


def _emit_nbits8_compensated(g: GraphBuilder, t: Target, x: str, q8: np.ndarray, scale: np.ndarray, block: int,
                             name: str) -> str:
    """x [tokens, in] @ (q8 [in, out] x block scales [out, in/g]) through ONE 8-bit MatMulNBits at
    accuracy level 4, accurate to float rounding instead of the ~1e-2 of rounding x to int8.

    The kernel rounds each block of `block` activations to int8 with scale max|x_block| / 127.
    Here x = xq_1 + xq_2 + r: xq_1 is x on exactly that grid (the kernel's rounding of it is
    lossless), xq_2 the remainder on its own 127x finer grid, r what is left (|r| <= 1/254^2 of the
    block's max, which the kernel rounds once more). The COMPENSATION_TERMS rows go through the
    kernel in one call (decode stays bound by the weight bytes, read once) and are summed.
    """
    k, n = q8.shape
    blocks = k // block
    rows, rest = [], x
    for i in range(COMPENSATION_TERMS - 1):
        rows.append(_int8_grid(g, t, rest, blocks, block, k, f"{name}_c{i}"))
        rest = g.op("Sub", [rest, rows[-1]], name=f"{name}_c{i}_rest")
    stacked = g.op("Concat", rows + [rest], name=f"{name}_crows", axis=0)
    data = g.weight(f"{name}.weight_u8", (q8.T.astype(np.int16) + 128).astype(np.uint8).reshape(n, blocks, block))
    scales = g.weight(f"{name}.weight_scale", np.ascontiguousarray(scale, np.float32).reshape(-1), t.dtype)
    y = g.op("MatMulNBits", [stacked, data, scales], name=name, domain=CONTRIB_DOMAIN, K=k, N=n, bits=8,
             block_size=block, accuracy_level=4)
    parts = g.op("Reshape", [y, g.const([COMPENSATION_TERMS, -1, n])], name=f"{name}_cparts")
    return g.op("ReduceSum", [parts, g.const([0])], name=f"{name}_csum", keepdims=0)


def _add_zero_term(g: GraphBuilder, t: Target, x: str, y: str, lin: QLinear, name: str) -> str:
    """y + the zero points' share of a groupwise linear with real = q * s + z per (row, group):

        x @ (q * s + z)^T = x @ (q * s)^T  +  blocksum(x) @ z^T,   blocksum(x)[.., b] = sum of x over group b

    so the symmetric part y stays one MatMulNBits (TensorRT: its INT4 GEMM), and the zeros cost
    one small [in/g, out] float GEMM on per-group activation sums that adds y as its C operand
    (Gemm: the MatMul and the Add in one node, the same sums: blocksum @ z^T in one K block, + y).
    """
    gsize = int(lin.group_size)
    groups = lin.in_features // gsize
    # x is [tokens, in] (llmc's activations are packed 2-D), so the group view has a constant shape
    xb = g.op("Reshape", [x, g.const([-1, groups, gsize])], name=f"{name}_zgroups")
    sums = g.op("ReduceSum", [xb, g.const([-1])], name=f"{name}_zsum", keepdims=0)
    z = g.weight(f"{name}.zero", np.ascontiguousarray(_np(lin.zero).T), t.dtype)  # [in/g, out]
    return g.op("Gemm", [sums, z, y], name=f"{name}_zero_gemm")
