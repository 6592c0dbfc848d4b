"""A small ONNX graph builder that streams weights straight into the external-data file.

`GraphBuilder.weight()` appends each initializer's bytes to `model.onnx.data` as soon as it is
created and keeps only an external-data reference in the ModelProto, so building an engine never
holds the checkpoint and a serialised copy of it in memory at the same time. Everything else is
thin sugar over `onnx.helper`: `g.op("MatMul", [a, b])` returns the output name(s).
"""

from __future__ import annotations

import hashlib
import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmc.engine.onnx_graph import walk_nodes

CONTRIB_DOMAIN = "com.microsoft"  # ONNX Runtime contrib ops (ORT targets only)
OPSET = 23          # Attention, RMSNormalization and blocked DequantizeLinear are all standard here
IR_VERSION = 10     # the lowest IR that carries opset 23 models ONNX Runtime >= 1.22 and TensorRT 10.x read
DATA_FILE = "model.onnx.data"
_ALIGN_SMALL, _ALIGN_LARGE, _LARGE = 64, 4096, 1 << 20

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}
ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
               "bfloat16": TensorProto.BFLOAT16}  # compute dtype name -> ONNX element type


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, as torch does."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = u + (0x7FFF + ((u >> 16) & 1))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def pack_int4_onnx(values: np.ndarray) -> bytes:
    """Signed int4 values (int8 array in [-8, 7]) -> ONNX INT4 raw bytes: consecutive elements of
    the flattened tensor pair up, low nibble first (not TensorRT-LLM's checkpoint layout, see
    `llmc.quantize.layout.pack_int4_row_pairs`)."""
    flat = (np.ascontiguousarray(values).reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


@dataclass
class GraphBuilder:
    """Accumulates nodes; writes initializers > `inline_limit` bytes to the data file at once."""

    data_path: Path | None = None
    inline_limit: int = 256
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[TensorProto] = field(default_factory=list)
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    weight_bytes: int = 0
    rows_source: str | None = None  # a graph input whose first dim is the token count (model graphs: input_ids)
    _names: set[str] = field(default_factory=set)
    _counter: Any = field(default_factory=itertools.count)
    _consts: dict[tuple, str] = field(default_factory=dict)
    _weights: dict[tuple, str] = field(default_factory=dict)
    _shared: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._data = open(self.data_path, "wb") if self.data_path is not None else None
        self._offset = 0
        self._root = self.nodes  # the top-level node list (`branch()` swaps `nodes`)

    # --- names ------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        name = hint
        while name in self._names:
            name = f"{hint}_{next(self._counter)}"
        self._names.add(name)
        return name

    # --- graph I/O --------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[int | str | None]) -> str:
        self._names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence[int | str | None]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    # --- initializers -----------------------------------------------------------------------
    def _external(self, name: str, data_type: int, dims: Sequence[int], raw: bytes) -> str:
        # Byte-identical weights share one initializer: a graph that emits the model body more
        # than once (ONNX Runtime's step variants, `llmc.build.model_graph`) stores its weights once.
        key = (data_type, tuple(int(d) for d in dims), hashlib.blake2b(raw, digest_size=16).digest())
        if key in self._weights:
            return self._weights[key]
        self._weights[key] = name
        t = TensorProto()
        t.name, t.data_type = name, data_type
        t.dims.extend(int(d) for d in dims)
        if self._data is None or len(raw) <= self.inline_limit:
            t.raw_data = raw
        else:
            align = _ALIGN_LARGE if len(raw) >= _LARGE else _ALIGN_SMALL
            pad = (-self._offset) % align
            if pad:
                self._data.write(b"\0" * pad)
                self._offset += pad
            self._data.write(raw)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", DATA_FILE), ("offset", str(self._offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            self._offset += len(raw)
        self.weight_bytes += len(raw)
        self.initializers.append(t)
        return name

    def weight(self, hint: str, array: np.ndarray, dtype: int | None = None) -> str:
        """A named initializer; `dtype` converts float arrays (FLOAT16/BFLOAT16)."""
        name = self.fresh(hint)
        a = np.asarray(array)
        if dtype is None:
            dtype = NP_TO_ONNX[a.dtype]
        if dtype == TensorProto.BFLOAT16:
            raw = to_bf16_bits(a.astype(np.float32)).tobytes()
        elif dtype == TensorProto.FLOAT16:
            raw = np.ascontiguousarray(a, dtype=np.float16).tobytes()
        elif dtype == TensorProto.FLOAT:
            raw = np.ascontiguousarray(a, dtype=np.float32).tobytes()
        else:
            raw = np.ascontiguousarray(a).tobytes()
        return self._external(name, dtype, a.shape, raw)

    def raw_weight(self, hint: str, data_type: int, dims: Sequence[int], raw: bytes) -> str:
        """An initializer from already-encoded bytes (INT4 packed, FLOAT8E4M3FN bit patterns)."""
        return self._external(self.fresh(hint), data_type, dims, raw)

    def const(self, value: Any, dtype: int = TensorProto.INT64, hint: str = "c") -> str:
        """A small constant, deduplicated by value."""
        a = np.asarray(value)
        key = (dtype, a.shape, a.tobytes())
        if key in self._consts:
            return self._consts[key]
        name = self.fresh(hint)
        if dtype == TensorProto.BFLOAT16:
            t = TensorProto(name=name, data_type=dtype, dims=list(a.shape),
                            raw_data=to_bf16_bits(a.astype(np.float32)).tobytes())
        elif dtype in (TensorProto.FLOAT8E4M3FN, TensorProto.INT4):
            t = helper.make_tensor(name, dtype, list(a.shape), a.reshape(-1).tolist())
        else:
            np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
            t = numpy_helper.from_array(a.astype(np_dtype), name)
        self.initializers.append(t)
        self._consts[key] = name
        return name

    def shared(self, key: str, make: Callable[[], str]) -> str:
        """A value emitted once, in the top-level graph, by `make()` (memoized by `key`): visible
        in every If body, so per-step values need not be recomputed per body or per layer. `make`
        may only read graph inputs and constants."""
        if key not in self._shared:
            saved, self.nodes = self.nodes, self._root
            try:
                self._shared[key] = make()
            finally:
                self.nodes = saved
        return self._shared[key]

    # --- nodes ------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Iterable[str], n_out: int = 1, name: str | None = None,
           outputs: Sequence[str] | None = None, domain: str = "", **attrs: Any):
        base = name or op_type.lower()
        outs = list(outputs) if outputs is not None else [self.fresh(base) for _ in range(n_out)]
        for o in outs:
            self._names.add(o)
        node = helper.make_node(op_type, list(inputs), outs, name=self.fresh(f"{base}_node"),
                                domain=domain or None, **attrs)
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    @contextmanager
    def branch(self):
        """Collect the nodes emitted inside the `with` block into a separate list (an If branch's
        body): `with g.branch() as nodes: y = g.op(...)`. Initializers and constants stay in the
        main graph, which a subgraph reads as outer-scope values."""
        saved, self.nodes = self.nodes, []
        try:
            yield self.nodes
        finally:
            self.nodes = saved

    def if_op(self, cond: str, then_nodes: list, then_out: str, else_nodes: list, else_out: str,
              elem_type: int, name: str) -> str:
        """An If node over two branches built with `branch()`; each yields one tensor."""
        return self.if_multi(cond, then_nodes, [then_out], else_nodes, [else_out], [elem_type], name)

    def if_multi(self, cond: str, then_nodes: list, then_outs: Sequence[str], else_nodes: list,
                 else_outs: Sequence[str], elem_types: Sequence[int], name: str,
                 outputs: Sequence[str] | None = None) -> str | list[str]:
        """An If node whose branches (built with `branch()`) yield len(elem_types) tensors each;
        `outputs` names the If's outputs (e.g. graph outputs), else they are fresh."""
        def body(nodes, outs, tag):
            return helper.make_graph(nodes, f"{name}_{tag}", [], [helper.make_tensor_value_info(o, et, None)
                                                                   for o, et in zip(outs, elem_types)])
        return self.op("If", [cond], n_out=len(elem_types), name=name, outputs=outputs,
                       then_branch=body(then_nodes, then_outs, "then"), else_branch=body(else_nodes, else_outs, "else"))

    # --- result -----------------------------------------------------------------------------
    def close(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None

    def model(self, graph_name: str = "llmc", doc: str = "") -> onnx.ModelProto:
        self.close()
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers,
                                  doc_string=doc)
        domains = sorted({n.domain for n in walk_nodes(graph) if n.domain})  # contrib ops (com.microsoft), version 1
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]
                                  + [helper.make_opsetid(d, 1) for d in domains],
                                  producer_name="llmc", ir_version=IR_VERSION)
        return model
