"""Paged attention over packed tokens of many sequences, from standard ONNX ops.

KV pool (owned by the runtime, bound once): per layer two tensors, key and value, each
[num_blocks, block_size, kv_heads * head_dim] in the KV dtype. Position p of a sequence lives
at block_table[p // block_size], offset p % block_size.

Per step and per layer:
1. Write: the new K/V rows of every packed token go to their slots with one ScatterND per pool
   tensor (indices [T, 2] = (block, offset)). The ScatterND output is a graph output that the
   runtime binds to the same buffer as the input pool, so ONNX Runtime updates it in place (its
   ScatterND skips the copy when input and output alias): ~10 us, no pool copy.
2. Read: query tokens are grouped into "rows" of Qt tokens of one sequence. Rows go into a fixed
   number of buckets (2 by default: decode rows with Qt=1 and prefill rows; or, when a step has
   only one kind, rows split by context length); each bucket has its own row count R, Qt and
   block count MB, chosen by the runtime per step. A bucket gathers its rows' blocks
   ([R, MB] block ids -> K [R, MB*bs, kvD]) and runs one attention over Q [R, Qt, H*hd] with a
   boolean mask key_pos <= query_pos (and > query_pos - window for sliding-window models). The
   work of a row is Qt x its bucket's context, so a step costs about sum(own context), not
   batch x longest context.
3. The buckets' outputs are concatenated and gathered back to packed token order.

Attention itself is one standard `Attention` node (opset 23, GQA via q_num_heads/kv_num_heads,
3-D inputs) where the backend has it (ONNX Runtime CPU; TensorRT >= 10.14), or an exact
MatMul/Softmax decomposition (grouped heads share K/V without copying them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from llmc.engine.graph import GraphBuilder
from llmc.plugins.base import Target

KV_ONNX_TYPES = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}


@dataclass
class AttentionDims:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    sliding_window: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class BucketInputs:
    q_index: str     # int64 [R*Qt]: packed token of each row slot (padding slots point at token 0)
    kv_blocks: str   # int64 [R, MB]: each row's block table (padded)
    q_pos: str       # int64 [R, Qt]: position of each row slot (padding: 0)
    q_shape: str = ""    # int64 [3] = (R, Qt, H*hd), computed once per step
    mask: str = ""       # bool mask for this bucket, computed once per step


def step_inputs(g: GraphBuilder, num_buckets: int) -> tuple[str, list[BucketInputs], str]:
    """Declare the per-step attention inputs; returns (kv_write_index, buckets, attn_out_index)."""
    i64 = TensorProto.INT64
    write = g.input("kv_write_index", i64, ["num_tokens", 2])
    buckets = []
    for b in range(num_buckets):
        buckets.append(BucketInputs(
            g.input(f"attn_q_index_{b}", i64, [f"rows_{b}_x_qt"]),
            g.input(f"attn_kv_blocks_{b}", i64, [f"rows_{b}", f"blocks_{b}"]),
            g.input(f"attn_q_pos_{b}", i64, [f"rows_{b}", f"qt_{b}"]),
        ))
    out_index = g.input("attn_out_index", i64, ["num_tokens"])
    return write, buckets, out_index


def emit_step_masks(g: GraphBuilder, t: Target, d: AttentionDims, buckets: list[BucketInputs]) -> None:
    """Per bucket, once per step: the query reshape target and the boolean attention mask."""
    for b, bk in enumerate(buckets):
        qshape = g.op("Shape", [bk.q_pos], name=f"bucket{b}_rows_qt")
        bk.q_shape = g.op("Concat", [qshape, g.const([d.q_size])], name=f"bucket{b}_q_shape", axis=0)
        mb = g.op("Gather", [g.op("Shape", [bk.kv_blocks], name=f"bucket{b}_kv_shape"), g.const(1)],
                  name=f"bucket{b}_mb", axis=0)
        keys = g.op("Mul", [mb, g.const(d.block_size)], name=f"bucket{b}_num_keys")
        kpos = g.op("Range", [g.const(0), keys, g.const(1)], name=f"bucket{b}_key_pos")
        qpos = bk.q_pos
        if t.attention == "decomposed":  # rows of the score matrix are (group, query) pairs
            qpos = g.op("Tile", [qpos, g.const([1, d.groups])], name=f"bucket{b}_q_pos_groups")
        q3 = g.op("Unsqueeze", [qpos, g.const([-1])], name=f"bucket{b}_q_pos3")
        mask = g.op("LessOrEqual", [kpos, q3], name=f"bucket{b}_causal")
        if d.sliding_window:
            lo = g.op("Sub", [q3, g.const(int(d.sliding_window))], name=f"bucket{b}_window_lo")
            mask = g.op("And", [mask, g.op("Greater", [kpos, lo], name=f"bucket{b}_in_window")],
                        name=f"bucket{b}_window")
        bk.mask = g.op("Unsqueeze", [mask, g.const([1])], name=f"bucket{b}_mask")


class KVPool:
    """Declares one layer's pool tensors and emits the quantize-on-write / dequantize-on-read."""

    def __init__(self, g: GraphBuilder, t: Target, d: AttentionDims, layer: int, kv_dtype: str,
                 kv_scale: float | None):
        self.g, self.t, self.d, self.layer = g, t, d, layer
        self.quant = kv_dtype if kv_dtype in KV_ONNX_TYPES else None
        if self.quant and kv_scale is None:
            raise ValueError(f"layer {layer}: quantized KV cache without kv_cache_scaling_factor")
        native = self.quant is not None and t.kv_storage == "native"
        self.pool_type = KV_ONNX_TYPES[self.quant] if native else t.dtype
        self.native = native
        if self.quant:
            self.scale = g.const(np.float32(kv_scale), t.dtype, hint=f"kv_scale_{layer}")
            self.zp = g.const(np.zeros((), np.float32) if self.quant == "fp8" else np.int8(0),
                              KV_ONNX_TYPES[self.quant], hint=f"kv_zp_{self.quant}")
        shape = ["num_blocks", d.block_size, d.kv_size]
        self.names = {}
        for kind in ("key", "value"):
            src = g.input(f"kv_pool.{layer}.{kind}", self.pool_type, shape)
            dst = f"kv_pool.{layer}.{kind}.out"
            g.output(dst, self.pool_type, shape)
            self.names[kind] = (src, dst)

    def write(self, kind: str, new: str, write_index: str) -> str:
        """ScatterND the new rows [T, kvD]; returns the updated pool (bound to the input buffer)."""
        g = self.g
        if self.quant:
            q = g.op("QuantizeLinear", [new, self.scale, self.zp], name=f"l{self.layer}_{kind}_kvq")
            new = q if self.native else g.op("DequantizeLinear", [q, self.scale, self.zp],
                                              name=f"l{self.layer}_{kind}_kvfq")
        src, dst = self.names[kind]
        return g.op("ScatterND", [src, write_index, new], name=f"l{self.layer}_{kind}_write", outputs=[dst])

    def read(self, pool: str, kind: str, bk: BucketInputs, b: int) -> str:
        """Gather a bucket's blocks: [R, MB*bs, kvD] in the compute dtype."""
        g = self.g
        blocks = g.op("Gather", [pool, bk.kv_blocks], name=f"l{self.layer}_b{b}_{kind}_gather", axis=0)
        flat = g.op("Reshape", [blocks, g.const([0, -1, self.d.kv_size])], name=f"l{self.layer}_b{b}_{kind}")
        if self.native:
            flat = g.op("DequantizeLinear", [flat, self.scale, self.zp], name=f"l{self.layer}_b{b}_{kind}_dq")
        return flat


def _attend_fused(g: GraphBuilder, d: AttentionDims, q3: str, k: str, v: str, mask: str, name: str) -> str:
    return g.op("Attention", [q3, k, v, mask], name=name, q_num_heads=d.num_heads,
                kv_num_heads=d.num_kv_heads, scale=float(1.0 / np.sqrt(d.head_dim)))


def _attend_decomposed(g: GraphBuilder, t: Target, d: AttentionDims, q3: str, k: str, v: str, mask: str,
                       name: str) -> str:
    kvh, grp, hd = d.num_kv_heads, d.groups, d.head_dim
    # Q [R, Qt, H*hd] -> [R, kvH, G*Qt, hd]: heads of one group share a K/V head, no K/V copies.
    q5 = g.op("Reshape", [q3, g.const([0, 0, kvh, grp, hd])], name=f"{name}_q5")
    qt = g.op("Transpose", [q5], name=f"{name}_qt", perm=[0, 2, 3, 1, 4])
    q4 = g.op("Reshape", [qt, g.const([0, kvh, -1, hd])], name=f"{name}_q4")
    k4 = g.op("Reshape", [k, g.const([0, 0, kvh, hd])], name=f"{name}_k4")
    kt = g.op("Transpose", [k4], name=f"{name}_kt", perm=[0, 2, 3, 1])          # [R, kvH, hd, S]
    v4 = g.op("Reshape", [v, g.const([0, 0, kvh, hd])], name=f"{name}_v4")
    vt = g.op("Transpose", [v4], name=f"{name}_vt", perm=[0, 2, 1, 3])          # [R, kvH, S, hd]
    scores = g.op("MatMul", [q4, kt], name=f"{name}_qk")
    scores = g.op("Mul", [scores, g.const(np.float32(1.0 / np.sqrt(hd)), t.dtype)], name=f"{name}_scale")
    neg = g.const(np.float32(-np.inf), t.dtype)
    scores = g.op("Where", [mask, scores, neg], name=f"{name}_mask")
    probs = g.op("Softmax", [scores], name=f"{name}_softmax", axis=-1)
    out = g.op("MatMul", [probs, vt], name=f"{name}_pv")                        # [R, kvH, G*Qt, hd]
    o5 = g.op("Reshape", [out, g.const([0, kvh, grp, -1, hd])], name=f"{name}_o5")
    ot = g.op("Transpose", [o5], name=f"{name}_ot", perm=[0, 3, 1, 2, 4])        # [R, Qt, kvH, G, hd]
    return g.op("Reshape", [ot, g.const([0, 0, d.q_size])], name=name)


def emit_paged_attention(g: GraphBuilder, t: Target, d: AttentionDims, pool: KVPool, q: str, k_new: str,
                         v_new: str, write_index: str, buckets: list[BucketInputs], out_index: str) -> str:
    """q [T, H*hd], k_new/v_new [T, kvD] -> attention output [T, H*hd] (packed order)."""
    layer = pool.layer
    k_pool = pool.write("key", k_new, write_index)
    v_pool = pool.write("value", v_new, write_index)
    outs = []
    for b, bk in enumerate(buckets):
        qb = g.op("Gather", [q, bk.q_index], name=f"l{layer}_b{b}_q_rows", axis=0)
        q3 = g.op("Reshape", [qb, bk.q_shape], name=f"l{layer}_b{b}_q")
        kb = pool.read(k_pool, "key", bk, b)
        vb = pool.read(v_pool, "value", bk, b)
        name = f"l{layer}_b{b}_attention"
        if t.attention == "fused":
            y = _attend_fused(g, d, q3, kb, vb, bk.mask, name)
        else:
            y = _attend_decomposed(g, t, d, q3, kb, vb, bk.mask, name)
        outs.append(g.op("Reshape", [y, g.const([-1, d.q_size])], name=f"l{layer}_b{b}_rows_out"))
    cat = outs[0] if len(outs) == 1 else g.op("Concat", outs, name=f"l{layer}_attn_rows", axis=0)
    return g.op("Gather", [cat, out_index], name=f"l{layer}_attn_out", axis=0)
