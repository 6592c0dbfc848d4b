"""CPU-side check that a graph only uses what TensorRT's ONNX parser accepts.

Runs on every tensorrt-target build (before any TensorRT import, so it also runs on machines
without TensorRT) and in the tests for every quantization format. The table below is TensorRT
10.x's ONNX operator support matrix (onnx-tensorrt docs/operators.md) restricted to the ops an
llmc graph can contain, plus the parser's documented restrictions:

- only the default ONNX domain (no com.microsoft contrib ops, no custom plugins);
- QuantizeLinear/DequantizeLinear: zero points absent or constant all-zero (symmetric only),
  quantized types INT8/FP8/INT4 only, INT4 tensors with an even last dimension, block scales of
  the input's rank with a single blocked axis;
- Attention (opset 23) only from TensorRT 10.14, with a single output and no past_key/past_value;
- no RMSNormalization or RotaryEmbedding importers (llmc lowers those to elementwise ops);
- Cast to FP8 is rejected (FP8 only through Q/DQ); Gather/ScatterND take no INT8/FP8 data
  (so a quantized KV cache is stored dequantized for TensorRT);
- ScatterND without `reduction`; Slice/Squeeze/Unsqueeze/ReduceMean axes must be constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from llmc.versions import version_tuple

MAX_OPSET = 23
ATTENTION_MIN_TRT = "10.14"

F = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
I = {TensorProto.INT32, TensorProto.INT64}
B = {TensorProto.BOOL}
Q = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4}

# op -> allowed element types of the first input (None: not checked)
SUPPORTED: dict[str, set[int] | None] = {
    "Add": F | I, "Sub": F | I, "Mul": F | I, "Div": F | I, "Pow": F, "Sqrt": F, "Reciprocal": F,
    "Neg": F | I, "Abs": F | I, "Exp": F, "Log": F, "Tanh": F, "Sigmoid": F, "Erf": F, "Relu": F,
    "Softmax": F, "MatMul": F, "Gemm": F, "ReduceMean": F | I, "ReduceSum": F | I, "ReduceMax": F | I,
    "Max": F | I, "Min": F | I, "Clip": F, "Round": F, "Floor": F, "Ceil": F, "Mod": F | I,
    "Equal": F | I, "Less": F | I, "LessOrEqual": F | I, "Greater": F | I, "GreaterOrEqual": F | I,
    "And": B, "Or": B, "Not": B, "Xor": B, "Where": B,
    "Gather": F | I | B, "GatherElements": F | I | B, "GatherND": F | I | B,
    "ScatterND": F | I, "ScatterElements": F | I,
    "Reshape": F | I | B, "Transpose": F | I | B, "Concat": F | I | B, "Split": F | I | B,
    "Slice": F | I | B, "Squeeze": F | I | B, "Unsqueeze": F | I | B, "Expand": F | I | B,
    "Tile": F | I | B, "Identity": F | I | B, "Shape": None, "Size": None, "Range": F | I,
    "Constant": None, "ConstantOfShape": None, "Cast": None, "CastLike": None, "Trilu": F | I | B,
    "CumSum": F | I, "ArgMax": F | I, "TopK": F,
    "QuantizeLinear": F, "DequantizeLinear": Q, "LayerNormalization": F,
    "Attention": F,
}
CONST_AXES_INPUT = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "ReduceMean": 1, "ReduceSum": 1, "ReduceMax": 1}
TYPE_NAMES = {v: k for k, v in TensorProto.DataType.items()}


@dataclass
class Problem:
    node: str
    op: str
    message: str

    def __str__(self) -> str:
        return f"{self.op} node {self.node!r}: {self.message}"


def _types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value (inputs, initializers, inferred intermediates)."""
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        graph = inferred.graph
    except Exception:
        graph = model.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


def _const_values(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    consts = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    return consts


def _all_zero(t: onnx.TensorProto) -> bool:
    if t.data_location == TensorProto.EXTERNAL:
        return False  # cannot prove without the data; llmc never stores zero points externally
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return all(b == 0 for b in t.raw_data) if t.raw_data else all(v == 0 for v in t.int32_data)
    if t.data_type == TensorProto.FLOAT8E4M3FN:
        raw = t.raw_data if t.raw_data else bytes(t.int32_data)
        return all(b in (0x00, 0x80) for b in raw)
    return bool(np.all(numpy_helper.to_array(t) == 0))


def check_graph(model: onnx.ModelProto, trt_version: str | None = None) -> list[Problem]:
    """Every reason TensorRT's ONNX parser would reject `model` (empty list = accepted)."""
    problems = _model_problems(model)
    types = _types(model)
    consts = _const_values(model)
    dims = {init.name: list(init.dims) for init in model.graph.initializer}
    for n in model.graph.node:
        problems += _node_problems(n, types, consts, dims, trt_version)
    return problems


def _model_problems(model: onnx.ModelProto) -> list[Problem]:
    """Opset domains/versions and graph input types: TensorRT takes quantized types only via Q/DQ."""
    problems: list[Problem] = []
    for imp in model.opset_import:
        if imp.domain not in ("", "ai.onnx"):
            problems.append(Problem("<model>", "opset_import", f"non-standard domain {imp.domain!r}"))
        elif imp.version > MAX_OPSET:
            problems.append(Problem("<model>", "opset_import", f"opset {imp.version} > {MAX_OPSET}"))
    for vi in model.graph.input:
        t = vi.type.tensor_type.elem_type
        if t in (TensorProto.DOUBLE, TensorProto.STRING, TensorProto.FLOAT8E4M3FN, TensorProto.INT8):
            problems.append(Problem(vi.name, "input", f"graph input of type {TYPE_NAMES.get(t)} "
                                    "(TensorRT takes quantized types only through Q/DQ)"))
    return problems


def _node_problems(n, types, consts, dims, trt_version: str | None) -> list[Problem]:
    """One node against the SUPPORTED table and the per-op rules of TensorRT's parser."""
    name, op = n.name or n.output[0], n.op_type
    if n.domain not in ("", "ai.onnx"):
        return [Problem(name, op, f"non-standard domain {n.domain!r}")]
    if op not in SUPPORTED:
        return [Problem(name, op, "operator not supported by TensorRT's ONNX parser")]
    problems: list[Problem] = []
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    allowed = SUPPORTED[op]
    if allowed is not None and n.input and n.input[0] in types and types[n.input[0]] not in allowed:
        problems.append(Problem(name, op, f"input type {TYPE_NAMES.get(types[n.input[0]])} not supported"))
    if op in CONST_AXES_INPUT:
        idx = CONST_AXES_INPUT[op]
        if len(n.input) > idx and n.input[idx] and n.input[idx] not in consts:
            problems.append(Problem(name, op, "axes must be an initializer"))
    if op in ("QuantizeLinear", "DequantizeLinear"):
        problems += _qdq_problems(n, name, op, attrs, types, consts, dims)
    elif op == "Cast" and attrs.get("to") in (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2,
                                              TensorProto.INT4, TensorProto.INT8):
        problems.append(Problem(name, op, f"Cast to {TYPE_NAMES.get(attrs['to'])} (TensorRT needs Q/DQ)"))
    elif op == "ScatterND" and attrs.get("reduction", b"none") not in (b"none", "none"):
        problems.append(Problem(name, op, "reduction is not supported"))
    elif op == "Attention":
        if trt_version is not None and version_tuple(trt_version, 2) < version_tuple(ATTENTION_MIN_TRT, 2):
            problems.append(Problem(name, op, f"needs TensorRT >= {ATTENTION_MIN_TRT} (have {trt_version}); "
                                              "build with --attention decomposed"))
        if len(n.output) != 1:
            problems.append(Problem(name, op, "TensorRT supports only the first output"))
        if len(n.input) > 4 and any(n.input[4:]):
            problems.append(Problem(name, op, "past_key/past_value/nonpad_kv_seqlen are not supported"))
    return problems


def _qdq_problems(n, name: str, op: str, attrs, types, consts, dims) -> list[Problem]:
    """Q/DQ rules: symmetric (constant zero point), INT8/FP8/INT4 targets, signed even-width INT4,
    and block scales with exactly one blocked axis."""
    problems: list[Problem] = []
    if len(n.input) > 2 and n.input[2]:
        zp = consts.get(n.input[2])
        if zp is None or not _all_zero(zp):
            problems.append(Problem(name, op, "zero point must be a constant 0 (symmetric only)"))
    qtype = types.get(n.input[0]) if op == "DequantizeLinear" else None
    if op == "QuantizeLinear":
        out_t = attrs.get("output_dtype") or (consts[n.input[2]].data_type if len(n.input) > 2 and
                                              n.input[2] in consts else TensorProto.UINT8)
        qtype = out_t
        if out_t not in Q:
            problems.append(Problem(name, op, f"quantizes to {TYPE_NAMES.get(out_t)} (INT8/FP8/INT4 only)"))
    if qtype in (TensorProto.UINT4,):
        problems.append(Problem(name, op, "unsigned INT4 (asymmetric) is not supported"))
    if qtype == TensorProto.INT4 and n.input[0] in dims and dims[n.input[0]] and dims[n.input[0]][-1] % 2:
        problems.append(Problem(name, op, "INT4 tensors need an even last dimension"))
    if "block_size" in attrs and attrs["block_size"]:
        x, s = dims.get(n.input[0]), dims.get(n.input[1])
        if x is None or s is None or len(x) != len(s):
            problems.append(Problem(name, op, "block scales must be an initializer of the input's rank"))
        elif sum(1 for a, b in zip(x, s) if a != b) != 1:
            problems.append(Problem(name, op, "exactly one blocked axis is allowed"))
    return problems


def assert_trt_compatible(model: onnx.ModelProto, trt_version: str | None = None) -> None:
    from llmc.errors import LlmcError

    problems = check_graph(model, trt_version)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LlmcError(f"graph is not TensorRT-compatible: {problems[0]}{more}")
