"""The decoder graph: one ONNX graph for every step (prefill, decode, or both mixed).

Inputs (T = packed tokens of all sequences in the step, no padding):
    input_ids [T], positions [T]                      int64
    kv_write_index [T, 2]                             int64 (block, offset) of each new token
    attn_q_index_b [R_b*Qt_b], attn_kv_blocks_b [R_b, MB_b], attn_q_pos_b [R_b, Qt_b]
                                                      int64, per attention bucket b
    attn_out_index [T]                                int64, row slot of each packed token
    logits_index [S]                                  int64, tokens whose logits are wanted
    kv_pool.{l} [kvH, 2*num_blocks, bs, hd]           KV dtype (float / int8 / fp8 as uint8 bits),
                                                      the runtime's pool: keys of block b at 2b,
                                                      values at 2b+1 (ORT)
    kv_pool.{l}.{key,value} [kvH, num_blocks, bs, hd] two tensors per layer (TensorRT)
Outputs:
    logits [S, vocab] float32
    kv_pool.{l}[.key|.value].out                      bound to the same buffers as the inputs

Per layer: RMSNorm -> ONE qkv MatMul (+bias) -> RoPE on q, k and v together (identity on v) ->
paged attention (one KV write per pool tensor + grouped MatMul/Softmax or fused Attention) ->
dense -> residual + RMSNorm -> ONE gate+up MatMul -> SiLU*up -> proj -> residual (added by the
next layer's norm). On ONNX Runtime each residual add and the norm after it are one
com.microsoft SkipSimplifiedLayerNormalization, and an AWQ / SmoothQuant pre-quant scale of qkv
and gate_up is folded into the norm weight before it (`_fold_pre_scale`): two kernels fewer per
layer each, exact to float32 rounding (1.04-1.11x single-stream decode across qformats, measured).
Logits are computed only for `logits_index` rows. On ONNX Runtime the layers are built twice, as
the two bodies of one If per step: with a float or int8 KV cache, one token of one sequence whose
blocks are 0, 1, ... (every single-stream decode step: `llmc.runtime.kv_blocks` hands a lone
sequence such a table) runs a body whose attention is one GroupQueryAttention per layer on the
pool itself (`emit_contiguous_attention`); with an fp8 cache, steps whose rows all sit in
bucket 0, in order, run a one-bucket body (`step_variants`). Others run the general body, whose
prefill bucket's attention runs inside If(rows > 0), so decode-only steps skip it.
(Measured and not adopted: ORT's RotaryEmbedding contrib op rotates every head of its input, so
with V in the same QKV output it needs a Split before and a Concat after: more nodes than the
four RoPE ops. Its GroupQueryAttention on the rows' K/V gathered from the pool (not shared with
it), tried for the one-bucket body: 0.93x single-stream int4 decode, its CPU kernel copies the
past into a new present buffer every step. The standard Attention node for that body's rows:
0.98x, same tokens.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto

from llmc.checkpoint.config import CheckpointConfig
from llmc.checkpoint.schema import LAYER
from llmc.engine.onnx_graph import walk_nodes
from llmc.plugins.graph import DATA_FILE, GraphBuilder
from llmc.build.weights import WeightReader, kv_quant, np32
from llmc.errors import UnsupportedError
from llmc.plugins.attention import (AttentionDims, BucketInputs, ContiguousStep, KVPool, bucket_kinds,
                                    contiguous_decode, emit_contiguous_attention, emit_contiguous_cond,
                                    emit_contiguous_step, emit_paged_attention, emit_step_masks, emit_variant_cond,
                                    emit_write_index, kv_pool_layout, step_inputs, step_variants)
from llmc.plugins.base import Target
from llmc.plugins.embedding import emit_embedding
from llmc.plugins.gated_mlp import emit_gated_mlp
from llmc.plugins.linear import Int8Blocks, any_rank, emit_linear, exact_int8_blocks
from llmc.plugins.rmsnorm import emit_add_rmsnorm, emit_rmsnorm
from llmc.plugins.rope import emit_head_tables, emit_rope, emit_rope_tables, rope_tables
from llmc.quantize.layout import QLinear


@dataclass
class GraphSpec:
    """What the runtime needs to know about a built graph (stored in the engine config)."""

    num_layers: int
    num_buckets: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str            # "float32" | "float16" | "bfloat16" | "int8" | "fp8"
    kv_pool_onnx_type: int
    compute_dtype: str
    max_positions: int
    attention: list            # per bucket: "fused" | "decomposed"
    bucket_kinds: list         # per bucket: "decode" (Qt = 1 rows) | "any"
    backend: str
    weight_bytes: int = 0
    decode_read_bytes: int = 0  # weights one decode step reads: all but a gather-only embedding table
    lm_head: str = "float"      # how the logits GEMM is stored: "float" | "int8-blocks" | "quantized"
    empty_buckets: bool = True  # explicit reshape targets: an unused bucket may have zero rows
    guarded_buckets: list = field(default_factory=list)  # per bucket: attention inside If(rows > 0)
    kv_pool_layout: str = "split"  # "slots" (ORT) | "split" (TRT) | "paired" (older ORT engines); see kv_pool_layout
    step_variants: list = field(default_factory=list)  # bucket indices of each paged body (ORT: [[0], all] or [all]); [] = flat
    contiguous_decode: bool = False  # a GroupQueryAttention body for one sequence on blocks 0, 1, ...
    node_count: int = 0
    op_counts: dict = field(default_factory=dict)

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


DTYPE_OF = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}


def check_supported(cfg: CheckpointConfig) -> None:
    if cfg.mapping.pp_size != 1:
        raise UnsupportedError("pipeline-parallel checkpoints are not supported by the engine builder")
    if cfg.hidden_act not in ("silu", "swiglu"):
        raise UnsupportedError(f"hidden_act {cfg.hidden_act!r}: the engine implements SiLU-gated MLPs only")
    if cfg.position_embedding_type not in ("rope_gpt_neox", "rope"):
        raise UnsupportedError(f"position_embedding_type {cfg.position_embedding_type!r} is not supported")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise UnsupportedError("num_attention_heads must be a multiple of num_key_value_heads")
    if getattr(cfg, "mlp_bias", False):
        raise UnsupportedError("MLP biases are not supported by the engine builder")


def build_graph(tensors: dict[str, torch.Tensor], cfg: CheckpointConfig, target: Target, out_dir: Path,
                *, block_size: int, max_positions: int, num_buckets: int = 2,
                kv_cache_dtype: str | None = "auto", lm_head: str = "float") -> tuple[onnx.ModelProto, GraphSpec]:
    """Emit the graph; weights stream into out_dir/model.onnx.data. Returns (model, spec).

    lm_head: "float" | "int8" | "int8-if-exact": a float lm_head stored as exact int8 blocks
    (see `exact_int8_blocks`; "int8" refuses weights that are not). The returned ModelProto
    references its weights externally; save it next to the data file.
    """
    check_supported(cfg)
    reader = WeightReader(tensors, cfg)
    kvq = kv_quant(cfg) if kv_cache_dtype in (None, "auto") else (None if kv_cache_dtype == "float" else kv_cache_dtype)
    if kvq is not None and cfg.quantization.kv_cache_quant_algo is None:
        raise UnsupportedError("--kv-cache-dtype int8/fp8 needs a checkpoint calibrated with a KV-cache "
                               "scale (llmc quantize --kv-cache ...)")
    d = AttentionDims(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size, block_size,
                      cfg.sliding_window if cfg.sliding_window and cfg.sliding_window < max_positions else None)
    g = GraphBuilder(out_dir / DATA_FILE)
    i64 = TensorProto.INT64
    input_ids = g.input("input_ids", i64, ["num_tokens"])
    g.rows_source = input_ids  # activations are [num_tokens, ...] (see GraphBuilder.shared)
    positions = g.input("positions", i64, ["num_tokens"])
    write_index, buckets, out_index = step_inputs(g, target, num_buckets)
    logits_index = g.input("logits_index", i64, ["num_logits"])

    cos_np, sin_np = rope_tables(cfg, max_positions)

    def paged_tables() -> PagedTables:
        """The paged bodies' step-level values shared by every layer: per-token RoPE tables and the
        KV write indices (the contiguous body needs neither: GroupQueryAttention rotates and writes)."""
        cos, sin = emit_rope_tables(g, target, cos_np, sin_np, positions)
        cos, sin = emit_head_tables(g, target, cos, sin, d.num_heads + d.num_kv_heads,
                                    d.num_heads + 2 * d.num_kv_heads)
        return PagedTables(cos, sin, emit_write_index(g, d, write_index, kv_pool_layout(target)))

    emb_t = tensors["transformer.vocab_embedding.weight"]
    lm_lin, tied, lm_kind, tied_blocks = _choose_lm_head(tensors, reader, emb_t, lm_head)
    before_emb = g.weight_bytes
    # Integer lm_head: the float table is not needed, look rows up from int8 blocks if exact.
    x, emb = emit_embedding(g, target, np32(emb_t), input_ids, allow_blocks=lm_kind != "float",
                            known_blocks=tied_blocks)
    emb_bytes = g.weight_bytes - before_emb
    # One pass over the layers for what the graph decides before emitting them: each pool's KV
    # scale, and whether every linear takes [1, 1, hidden] rows (`any_rank`: the contiguous
    # body's 3-D stream). Layers are re-read per body, not held: weights stream out as emitted.
    pools, all_any_rank = [], True
    for i in range(cfg.num_hidden_layers):
        lw = reader.layer(i)
        pools.append(KVPool(g, target, d, i, kvq or "float", lw.kv_cache_scale))
        all_any_rank = all_any_rank and all(any_rank(target, lin) for lin in lw.linears())

    def layers(active: list[BucketInputs], x: str, out_names: bool, tables: PagedTables | None,
               rows_in_order: bool = False, contig: ContiguousStep | None = None) -> tuple[str, list[str]]:
        """The decoder layers over the given attention buckets (or, with `contig`, over one
        sequence's contiguous cache): (hidden, updated pool tensors)."""
        if contig is None:
            emit_step_masks(g, target, d, active)
        elif contig.stream_3d:  # GroupQueryAttention's [batch, seq, hidden]: once per step, not per layer
            x = g.op("Unsqueeze", [x, g.const([0])], name="contig_stream_3d")
        updated, skip = [], None
        for i in range(cfg.num_hidden_layers):
            x, skip, written = _emit_layer(g, target, d, cfg, reader.layer(i), i, x, skip, pools[i], tables,
                                           active, out_index, out_names, rows_in_order, contig)
            updated += written
        x = g.op("Add", [x, skip], name="residual_last_layer")
        if contig is not None and contig.stream_3d:
            x = g.op("Squeeze", [x, g.const([0])], name="contig_stream_2d")
        return x, updated

    variants = step_variants(target, buckets)
    contiguous = len(variants) > 1 and contiguous_decode(target, pools[0], cos_np, sin_np, d.sliding_window)
    if len(variants) == 1:
        x, _ = layers(buckets, x, out_names=True, tables=paged_tables())
    else:
        # ONNX Runtime: one If per step picks one of two bodies; weights live in the outer graph,
        # shared. The first body: one token of one sequence whose cache is slots [0, position],
        # each layer's attention one GroupQueryAttention on the shared cache
        # (`emit_contiguous_attention`), when the pool is a cache it can share (`KVPool.as_cache`:
        # float, or int8); else steps whose rows all sit in bucket 0 (`step_variants`). The
        # second: any step. (A third body, the one-bucket one inside the first's If or the
        # second's, ran 10x slower: ORT then copied every pool tensor through the inner If's
        # outputs, measured, ORT 1.32.) The paged tables are computed where they are used: in the
        # general body only when the other is the contiguous one.
        if contiguous:
            variants, shared = [buckets], None
            cond = emit_contiguous_cond(g, buckets, input_ids)
        else:
            shared = paged_tables()
            cond = emit_variant_cond(g, buckets, variants[0], input_ids)
        with g.branch() as first_nodes:
            if contiguous:
                step = emit_contiguous_step(g, target, positions, cos_np, sin_np, stream_3d=all_any_rank)
                first_x, first_pools = layers([], x, out_names=False, tables=None, contig=step)
            else:
                first_x, first_pools = layers(variants[0], x, out_names=False, tables=shared, rows_in_order=True)
        with g.branch() as any_nodes:
            any_x, any_pools = layers(buckets, x, out_names=False, tables=shared or paged_tables())
        pool_outs = [dst for pool in pools for _, dst in pool.names.values()]
        x = g.if_multi(cond, first_nodes, [first_x, *first_pools], any_nodes, [any_x, *any_pools],
                       [target.dtype] + [pools[0].pool_type] * len(pool_outs),
                       CONTIGUOUS_IF if contiguous else VARIANT_IF,
                       outputs=[g.fresh("hidden_last_layer"), *pool_outs])[0]
    pool = pools[-1]

    last = g.op("Gather", [x, logits_index], name="logits_rows", axis=0)
    last = emit_rmsnorm(g, target, last, np32(tensors["transformer.ln_f.weight"]), cfg.norm_epsilon,
                        "transformer.ln_f")
    logits = _emit_lm_head(g, target, lm_lin, tied, lm_kind, emb, last)
    if target.dtype != TensorProto.FLOAT:
        logits = g.op("Cast", [logits], name="logits_fp32", to=TensorProto.FLOAT)
    g.op("Identity", [logits], name="logits_out", outputs=["logits"])
    g.output("logits", TensorProto.FLOAT, ["num_logits", cfg.vocab_size])

    model = g.model(doc="llmc engine graph")
    read_bytes = g.weight_bytes - (0 if tied and lm_kind == "float" else emb_bytes)
    return model, _graph_spec(model, cfg, target, d, kvq, pool, buckets, num_buckets, block_size,
                              max_positions, g.weight_bytes, read_bytes, lm_kind,
                              [[buckets.index(bk) for bk in v] for v in variants] if len(variants) > 1 or contiguous
                              else [], contiguous)


VARIANT_IF = "step_variant_if"
CONTIGUOUS_IF = "contiguous_decode_if"


def _if_branches(graph: onnx.GraphProto, prefix: str) -> tuple[onnx.GraphProto, onnx.GraphProto] | None:
    for n in graph.node:
        if n.op_type == "If" and n.name.startswith(prefix):
            branches = {a.name: a.g for a in n.attribute}
            return branches["then_branch"], branches["else_branch"]
    return None


def step_bodies(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    """The paged decoder-layer bodies of a built graph, in `step_variants` order: [one decode
    bucket, all buckets] or [all buckets] (the other body is the contiguous one, `contiguous_body`)
    for ONNX Runtime graphs, [the (flat) graph itself] for TensorRT ones."""
    contig = _if_branches(model.graph, CONTIGUOUS_IF)
    if contig:
        return [contig[1]]
    variants = _if_branches(model.graph, VARIANT_IF)
    return list(variants) if variants else [model.graph]


def contiguous_body(model: onnx.ModelProto) -> onnx.GraphProto | None:
    """The GroupQueryAttention body of a built graph (`emit_contiguous_attention`), if it has one."""
    contig = _if_branches(model.graph, CONTIGUOUS_IF)
    return contig[0] if contig else None


@dataclass(frozen=True)
class PagedTables:
    """Step-level values of a paged body (`build_graph.paged_tables`)."""

    cos: str            # per packed token and head, [T, heads, hd]
    sin: str
    write_index: str    # ScatterND indices of the new K/V rows in the pool


def _emit_layer(g: GraphBuilder, target: Target, d: AttentionDims, cfg: CheckpointConfig, lw, i: int, x: str,
                skip: str | None, pool: KVPool, tables: PagedTables | None, buckets, out_index,
                out_names: bool = True, rows_in_order: bool = False,
                contig: ContiguousStep | None = None) -> tuple[str, str, list[str]]:
    """One decoder layer: pre-norm attention over the paged KV pool, then the gated MLP. Returns
    (residual stream, MLP output, updated pools): the MLP's residual add is left to the next
    layer's norm (`emit_add_rmsnorm`: one kernel on ONNX Runtime), `skip` is the previous layer's.
    Q, K and V share one Reshape, one RoPE (the identity on V) and one Split (fewer, fatter nodes
    per layer). With `contig` (the contiguous single-sequence body) RoPE, the KV write and attention
    are one GroupQueryAttention."""
    p = LAYER.format(i=i).rstrip(".")  # node names follow the checkpoint names
    kv_heads = 2 * d.num_kv_heads
    w_in, qkv_lin = _fold_pre_scale(target, lw.input_layernorm, lw.qkv)
    h, x = emit_add_rmsnorm(g, target, x, skip, w_in, cfg.norm_epsilon, f"{p}.input_layernorm")
    qkv = emit_linear(g, target, h, qkv_lin, f"{p}.attention.qkv")
    if contig is not None:
        attn, written = emit_contiguous_attention(g, d, pool, qkv, contig, out_names)
    else:
        # Heads first: q, k, v stay [T, heads, hd] (no per-part reshapes), one RoPE for all three.
        qkv3 = g.op("Reshape", [qkv, g.const([0, d.num_heads + kv_heads, d.head_dim])], name=f"l{i}_qkv_heads")
        qkv3 = emit_rope(g, qkv3, tables.cos, tables.sin, d.head_dim, f"l{i}_rope")
        q3, k3, v3 = g.op("Split", [qkv3, g.const([d.num_heads, d.num_kv_heads, d.num_kv_heads])], n_out=3,
                          name=f"l{i}_qkv_split", axis=1)
        attn, written = emit_paged_attention(g, target, d, pool, q3, k3, v3, tables.write_index, buckets, out_index,
                                             out_names, rows_in_order)
    attn = emit_linear(g, target, attn, lw.dense, f"{p}.attention.dense")
    w_post, gate_up = _fold_pre_scale(target, lw.post_layernorm, lw.gate_up)
    h, x = emit_add_rmsnorm(g, target, x, attn, w_post, cfg.norm_epsilon, f"{p}.post_layernorm")
    return x, emit_gated_mlp(g, target, h, gate_up, lw.proj, f"{p}.mlp"), written


def _fold_pre_scale(target: Target, norm_weight: np.ndarray, lin: QLinear) -> tuple[np.ndarray, QLinear]:
    """A linear's pre_quant_scale (AWQ, SmoothQuant) folded into the RMSNorm weight before it (its
    only consumer): RMSNorm(x) * w * s == RMSNorm(x) * (w * s), one Mul per norm fewer; float
    rounding differs from the two products by an ulp. ONNX Runtime only: TensorRT's graph keeps
    the checkpoint's factors as they are."""
    if target.is_trt or lin.pre_quant_scale is None:
        return norm_weight, lin
    return norm_weight * np32(lin.pre_quant_scale), replace(lin, pre_quant_scale=None)


def _choose_lm_head(tensors, reader: WeightReader, emb_t,
                    lm_head: str) -> tuple[QLinear, bool, str, Int8Blocks | None]:
    """(lm_head linear, tied, lm_kind, the tied table's int8 blocks if found), decided before the
    embedding is emitted because an integer lm_head lets the token lookup read int8 blocks too. A
    float lm_head that is exactly int8 blocks is stored as such when asked."""
    lm_t = tensors.get("lm_head.weight")
    tied = lm_t is None or (lm_t.shape == emb_t.shape and lm_t.dtype == emb_t.dtype and torch.equal(lm_t, emb_t))
    lm_lin = QLinear("lm_head", "float", emb_t) if tied else reader.linear("lm_head")
    lm_kind = "float" if lm_lin.kind == "float" else "quantized"
    packed = None
    if lm_head != "float" and lm_lin.kind == "float":
        packed = exact_int8_blocks(np32(lm_lin.weight))
        if packed is None and lm_head == "int8":
            raise UnsupportedError("--lm-head int8: this lm_head is not exactly int8 x per-32-block scales "
                                   "(only weights dequantized from such a format are); use --lm-head float")
        if packed is not None:
            lm_lin, lm_kind = packed.to_qlinear("lm_head", bias=lm_lin.bias), "int8-blocks"
    return lm_lin, tied, lm_kind, (packed if tied else None)


def _emit_lm_head(g: GraphBuilder, target: Target, lm_lin: QLinear, tied: bool, lm_kind: str, emb: str | None,
                  last: str) -> str:
    """Logits: a tied float lm_head reads the embedding table itself (Gemm with transB, no second copy)."""
    if tied and lm_kind == "float":  # share the embedding table: Gemm with transB reads it as [V, h]
        return g.op("Gemm", [last, emb], name="lm_head", transB=1)
    return emit_linear(g, target, last, lm_lin, "lm_head")


def _graph_spec(model: onnx.ModelProto, cfg: CheckpointConfig, target: Target, d: AttentionDims, kvq: str | None,
                pool: KVPool, buckets, num_buckets: int, block_size: int, max_positions: int,
                weight_bytes: int, read_bytes: int, lm_kind: str, variants: list, contiguous: bool) -> GraphSpec:
    """What the runtime must know about the graph it loads (KV layout, buckets, dtypes) and what
    the benchmarks report (bytes read per decode step, op counts)."""
    counts: dict[str, int] = {}
    nodes = list(walk_nodes(model.graph))  # every body's nodes (see `step_variants`)
    for n in nodes:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    kv_name = kvq if (kvq and target.kv_storage == "native") else DTYPE_OF[target.dtype]
    return GraphSpec(cfg.num_hidden_layers, num_buckets, block_size, d.num_kv_heads, d.head_dim, kv_name,
                     int(pool.pool_type), DTYPE_OF[target.dtype], max_positions,
                     [bk.impl for bk in buckets], bucket_kinds(num_buckets), target.backend,
                     weight_bytes, read_bytes, lm_kind, True, [bk.guarded for bk in buckets],
                     pool.layout, variants, contiguous, len(nodes), counts)
