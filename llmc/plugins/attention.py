"""Paged attention over packed tokens of many sequences, from standard ONNX ops.

KV pool (owned by the runtime, bound once), head-major (see KVPool), two tensors per layer, key
and value: on ONNX Runtime each [1, kv_heads, num_blocks * block_size, head_dim] ("slots" layout:
token slot s = block * block_size + offset, the BNSH cache layout of its GroupQueryAttention
kernel); on TensorRT each [kv_heads, num_blocks, block_size, head_dim] ("split"), the same bytes.
Position p of a sequence lives at block block_table[p // block_size], offset p % block_size.

Per step and per layer:
1. Write: the new K (after RoPE) and V of every packed token go to their slots with one ScatterND
   per pool tensor (indices [T, kvH, 3], built once per step). The ScatterND output is a graph
   output that the runtime binds to the same buffer as the input pool, so ONNX Runtime updates
   it in place (its ScatterND skips the copy when input and output alias): ~10-30 us,
   independent of the pool size (measured up to 100 MB per tensor).
2. Read: query tokens are grouped into "rows" of Qt tokens of one sequence, and rows into a fixed
   number of buckets, each with its own row count R, Qt and block count MB chosen per step by
   the runtime (llmc.engine.step): decode buckets take 1-token rows, split by context length so
   short sequences do not pay for the longest one; the last bucket takes prefill chunks. A
   bucket gathers its rows' blocks -> K/V [kvH, R, MB*bs, hd], one copy, and runs
   attention with a boolean mask key_pos <= query_pos (and > query_pos - window for
   sliding-window models). A row costs Qt x its bucket's context, not batch x total context.
3. The buckets' outputs are concatenated and gathered back to packed token order.

Attention itself: the standard `Attention` node (opset 23) for prefill rows (and everywhere on
TensorRT >= 10.14); for decode rows on ONNX Runtime CPU an exact MatMul/Softmax form in which the
G query heads of a group share their K/V head, so K/V are read once (ORT's Attention kernel runs
one GEMV per query head: 1.8x slower at 16 rows x 576 keys, measured).

Single-sequence decode over a contiguous table (`emit_contiguous_attention`, ONNX Runtime, float
or int8 KV): when the step is one token of one sequence whose block table is 0, 1, ..., its cache is
slots [0, position] of the pool, which is exactly the shared past/present buffer that ORT's
GroupQueryAttention reads and appends to in place, so RoPE, the KV write and grouped attention
are one kernel per layer instead of ~18 (`llmc.runtime.kv_blocks` hands a lone sequence such a
table).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from llmc.plugins.graph import GraphBuilder
from llmc.plugins.base import Target

KV_ONNX_TYPES = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}


def fp8_e4m3fn_table() -> np.ndarray:
    """float32 value of every e4m3fn bit pattern (the two NaN patterns map to 0: never stored)."""
    import ml_dtypes

    vals = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    vals[np.isnan(vals)] = 0.0
    return vals


def emit_fp8_bits(g: GraphBuilder, t: Target, x: str, scale: str, name: str) -> str:
    """x -> the uint8 bit pattern of fp8_e4m3fn(x / scale) (saturating, round to nearest even).

    ONNX Runtime has no float8 ScatterND/Gather kernels, so an FP8 KV pool is stored as its bit
    patterns in uint8. The rounding is one saturating Cast to float8e4m3fn (exactly
    QuantizeLinear's); the bits are then assembled from the exact value v = +-2^e (1 + m/8)
    (normal) or +-m 2^-9 (subnormal) with elementwise ops on the few new rows of the step.
    """
    f32 = t.dtype
    c = lambda v: g.const(np.float32(v), f32)  # noqa: E731
    q = g.op("Cast", [g.op("Div", [x, scale], name=f"{name}_div")], name=f"{name}_fp8",
             to=TensorProto.FLOAT8E4M3FN, saturate=1)
    v = g.op("Cast", [q], name=f"{name}_val", to=f32)
    a = g.op("Abs", [v], name=f"{name}_abs")
    sign = g.op("Where", [g.op("Less", [v, c(0.0)], name=f"{name}_neg"), c(128.0), c(0.0)], name=f"{name}_sign")
    sub = g.op("Less", [a, c(2.0 ** -6)], name=f"{name}_is_sub")
    safe = g.op("Max", [a, c(2.0 ** -6)], name=f"{name}_safe")
    e = g.op("Floor", [g.op("Add", [g.op("Mul", [g.op("Log", [safe], name=f"{name}_log"), c(1.0 / np.log(2.0))],
                                         name=f"{name}_log2"), c(0.01)], name=f"{name}_log2e")], name=f"{name}_e")
    frac = g.op("Div", [safe, g.op("Pow", [c(2.0), e], name=f"{name}_p2")], name=f"{name}_frac")   # [1, 2)
    normal = g.op("Add", [g.op("Mul", [g.op("Add", [e, c(7.0)], name=f"{name}_ebias"), c(8.0)], name=f"{name}_efield"),
                          g.op("Mul", [g.op("Sub", [frac, c(1.0)], name=f"{name}_m1"), c(8.0)], name=f"{name}_m")],
                  name=f"{name}_normal")
    subn = g.op("Mul", [a, c(2.0 ** 9)], name=f"{name}_subn")
    bits = g.op("Add", [g.op("Where", [sub, subn, normal], name=f"{name}_mag"), sign], name=f"{name}_bitsf")
    return g.op("Cast", [bits], name=f"{name}_bits", to=TensorProto.UINT8)


def emit_fp8_decode(g: GraphBuilder, t: Target, bits: str, scale: str, name: str) -> str:
    """uint8 e4m3fn bit patterns -> float values * scale (a 256-entry lookup table)."""
    table = g.const(fp8_e4m3fn_table(), t.dtype, hint="fp8_e4m3fn_table")
    idx = g.op("Cast", [bits], name=f"{name}_idx", to=TensorProto.INT32)
    vals = g.op("Gather", [table, idx], name=f"{name}_lut", axis=0)
    return g.op("Mul", [vals, scale], name=name)


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
    impl: str = "fused"  # "fused" | "decomposed"
    q_shape: str = ""    # int64 [4] = (R, Qt, H, hd), computed once per step
    kv_shape: str = ""   # (kvH, R, MB*bs, hd): gathered K/V
    qg_shape: str = ""   # (kvH, R, G*Qt, hd): grouped queries (decomposed form)
    o5_shape: str = ""   # (kvH, R, G, Qt, hd): grouped output (decomposed form)
    rows_shape: str = "" # output rows: (R*Qt, H*hd), or (kvH, R*Qt, G, hd) in the grouped output layout
    y5_shape: str = ""   # (R, kvH, G, Qt, hd): fused Attention output split by groups (grouped layout)
    mask: str = ""       # bool mask for this bucket, computed once per step
    kind: str = "any"      # "decode": every row is one token (Qt = 1) | "any"
    guarded: bool = False  # attention wrapped in If(rows > 0): an unused bucket runs no kernels
    nonempty: str = ""     # bool scalar rows > 0 (guarded buckets), computed once per step


def bucket_kinds(num_buckets: int) -> list[str]:
    """Bucket roles: the last one takes any rows (prefill chunks); the others decode rows (Qt=1)."""
    return ["any"] if num_buckets == 1 else ["decode"] * (num_buckets - 1) + ["any"]


def bucket_impl(t: Target, kind: str) -> str:
    """"auto": decode rows as grouped MatMul/Softmax on ORT CPU (its Attention kernel runs one GEMV
    per query head and reads each K/V head G times; the grouped MatMul reads it once: 1.8x faster
    at 16 rows x 576 keys, measured), the fused Attention node for prefill rows and for every row
    on TensorRT. "fused" / "decomposed" force one form for every bucket."""
    if t.attention in ("fused", "decomposed"):
        return t.attention
    return "decomposed" if (kind == "decode" and not t.is_trt) else "fused"


def bucket_guarded(t: Target, b: int, kind: str) -> bool:
    """On ONNX Runtime the prefill ("any") bucket's attention runs inside If(rows > 0): the fused
    Attention node refuses an empty batch, so without the If every decode-only step (all of
    single-stream decode) computes a dummy row in every layer; a skipped If costs ~10 us. Decode
    buckets stay flat: empty, their kernels return at once (~1 us each on one thread), and a taken
    If costs more than that (guarding them too measured 0.8x in-flight throughput, twice: the
    second decode bucket is split off in most in-flight steps; single-stream gained 2%). TensorRT
    keeps the flat graph (no data-dependent control flow in its profiles)."""
    return not t.is_trt and kind != "decode"


def grouped_decode(bk: BucketInputs) -> bool:
    """A bucket of 1-token rows in the grouped MatMul/Softmax form (`_attend_decode_rows`)."""
    return bk.impl == "decomposed" and bk.kind == "decode"


def grouped_output(buckets: list[BucketInputs]) -> bool:
    """Buckets hand their outputs over as [kvH, rows, G, hd] (the grouped decode form's own layout)
    when any bucket is a grouped decode bucket: the buckets are concatenated and put back in packed
    order in that layout, and one Transpose + Reshape per layer makes the [T, H*hd] rows (instead of
    one pair per bucket). Otherwise (TensorRT, forced fused) they hand over [rows, H*hd]."""
    return any(map(grouped_decode, buckets))


def step_inputs(g: GraphBuilder, t: Target, num_buckets: int) -> tuple[str, list[BucketInputs], str]:
    """Declare the per-step attention inputs; returns (kv_write_index, buckets, attn_out_index)."""
    i64 = TensorProto.INT64
    write = g.input("kv_write_index", i64, ["num_tokens", 2])
    buckets = []
    for b, kind in enumerate(bucket_kinds(num_buckets)):
        buckets.append(BucketInputs(
            g.input(f"attn_q_index_{b}", i64, [f"rows_{b}_x_qt"]),
            g.input(f"attn_kv_blocks_{b}", i64, [f"rows_{b}", f"blocks_{b}"]),
            g.input(f"attn_q_pos_{b}", i64, [f"rows_{b}", f"qt_{b}"]),
            bucket_impl(t, kind),
            kind=kind,
            guarded=bucket_guarded(t, b, kind),
        ))
    out_index = g.input("attn_out_index", i64, ["num_tokens"])
    return write, buckets, out_index


def emit_step_masks(g: GraphBuilder, t: Target, d: AttentionDims, buckets: list[BucketInputs]) -> None:
    """Per bucket, once per step: the reshape targets and the boolean attention mask.

    Every reshape target is explicit (no -1), so a bucket with no rows this step (R = 0) runs as
    empty tensors: its kernels return at once instead of computing a dummy row.

    fused:      mask [R, 1, Qt, S]      (Attention's [batch, heads, q, kv], broadcast over heads)
    decomposed: mask [1, R, G*Qt, S]    (scores are [kvH, R, G*Qt, S]: rows are (group, query))
    """
    kvh, hd = g.const([d.num_kv_heads]), g.const([d.head_dim])
    for b, bk in enumerate(buckets):
        qshape = g.op("Shape", [bk.q_pos], name=f"bucket{b}_rows_qt")
        bk.q_shape = g.op("Concat", [qshape, g.const([d.num_heads, d.head_dim])], name=f"bucket{b}_q_shape", axis=0)
        rows = g.op("Gather", [qshape, g.const([0])], name=f"bucket{b}_rows", axis=0)
        if bk.guarded:
            r0 = g.op("Gather", [qshape, g.const(0)], name=f"bucket{b}_rows_scalar", axis=0)
            bk.nonempty = g.op("Greater", [r0, g.const(0)], name=f"bucket{b}_nonempty")
        qt = g.op("Gather", [qshape, g.const([1])], name=f"bucket{b}_qt", axis=0)
        mb = g.op("Gather", [g.op("Shape", [bk.kv_blocks], name=f"bucket{b}_kv_shape"), g.const([1])],
                  name=f"bucket{b}_mb", axis=0)
        keys1 = g.op("Mul", [mb, g.const(d.block_size)], name=f"bucket{b}_num_keys1")
        bk.kv_shape = g.op("Concat", [kvh, rows, keys1, hd], name=f"bucket{b}_kv_gathered_shape", axis=0)
        gqt = g.op("Mul", [qt, g.const(d.groups)], name=f"bucket{b}_g_qt")
        bk.qg_shape = g.op("Concat", [kvh, rows, gqt, hd], name=f"bucket{b}_qg_shape", axis=0)
        bk.o5_shape = g.op("Concat", [kvh, rows, g.const([d.groups]), qt, hd], name=f"bucket{b}_o5_shape", axis=0)
        rq = g.op("Mul", [rows, qt], name=f"bucket{b}_row_slots")
        if grouped_output(buckets):
            bk.rows_shape = g.op("Concat", [kvh, rq, g.const([d.groups]), hd], name=f"bucket{b}_rows_shape", axis=0)
            if bk.impl == "fused":
                bk.y5_shape = g.op("Concat", [rows, kvh, g.const([d.groups]), qt, hd], name=f"bucket{b}_y5_shape",
                                   axis=0)
        else:
            bk.rows_shape = g.op("Concat", [rq, g.const([d.q_size])], name=f"bucket{b}_rows_shape", axis=0)
        keys = g.op("Squeeze", [keys1, g.const([0])], name=f"bucket{b}_num_keys")
        kpos = g.op("Range", [g.const(0), keys, g.const(1)], name=f"bucket{b}_key_pos")
        qpos = bk.q_pos
        if bk.impl == "decomposed":
            qpos = g.op("Tile", [qpos, g.const([1, d.groups])], name=f"bucket{b}_q_pos_groups")
        q3 = g.op("Unsqueeze", [qpos, g.const([-1])], name=f"bucket{b}_q_pos3")
        mask = g.op("LessOrEqual", [kpos, q3], name=f"bucket{b}_causal")
        if d.sliding_window:
            lo = g.op("Sub", [q3, g.const(int(d.sliding_window))], name=f"bucket{b}_window_lo")
            mask = g.op("And", [mask, g.op("Greater", [kpos, lo], name=f"bucket{b}_in_window")],
                        name=f"bucket{b}_window")
        axis = 0 if bk.impl == "decomposed" else 1
        bk.mask = g.op("Unsqueeze", [mask, g.const([axis])], name=f"bucket{b}_mask")


def step_variants(t: Target, buckets: list[BucketInputs]) -> list[list[BucketInputs]]:
    """The bucket sets the graph has a body for; the first set whose buckets cover the step's rows
    runs (`emit_variant_cond`).

    On ONNX Runtime with a decode bucket and others: [[bucket 0], all buckets]. A step whose rows
    all sit in bucket 0 (every single-stream decode step, and in-flight steps whose decodes need no
    context split: `llmc.engine.step.plan_rows` fills bucket 0 first) runs a body with one bucket,
    so it pays neither the other decode buckets' empty kernels (9 per layer) nor the prefill
    bucket's If per layer: one If per step instead, and as its rows are the step's tokens in order
    it skips the query and output row Gathers too (`emit_variant_cond` checks that). Measured on
    SmolLM2 int4 single-stream decode: the empty second decode bucket alone cost 7-14%. The
    arithmetic of a body is that of the flat graph for its buckets: outputs are bit-identical.
    TensorRT keeps one flat body (no data-dependent control flow in its optimization profiles)."""
    if t.is_trt or len(buckets) < 2 or buckets[0].kind != "decode":
        return [buckets]
    return [buckets[:1], buckets]


def _dim(g: GraphBuilder, x: str, axis: int, name: str) -> str:
    """int64 scalar: x.shape[axis]."""
    return g.op("Gather", [g.op("Shape", [x], name=f"{name}_shape"), g.const(axis)], name=name, axis=0)


def _is_range(g: GraphBuilder, ids: str, n: str, name: str) -> str:
    """bool scalar: ids (the last axis, n long; any leading axes) is 0, 1, ..., n - 1."""
    off = g.op("Abs", [g.op("Sub", [ids, g.op("Range", [g.const(0), n, g.const(1)], name=f"{name}_range")],
                            name=f"{name}_diff")], name=f"{name}_absdiff")
    total = g.op("ReduceSum", [off], name=f"{name}_offsum", keepdims=0)
    return g.op("Equal", [total, g.const(0)], name=name)


def _all(g: GraphBuilder, conds: list[str], name: str) -> str:
    cond = conds[0]
    for i, c in enumerate(conds[1:]):
        cond = g.op("And", [cond, c], name=f"{name}_{i}")
    return cond


def emit_variant_cond(g: GraphBuilder, buckets: list[BucketInputs], first: list[BucketInputs],
                      input_ids: str) -> str:
    """bool scalar, once per step: the one-bucket body (`step_variants`) can run this step: every
    other bucket has zero rows and bucket 0 holds every token in packed order (q_index = 0..T-1,
    which `llmc.engine.step.plan_rows` gives a decode-only step it does not split), so that body
    reads queries and writes outputs without the row Gathers. Checked, not assumed: any other feed
    runs the general body."""
    conds = [g.op("Equal", [_dim(g, bk.kv_blocks, 0, f"variant_b{b}_rows"), g.const(0)], name=f"variant_b{b}_empty")
             for b, bk in enumerate(buckets) if not any(bk is f for f in first)]
    q0 = first[0].q_index
    rows0 = _dim(g, q0, 0, "variant_q0_rows")
    conds.append(g.op("Equal", [rows0, _dim(g, input_ids, 0, "variant_tokens")], name="variant_q0_all_tokens"))
    conds.append(_is_range(g, q0, rows0, "variant_q0_in_order"))
    return _all(g, conds, "variant_cond")


def kv_pool_layout(t: Target) -> str:
    """"slots" on ONNX Runtime: K and V of a layer each [1, kvH, num_blocks * bs, hd], the cache
    layout GroupQueryAttention shares in place (`emit_contiguous_attention`); "split" on TensorRT:
    [kvH, num_blocks, bs, hd], the same bytes. (Older ONNX Runtime engines kept a layer's K and V
    in one "paired" tensor: one ScatterND per layer instead of two, but no kernel can read it as a
    cache; the runtime still runs them.)"""
    return "split" if t.is_trt else "slots"


def emit_write_index(g: GraphBuilder, d: AttentionDims, write_index: str, layout: str) -> str:
    """[T, 2] (block, offset) -> ScatterND indices [T, kvH, 3] for a key or value pool tensor, once
    per step: (0, head, block * bs + offset) for the "slots" layout, (head, block, offset) for
    "split"."""
    kvh = d.num_kv_heads
    t_len = g.op("Gather", [g.op("Shape", [write_index], name="kv_write_shape"), g.const([0])],
                 name="kv_write_T", axis=0)
    shape = g.op("Concat", [t_len, g.const([kvh, 1])], name="kv_write_col_shape", axis=0)
    head_ids = g.const(np.arange(kvh, dtype=np.int64).reshape(1, -1, 1))
    hcol = g.op("Expand", [head_ids, shape], name="kv_write_heads")                         # [T, kvH, 1]
    if layout == "split":
        wi = g.op("Unsqueeze", [write_index, g.const([1])], name="kv_write_bo")             # [T, 1, 2]
        shape_bo = g.op("Concat", [t_len, g.const([kvh, 2])], name="kv_write_bo_shape", axis=0)
        bo = g.op("Expand", [wi, shape_bo], name="kv_write_bo_heads")                       # [T, kvH, 2]
        return g.op("Concat", [hcol, bo], name="kv_write_index_hbo", axis=-1)               # [T, kvH, 3]
    blk, off = g.op("Split", [write_index, g.const([1, 1])], n_out=2, name="kv_write_b_o", axis=-1)  # [T, 1] each
    slot = g.op("Add", [g.op("Mul", [blk, g.const(d.block_size)], name="kv_write_block_slot0"), off],
                name="kv_write_slot")                                                       # [T, 1]
    scol = g.op("Expand", [g.op("Unsqueeze", [slot, g.const([1])], name="kv_write_slot3"), shape],
                name="kv_write_slots")                                                      # [T, kvH, 1]
    return g.op("Concat", [g.op("Mul", [hcol, g.const(0)], name="kv_write_batch"), hcol, scol],
                name="kv_write_index_0hs", axis=-1)                                         # [T, kvH, 3]


class KVPool:
    """Declares one layer's pool tensors (`kv_pool.{l}.key` and `.value`, see `kv_pool_layout`) and
    emits the quantize-on-write / dequantize-on-read.

    Head-major: gathering a row's blocks (from `block_views`) yields [kvH, R, MB*bs, hd]
    directly, the operand layout of the grouped-query MatMuls, so a K/V element is copied exactly
    once per step (by the Gather).
    """

    def __init__(self, g: GraphBuilder, t: Target, d: AttentionDims, layer: int, kv_dtype: str,
                 kv_scale: float | None):
        self.g, self.t, self.d, self.layer = g, t, d, layer
        self.layout = kv_pool_layout(t)
        self.quant = kv_dtype if kv_dtype in KV_ONNX_TYPES else None
        if self.quant and kv_scale is None:
            raise ValueError(f"layer {layer}: quantized KV cache without kv_cache_scaling_factor")
        native = self.quant is not None and t.kv_storage == "native"
        self.pool_type = KV_ONNX_TYPES[self.quant] if native else t.dtype
        self.native = native
        self.fp8_bits = native and self.quant == "fp8" and not t.is_trt
        if self.fp8_bits:
            self.pool_type = TensorProto.UINT8
        if self.quant:
            self.kv_scale = float(kv_scale)
            self.scale = g.const(np.float32(kv_scale), t.dtype, hint=f"kv_scale_{layer}")
            self.zp = g.const(np.zeros((), np.float32) if self.quant == "fp8" else np.int8(0),
                              KV_ONNX_TYPES[self.quant], hint=f"kv_zp_{self.quant}")
        shape = ([1, d.num_kv_heads, "num_slots", d.head_dim] if self.layout == "slots" else
                 [d.num_kv_heads, "num_blocks", d.block_size, d.head_dim])
        self.names = {}
        for kind in ("key", "value"):
            src = g.input(f"kv_pool.{layer}.{kind}", self.pool_type, shape)
            dst = f"{src}.out"
            g.output(dst, self.pool_type, shape)
            self.names[kind] = (src, dst)

    @property
    def as_cache(self) -> bool:
        """The pool tensors are a BNSH cache that GroupQueryAttention can share in place: float32 or
        float16 (its CPU kernel, ORT 1.32; not bfloat16), or int8 under this layer's one scale in a
        float32 graph (its PER_TENSOR quantized cache, which rounds and saturates new K/V as
        QuantizeLinear does: a test compares the two bodies)."""
        if self.layout != "slots":
            return False
        if self.quant is None:
            return self.pool_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
        return self.quant == "int8" and self.native and self.t.dtype == TensorProto.FLOAT

    def write(self, new: dict[str, str], write_index: str, out_names: bool = True) -> dict[str, str]:
        """Store the new rows {"key": [T, kvH, hd], "value": [T, kvH, hd]}; returns the updated pool
        tensor per kind (ScatterND outputs, bound to the input buffers: written in place).
        out_names: the ScatterND outputs are the graph outputs themselves (else fresh names, for a
        step variant's body whose If node carries the graph outputs)."""
        g, layer = self.g, self.layer
        out = {}
        for kind, rows in new.items():
            if self.fp8_bits:
                rows = emit_fp8_bits(g, self.t, rows, self.scale, f"l{layer}_{kind}_kvq")
            elif self.quant:
                q = g.op("QuantizeLinear", [rows, self.scale, self.zp], name=f"l{layer}_{kind}_kvq")
                rows = q if self.native else g.op("DequantizeLinear", [q, self.scale, self.zp],
                                                  name=f"l{layer}_{kind}_kvfq")
            src, dst = self.names[kind]
            out[kind] = g.op("ScatterND", [src, write_index, rows], name=f"l{layer}_{kind}_write",
                             outputs=[dst] if out_names else None)
        return out

    def block_views(self, pools: dict[str, str]) -> dict[str, str]:
        """The updated pool tensors as [kvH, num_blocks, bs, hd], once per layer: a "slots" tensor
        through a Reshape, which ONNX Runtime runs as a view of the same buffer (measured: 4 us on
        a 50 MB pool), so buckets gather whole blocks (slot-by-slot gathers, 256-byte copies,
        measured 0.93x in-flight throughput)."""
        if self.layout != "slots":
            return pools
        shape = self.g.const([self.d.num_kv_heads, -1, self.d.block_size, self.d.head_dim])
        return {kind: self.g.op("Reshape", [t, shape], name=f"l{self.layer}_{kind}_blocks")
                for kind, t in pools.items()}

    def read(self, views: dict[str, str], bk: BucketInputs, b: int) -> tuple[str, str]:
        """Gather a bucket's blocks from `block_views`: (K, V), each [kvH, R, MB*bs, hd] in the
        compute dtype."""
        return self._read_one(views["key"], "key", bk, b), self._read_one(views["value"], "value", bk, b)

    def _read_one(self, view: str, kind: str, bk: BucketInputs, b: int) -> str:
        g = self.g
        blocks = g.op("Gather", [view, bk.kv_blocks], name=f"l{self.layer}_b{b}_{kind}_gather", axis=1)
        flat = g.op("Reshape", [blocks, bk.kv_shape], name=f"l{self.layer}_b{b}_{kind}")
        if self.fp8_bits:
            flat = emit_fp8_decode(g, self.t, flat, self.scale, f"l{self.layer}_b{b}_{kind}_dq")
        elif self.native:  # int8: Cast * scale is DequantizeLinear's arithmetic; a DQ here would be
            # moved by ORT's QDQ propagation through the Transposes and mis-typed (ORT 1.31).
            f = g.op("Cast", [flat], name=f"l{self.layer}_b{b}_{kind}_f", to=self.t.dtype)
            flat = g.op("Mul", [f, self.scale], name=f"l{self.layer}_b{b}_{kind}_dq")
        return flat


@dataclass
class ContiguousStep:
    """Step-level GroupQueryAttention inputs of the contiguous single-sequence body, computed once
    per step inside that body (`emit_contiguous_step`)."""

    seqlens_k: str   # int32 [1]: tokens cached before this one (= its position)
    total: str       # int32 scalar: tokens in the cache after it
    cos_cache: str   # [max_positions, hd / 2]
    sin_cache: str
    stream_3d: bool = False  # the body's activations are [1, 1, hidden] (GroupQueryAttention's BSD)


def contiguous_decode(t: Target, pool: KVPool, cos: np.ndarray, sin_signed: np.ndarray, sliding_window) -> bool:
    """Whether a graph gets the contiguous single-sequence body: ONNX Runtime, a cache it can share
    (`KVPool.as_cache`), no sliding window, and rotate-half RoPE tables whose halves repeat (what
    GroupQueryAttention's cos/sin caches of head_dim / 2 columns express)."""
    half = cos.shape[1] // 2
    return (pool.as_cache and not sliding_window and np.array_equal(cos[:, :half], cos[:, half:])
            and np.array_equal(-sin_signed[:, :half], sin_signed[:, half:]))


def emit_contiguous_cond(g: GraphBuilder, buckets: list[BucketInputs], input_ids: str) -> str:
    """bool scalar, once per step: the step is one token of one sequence (bucket 0's only row; every
    other bucket empty) whose block table is 0, 1, ..., MB - 1, so its cache is slots [0, position]
    of every pool tensor. Checked, not assumed: any other step runs the paged body."""
    blocks = buckets[0].kv_blocks
    conds = [g.op("Equal", [_dim(g, input_ids, 0, "contig_tokens"), g.const(1)], name="contig_one_token"),
             g.op("Equal", [_dim(g, blocks, 0, "contig_b0_rows"), g.const(1)], name="contig_one_row")]
    conds += [g.op("Equal", [_dim(g, bk.kv_blocks, 0, f"contig_b{b}_rows"), g.const(0)], name=f"contig_b{b}_empty")
              for b, bk in enumerate(buckets) if b]
    conds.append(_is_range(g, blocks, _dim(g, blocks, 1, "contig_mb"), "contig_in_order"))
    return _all(g, conds, "contig_cond")


def emit_contiguous_step(g: GraphBuilder, t: Target, positions: str, cos: np.ndarray,
                         sin_signed: np.ndarray, stream_3d: bool = False) -> ContiguousStep:
    """The contiguous body's step inputs (`ContiguousStep`) from the one token's position."""
    half = cos.shape[1] // 2
    pos32 = g.op("Cast", [positions], name="contig_seqlens_k", to=TensorProto.INT32)   # [1]
    total = g.op("Squeeze", [g.op("Add", [pos32, g.const(np.int32(1), TensorProto.INT32)], name="contig_total1")],
                 name="contig_total")
    return ContiguousStep(pos32, total, g.weight("rope.cos_half", np.ascontiguousarray(cos[:, :half]), t.dtype),
                          g.weight("rope.sin_half", np.ascontiguousarray(sin_signed[:, half:]), t.dtype), stream_3d)


def emit_contiguous_attention(g: GraphBuilder, d: AttentionDims, pool: KVPool, qkv: str, step: ContiguousStep,
                              out_names: bool = True) -> tuple[str, list[str]]:
    """qkv [1, (H + 2 kvH) * hd] (one token, before RoPE; [1, 1, ...] with `step.stream_3d`) ->
    (attention output [1, H * hd], resp. [1, 1, H * hd], the updated pool tensors): one
    com.microsoft GroupQueryAttention over the packed QKV with RoPE
    (do_rotary), reading slots [0, position] of the pool tensors as its past and writing the new
    K/V at slot `position` of the same buffers (past and present bound to one buffer: ORT appends
    in place instead of copying the past)."""
    layer = pool.layer
    q3 = qkv if step.stream_3d else g.op("Unsqueeze", [qkv, g.const([0])], name=f"l{layer}_qkv_bsd")  # [1, 1, D]
    (k_src, k_dst), (v_src, v_dst) = pool.names["key"], pool.names["value"]
    outs = [g.fresh(f"l{layer}_gqa")] + ([k_dst, v_dst] if out_names else
                                          [g.fresh(f"l{layer}_key_present"), g.fresh(f"l{layer}_value_present")])
    inputs = [q3, "", "", k_src, v_src, step.seqlens_k, step.total, step.cos_cache, step.sin_cache]
    quant = {}
    if pool.quant:  # int8 cache (`KVPool.as_cache`): K and V share the layer's scale
        scale = g.const(np.array([pool.kv_scale], np.float32), TensorProto.FLOAT, hint=f"kv_cache_scale_{layer}")
        inputs += ["", "", "", scale, scale]        # position_ids, attention_bias, head_sink, k_scale, v_scale
        quant = dict(k_quant_type="PER_TENSOR", v_quant_type="PER_TENSOR", kv_cache_bit_width=8)
    y, k_out, v_out = g.op("GroupQueryAttention", inputs,
                           name=f"l{layer}_gqa", outputs=outs, domain="com.microsoft",
                           num_heads=d.num_heads, kv_num_heads=d.num_kv_heads, do_rotary=1, rotary_interleaved=0,
                           scale=float(1.0 / np.sqrt(d.head_dim)), **quant)
    return (y if step.stream_3d else g.op("Squeeze", [y, g.const([0])], name=f"l{layer}_gqa_rows")), [k_out, v_out]


def _attend_fused(g: GraphBuilder, d: AttentionDims, q4: str, k: str, v: str, bk: BucketInputs, name: str) -> str:
    """One standard Attention node on 4-D operands; returns the bucket's rows (see `grouped_output`)."""
    qh = g.op("Transpose", [q4], name=f"{name}_q", perm=[0, 2, 1, 3])           # [R, H, Qt, hd]
    kh = g.op("Transpose", [k], name=f"{name}_k", perm=[1, 0, 2, 3])            # [R, kvH, S, hd]
    vh = g.op("Transpose", [v], name=f"{name}_v", perm=[1, 0, 2, 3])
    y = g.op("Attention", [qh, kh, vh, bk.mask], name=name, scale=float(1.0 / np.sqrt(d.head_dim)))
    if bk.y5_shape:  # grouped output layout
        y5 = g.op("Reshape", [y, bk.y5_shape], name=f"{name}_y5")                # [R, kvH, G, Qt, hd]
        yt = g.op("Transpose", [y5], name=f"{name}_out_t", perm=[1, 0, 3, 2, 4])  # [kvH, R, Qt, G, hd]
    else:
        yt = g.op("Transpose", [y], name=f"{name}_out_t", perm=[0, 2, 1, 3])    # [R, Qt, H, hd]
    return g.op("Reshape", [yt, bk.rows_shape], name=f"{name}_rows")


def _attend_decomposed(g: GraphBuilder, t: Target, d: AttentionDims, q4: str, k: str, v: str,
                       bk: BucketInputs, name: str, grouped_out: bool) -> str:
    """Grouped-query attention as MatMul/Softmax; K/V [kvH, R, S, hd] are read in place."""
    kvh, grp, hd = d.num_kv_heads, d.groups, d.head_dim
    q5 = g.op("Reshape", [q4, g.const([0, 0, kvh, grp, hd])], name=f"{name}_q5")  # [R, Qt, kvH, G, hd]
    qt = g.op("Transpose", [q5], name=f"{name}_qt", perm=[2, 0, 3, 1, 4])          # [kvH, R, G, Qt, hd]
    qg = g.op("Reshape", [qt, bk.qg_shape], name=f"{name}_qg")                     # [kvH, R, G*Qt, hd]
    qs = g.op("Mul", [qg, g.const(np.float32(1.0 / np.sqrt(hd)), t.dtype)], name=f"{name}_qscale")
    kt = g.op("Transpose", [k], name=f"{name}_kt", perm=[0, 1, 3, 2])              # [kvH, R, hd, S]
    scores = g.op("MatMul", [qs, kt], name=f"{name}_qk")                           # [kvH, R, G*Qt, S]
    scores = g.op("Where", [bk.mask, scores, g.const(np.float32(-np.inf), t.dtype)], name=f"{name}_mask")
    probs = g.op("Softmax", [scores], name=f"{name}_softmax", axis=-1)
    out = g.op("MatMul", [probs, v], name=f"{name}_pv")                            # [kvH, R, G*Qt, hd]
    o5 = g.op("Reshape", [out, bk.o5_shape], name=f"{name}_o5")                    # [kvH, R, G, Qt, hd]
    perm = [0, 1, 3, 2, 4] if grouped_out else [1, 3, 0, 2, 4]  # [kvH, R, Qt, G, hd] | [R, Qt, kvH, G, hd]
    ot = g.op("Transpose", [o5], name=f"{name}_ot", perm=perm)
    return g.op("Reshape", [ot, bk.rows_shape], name=f"{name}_rows")


def _grouped_queries(g: GraphBuilder, d: AttentionDims, q: str, layer: int) -> str:
    """q [T, H, hd] -> [kvH, T, G, hd], once per layer: every decode bucket then gathers its rows
    along axis 1 with one Gather (instead of Gather + Reshape + Transpose per bucket)."""
    q4 = g.op("Reshape", [q, g.const([0, d.num_kv_heads, d.groups, d.head_dim])], name=f"l{layer}_q_groups")
    return g.op("Transpose", [q4], name=f"l{layer}_q_grouped", perm=[1, 0, 2, 3])


def _attend_decode_rows(g: GraphBuilder, t: Target, d: AttentionDims, qt: str, k: str, v: str,
                        bk: BucketInputs, name: str) -> str:
    """The grouped MatMul/Softmax form for 1-token rows: qt [kvH, R, G, hd] -> [kvH, R, G, hd].

    With Qt = 1 the queries of a row are [kvH, G, hd] (see `_grouped_queries`) and its output is
    already in the grouped output layout (`grouped_output`), so the row packing of the general form
    (two reshapes and a transpose each way) reduces to the query gather.
    """
    hd = d.head_dim
    qs = g.op("Mul", [qt, g.const(np.float32(1.0 / np.sqrt(hd)), t.dtype)], name=f"{name}_qscale")
    kt = g.op("Transpose", [k], name=f"{name}_kt", perm=[0, 1, 3, 2])              # [kvH, R, hd, S]
    scores = g.op("MatMul", [qs, kt], name=f"{name}_qk")                           # [kvH, R, G, S]
    scores = g.op("Where", [bk.mask, scores, g.const(np.float32(-np.inf), t.dtype)], name=f"{name}_mask")
    probs = g.op("Softmax", [scores], name=f"{name}_softmax", axis=-1)
    return g.op("MatMul", [probs, v], name=f"{name}_pv")                           # [kvH, R, G, hd]


def emit_paged_attention(g: GraphBuilder, t: Target, d: AttentionDims, pool: KVPool, q: str, k_new: str,
                         v_new: str, write_index: str, buckets: list[BucketInputs], out_index: str,
                         out_names: bool = True, rows_in_order: bool = False) -> tuple[str, list[str]]:
    """q [T, H, hd], k_new and v_new [T, kvH, hd] -> (attention output [T, H*hd]
    in packed order, the updated pool tensors).

    write_index: the ScatterND indices from `emit_write_index` (for the pool's head count).
    rows_in_order: one grouped decode bucket whose rows are the step's tokens in packed order (the
    one-bucket step variant): no query or output row Gather.
    """
    layer = pool.layer
    pools = pool.write({"key": k_new, "value": v_new}, write_index, out_names)
    written = list(pools.values())
    views = pool.block_views(pools)
    outs = []
    grouped = [grouped_decode(bk) for bk in buckets]
    grouped_out = any(grouped)  # grouped_output(buckets)
    q_grouped = _grouped_queries(g, d, q, layer) if grouped_out else None
    for b, bk in enumerate(buckets):
        def attend(b=b, bk=bk) -> str:
            kb, vb = pool.read(views, bk, b)
            name = f"l{layer}_b{b}_attention"
            if grouped[b] and rows_in_order:
                return _attend_decode_rows(g, t, d, q_grouped, kb, vb, bk, name)
            if grouped[b]:
                qt = g.op("Gather", [q_grouped, bk.q_index], name=f"l{layer}_b{b}_q_rows", axis=1)  # [kvH, R, G, hd]
                return _attend_decode_rows(g, t, d, qt, kb, vb, bk, name)
            qb = g.op("Gather", [q, bk.q_index], name=f"l{layer}_b{b}_q_rows", axis=0)
            q4 = g.op("Reshape", [qb, bk.q_shape], name=f"l{layer}_b{b}_q")            # [R, Qt, H, hd]
            if bk.impl == "fused":
                return _attend_fused(g, d, q4, kb, vb, bk, name)
            return _attend_decomposed(g, t, d, q4, kb, vb, bk, name, grouped_out)

        if not bk.guarded:
            outs.append(attend())
            continue
        with g.branch() as then_nodes:
            y = attend()
        with g.branch() as else_nodes:
            empty = g.fresh(f"l{layer}_b{b}_no_rows")
            shape = [d.num_kv_heads, 0, d.groups, d.head_dim] if grouped_out else [0, d.q_size]
            else_nodes.append(helper.make_node("Constant", [], [empty], name=g.fresh(f"{empty}_node"),
                                               value=helper.make_tensor(empty, t.dtype, shape, [])))
        outs.append(g.if_op(bk.nonempty, then_nodes, y, else_nodes, empty, t.dtype, f"l{layer}_b{b}_if"))
    axis = 1 if grouped_out else 0
    cat = outs[0] if len(outs) == 1 else g.op("Concat", outs, name=f"l{layer}_attn_rows", axis=axis)
    out = cat if rows_in_order else g.op("Gather", [cat, out_index], name=f"l{layer}_attn_out", axis=axis)
    if not grouped_out:
        return out, written
    ot = g.op("Transpose", [out], name=f"l{layer}_attn_out_t", perm=[1, 0, 2, 3])       # [T, kvH, G, hd]
    return g.op("Reshape", [ot, g.const([0, d.q_size])], name=f"l{layer}_attn_out_rows"), written
