"""Quantized engines: graphs the backends accelerate, numerics equal to the exact simulation.

Tolerances (engine logits vs `llmc.quantize.simulate.build_simulated_model`, float32):
- fp8, fp8_pc_pt, w4a8_awq, int4_awq, int4_wo, int4_asym, int8_wo, FP8/INT8 KV cache: max |diff| < 1e-4 with ONNX
  Runtime's exact 4/8-bit MatMul (int4_accuracy_level=0). The default fast level (4: the fused
  MatMulNBits kernel rounds activations to int8 per block) stays within 5% of the logit range.
- int8_sq (per-token dynamic int8 activations): the simulation itself is discontinuous (a 1e-6
  relative input change flips an int8 rounding and moves logits by ~4e-3, measured), so: most
  logit rows within 1e-4 and every row within 2% of the logit range.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from llmc.build import BuildOptions, build_engine
from llmc.engine import load_engine
from test_engine import MIXED_PLAN, mixed_seqs, run_schedule

# (qformat, kv_cache_dtype)
CASES = [("fp8", None), ("fp8_pc_pt", None), ("int8_sq", None), ("int4_awq", None), ("w4a8_awq", None), ("int8_wo", None),
         ("int4_wo", None), ("int4_asym", None), ("fp8", "fp8"), ("int8_sq", "int8"), ("int4_awq", "int8")]
IDS = [f"{q}-kv{kv}" if kv else q for q, kv in CASES]


@pytest.fixture(scope="module")
def quantized(tiny_checkpoints, tmp_path_factory):
    from llmc.quantize import quantize_checkpoint

    root = tmp_path_factory.mktemp("quant")
    out = {}
    for (q, kv), name in zip(CASES, IDS):
        out[name] = quantize_checkpoint(tiny_checkpoints["llama"], root / name, q, kv_cache_dtype=kv,
                                        calib_size=4, calib_seq_len=64, batch_size=2, progress=False,
                                        group_size=64 if "4" in q else None).out
    return out


@pytest.fixture(scope="module")
def engines(quantized, tmp_path_factory):
    root = tmp_path_factory.mktemp("qengines")
    return {name: build_engine(ck, root / name, BuildOptions(tokens_per_block=4, max_batch_size=4,
                                                             max_seq_len=128)).out
            for name, ck in quantized.items()}


def _simulate(ckpt, seqs):
    from llmc.quantize import build_simulated_model

    sim = build_simulated_model(ckpt)
    with torch.no_grad():
        return [sim(torch.tensor([s]))[0].numpy() for s in seqs]


def _row_errors(ref, got):
    return np.array([float(np.abs(ref[i][p] - row).max()) for i in range(len(ref)) for p, row in got[i].items()])


@pytest.mark.parametrize("name", IDS)
def test_quantized_engine_matches_simulation(name, quantized, engines):
    engine = load_engine(engines[name], int4_accuracy_level=0)
    seqs = mixed_seqs(engine.config.vocab_size)
    ref = _simulate(quantized[name], seqs)
    errs = _row_errors(ref, run_schedule(engine, seqs, MIXED_PLAN, seed=3))
    scale = max(float(np.abs(r).max()) for r in ref)
    if name.startswith("int8_sq"):
        assert np.mean(errs < 1e-4) > 0.5 and errs.max() < 0.02 * scale, (errs.max(), np.mean(errs < 1e-4))
    else:
        assert errs.max() < 1e-4


@pytest.mark.parametrize("name", IDS)
def test_lone_sequence_decode_matches_simulation(name, quantized, engines):
    """A lone sequence on blocks 0, 1, ... decodes through the contiguous body (GroupQueryAttention;
    fp8 KV: the one-bucket body), whose activations are [1, 1, hidden] where every linear takes any
    rank (`any_rank`) and [1, hidden] with a reshape around attention where one does not (int8_sq's
    per-row int8 GEMM, int4_asym's zero-point Gemm): both match the simulation as the paged body does."""
    from llmc.build.model_graph import contiguous_body

    engine = load_engine(engines[name], int4_accuracy_level=0)
    seq = mixed_seqs(engine.config.vocab_size)[2]
    ref = _simulate(quantized[name], [seq])
    errs = _row_errors(ref, run_schedule(engine, [seq], [{0: 6}] + [{0: 1}] * (len(seq) - 6), in_order=True))
    scale = max(float(np.abs(r).max()) for r in ref)
    if name.startswith("int8_sq"):
        assert np.mean(errs < 1e-4) > 0.5 and errs.max() < 0.02 * scale, (errs.max(), np.mean(errs < 1e-4))
    else:
        assert errs.max() < 1e-4
    body = contiguous_body(onnx.load(str(engines[name] / "model.onnx"), load_external_data=False))
    if body is not None:
        reshapes = sum(n.name.endswith(("_qkv_bsd_node", "_gqa_rows_node")) for n in body.node)
        two_d = name.startswith(("int8_sq", "int4_asym"))
        assert reshapes == (2 * engine.config.num_layers if two_d else 0), reshapes


@pytest.mark.parametrize("name", ["int4_awq", "int8_wo", "int4_asym"])
def test_fast_int_kernels_stay_close(name, quantized, engines):
    engine = load_engine(engines[name])  # default accuracy level: int8 activations inside MatMulNBits
    seqs = mixed_seqs(engine.config.vocab_size)
    ref = _simulate(quantized[name], seqs)
    errs = _row_errors(ref, run_schedule(engine, seqs, MIXED_PLAN, seed=3))
    assert errs.max() < 0.05 * max(float(np.abs(r).max()) for r in ref)


def _graph(engine_dir):
    return onnx.load(str(engine_dir / "model.onnx"), load_external_data=False)


def _init_types(model):
    return {i.name: i.data_type for i in model.graph.initializer}


def _nbits_session(nodes, inits, k, level=None):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    so = ort.SessionOptions()
    if level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_int4_linears_are_the_matmulnbits_ort_fuses_from_blocked_dq(engines):
    """ORT: every int4 linear is one com.microsoft MatMulNBits (4-bit, block 64, no zero point),
    emitted directly (ORT's DQ + MatMul fusion cannot read outer-scope weights inside the step
    variants' If bodies). Reference: ORT's own fusion of the opset-21 blocked DequantizeLinear +
    MatMul that TensorRT targets keep, fed the same int4 values and scales: identical outputs at
    accuracy levels 0 and 4."""
    from onnx import TensorProto, helper, numpy_helper

    from llmc.build.model_graph import step_bodies
    from llmc.engine.onnx_graph import SESSION_LEVEL_DOC

    model = onnx.load(str(engines["int4_awq"] / "model.onnx"))  # with weights
    inits = {t.name: t for t in model.graph.initializer}
    layers = json.loads((engines["int4_awq"] / "config.json").read_text())["num_hidden_layers"]
    for body in step_bodies(model):
        nb = [n for n in body.node if n.op_type == "MatMulNBits"]
        assert len(nb) == 4 * layers  # qkv, dense, gate_up, proj
        assert not any(n.op_type == "DequantizeLinear" for n in body.node)
        # pre-quant scales: dense's and proj's Mul; qkv's and gate_up's are folded into the norms
        assert sum(1 for n in body.node if "_smooth" in n.name) == 2 * layers
        assert not any(n.name.endswith(("qkv_smooth", "gate_up_smooth")) for n in body.node)
    rng = np.random.default_rng(0)
    for n in nb:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["bits"] == 4 and attrs["block_size"] == 64 and len(n.input) == 3 and n.doc_string == SESSION_LEVEL_DOC
        k, m, g = attrs["K"], attrs["N"], attrs["block_size"]
        packed = numpy_helper.to_array(inits[n.input[1]])                       # [N, K/g, g/2]
        scales = numpy_helper.to_array(inits[n.input[2]]).reshape(m, k // g)
        q = np.stack([packed & 0xF, packed >> 4], -1).reshape(m, k).astype(np.int8) - 8  # [N, K] in [-8, 7]
        w = helper.make_tensor("w", TensorProto.INT4, [k, m], q.T.reshape(-1).tolist())
        s = numpy_helper.from_array(np.ascontiguousarray(scales.T), "s")
        dq = [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], axis=0, block_size=g),
              helper.make_node("MatMul", ["x", "wf"], ["y"])]
        ours = helper.make_node("MatMulNBits", ["x", "b", "sc"], ["y"], domain="com.microsoft",
                                **{**attrs, "accuracy_level": 0})
        ours_inits = [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales.reshape(-1), "sc")]
        x = rng.standard_normal((3, k)).astype(np.float32)
        for level in (0, 4):
            ours.attribute[[a.name for a in ours.attribute].index("accuracy_level")].i = level
            ref = _nbits_session(dq, [w, s], k, level).run(None, {"x": x})[0]
            got = _nbits_session([ours], ours_inits, k).run(None, {"x": x})[0]
            np.testing.assert_array_equal(got, ref)


def test_int8_sq_uses_integer_gemm_on_ort(engines):
    model = _graph(engines["int8_sq"])
    layers = json.loads((engines["int8_sq"] / "config.json").read_text())["num_hidden_layers"]
    from llmc.build.model_graph import step_bodies

    for body in step_bodies(model):
        assert sum(1 for n in body.node if n.op_type == "MatMulInteger") == 4 * layers


def test_int8_kv_engines_decode_a_lone_sequence_through_group_query_attention(quantized, engines, tmp_path):
    """An int8 KV pool is a cache ORT's GroupQueryAttention shares (PER_TENSOR, the layer's one
    scale): a lone sequence on blocks 0, 1, ... decodes through it, new K/V quantized as the paged
    body's QuantizeLinear does, and every step still matches the exact simulation; on scattered
    blocks the same sequence takes the paged body."""
    from test_engine import _ops_run, _profiled_engine

    from llmc.build.model_graph import contiguous_body

    name = "int4_awq-kvint8"
    model = onnx.load(str(engines[name] / "model.onnx"), load_external_data=False)
    gqa = [n for n in contiguous_body(model).node if n.op_type == "GroupQueryAttention"]
    assert gqa and all(n.input[3].startswith("kv_pool.") for n in gqa)
    assert all({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["k_quant_type"] == b"PER_TENSOR"
               for n in gqa)
    assert json.loads((engines[name] / "config.json").read_text())["engine"]["graph"]["contiguous_decode"] is True
    vocab = load_engine(engines[name]).config.vocab_size
    seq = np.random.default_rng(7).integers(0, vocab, 14).tolist()
    ref = _simulate(quantized[name], [seq])
    plan = [{0: 5}] + [{0: 1}] * 9
    for in_order, ran in ((True, True), (False, False)):
        engine = _profiled_engine(engines[name], tmp_path, int4_accuracy_level=0)  # exact int4 matmuls
        got = run_schedule(engine, [seq], plan, seed=3, in_order=in_order)
        assert _row_errors(ref, got).max() < 1e-4
        assert _ops_run(engine).count("GroupQueryAttention") == (9 * engine.config.num_layers if ran else 0)


def test_quantized_kv_engines_keep_the_one_bucket_body_when_rows_are_in_order(engines, tmp_path):
    """An fp8 KV cache (uint8 bits in the pool) is not a cache GroupQueryAttention can share, so
    those engines keep the one-bucket step variant: it skips the row Gathers, so the graph checks
    (not assumes) that bucket 0 holds every token in packed order. The same steps fed with bucket 0's rows reversed
    (valid, but not in order) take the general body and give the same logits; in-order decode-only
    steps take the one-bucket body (ORT profile: no node of bucket 1 or 2 runs)."""
    from test_engine import _profiled_engine, _reverse_bucket0_rows

    from llmc.build.model_graph import contiguous_body, step_bodies

    out = engines["fp8-kvfp8"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert contiguous_body(model) is None and len(step_bodies(model)) == 2
    vocab = load_engine(out).config.vocab_size
    # equal contexts: the decode steps put all three rows in bucket 0 (no split by context)
    plan = [{0: 8, 1: 8, 2: 8}, {0: 1, 1: 1, 2: 1}, {0: 1, 1: 1, 2: 1}]
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, vocab, 10).tolist() for _ in range(3)]
    in_order = run_schedule(load_engine(out), seqs, plan, seed=2)
    engine = load_engine(out)
    run = engine._session.run
    engine._session.run = lambda feeds, n, run=run, **kw: run(_reverse_bucket0_rows(feeds), n, **kw)
    reversed_rows = run_schedule(engine, seqs, plan, seed=2)
    for a, b in zip(in_order, reversed_rows):
        for p in a:
            np.testing.assert_allclose(a[p], b[p], atol=1e-5)
    engine = _profiled_engine(out, tmp_path)
    run_schedule(engine, seqs, plan[:2], seed=2)
    events = json.loads(Path(engine._session.sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    last = runs[-1]["ts"], runs[-1]["ts"] + runs[-1]["dur"]
    names = [e["name"] for e in events if e.get("cat") == "Node" and last[0] <= e["ts"] <= last[1]
             and not e["name"].startswith("variant_")]  # the per-step condition reads every bucket's shape
    assert any("_b0_" in n for n in names) and not any("_b1_" in n or "_b2_" in n for n in names)


def test_quantized_kv_pool_is_stored_quantized(engines):
    for name, dtype in (("fp8-kvfp8", np.uint8), ("int8_sq-kvint8", np.int8)):
        engine = load_engine(engines[name])
        pool = engine.allocate_kv_pool()
        assert pool.buffer.dtype == dtype and pool.buffer.itemsize == 1
        assert engine.kv_bytes_per_block == 2 * engine.config.num_layers * engine.block_size * \
            engine.num_kv_heads * engine.head_dim


def test_fp8_bit_encoding_is_exact():
    """Every e4m3fn value (and values between them) encodes to ml_dtypes' bit pattern."""
    import ml_dtypes
    import onnxruntime as ort
    from onnx import TensorProto

    from llmc.plugins.graph import GraphBuilder
    from llmc.plugins.attention import emit_fp8_bits, emit_fp8_decode
    from llmc.plugins.base import Target

    g = GraphBuilder()
    x = g.input("x", TensorProto.FLOAT, ["n"])
    s = g.const(np.float32(0.5), TensorProto.FLOAT)
    bits = emit_fp8_bits(g, Target(), x, s, "enc")
    g.op("Identity", [bits], outputs=["bits"])
    g.output("bits", TensorProto.UINT8, ["n"])
    g.op("Identity", [emit_fp8_decode(g, Target(), bits, s, "dec")], outputs=["back"])
    g.output("back", TensorProto.FLOAT, ["n"])
    sess = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    grid = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    grid = grid[np.isfinite(grid)]
    rng = np.random.default_rng(0)
    vals = np.concatenate([grid, grid * 1.03, rng.normal(0, 50, 4000), [1000.0, -1000.0, 1e-9]]).astype(np.float32)
    got_bits, back = sess.run(None, {"x": vals * 0.5})
    want = np.clip(vals, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    want_bits = want.view(np.uint8)
    assert np.array_equal(got_bits, np.where(want_bits == 0x80, 0, want_bits))  # -0 is stored as +0
    np.testing.assert_array_equal(back, want.astype(np.float32) * 0.5)


@pytest.mark.parametrize("name", [i for i in IDS if i != "fp8_pc_pt"])
def test_tensorrt_graph_is_compatible(name, quantized, tmp_path):
    """tensorrt-target graphs pass the TensorRT table for every qformat (checked on CPU)."""
    from llmc.build.trt_compat import check_graph

    out = build_engine(quantized[name], tmp_path / "trt", BuildOptions(backend="tensorrt", graph_only=True,
                                                                       tokens_per_block=4, max_seq_len=128)).out
    model = _graph(out)
    assert check_graph(model, "10.14") == []
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    ops = {n.op_type for n in model.graph.node}
    assert "RMSNormalization" not in ops and "MatMulInteger" not in ops and "Attention" in ops
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["engine"]["graph_only"] and cfg["engine"]["compute_dtype"] == "float16"
    types = _init_types(model)
    if name.startswith("fp8") or name.startswith("w4a8"):
        assert any(t == onnx.TensorProto.FLOAT8E4M3FN for t in types.values())
        assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    if name.startswith("int4"):
        assert any(t == onnx.TensorProto.INT4 for t in types.values())


@pytest.mark.parametrize("name", ["int4_awq", "int8_sq-kvint8", "int8_wo"])
def test_tensorrt_graph_numerics_on_cpu(name, quantized, tmp_path):
    """The TensorRT-target graph (fp32 so ORT CPU runs it) computes the same as the simulation."""
    out = build_engine(quantized[name], tmp_path / "trt32",
                       BuildOptions(backend="tensorrt", graph_only=True, dtype="float32", tokens_per_block=4,
                                    max_batch_size=4, max_seq_len=128)).out
    cfg = json.loads((out / "config.json").read_text())
    cfg["engine"]["backend"] = "onnxruntime"  # run the very same graph on ORT CPU
    (out / "config.json").write_text(json.dumps(cfg))
    engine = load_engine(out, int4_accuracy_level=0)
    seqs = mixed_seqs(engine.config.vocab_size)
    ref = _simulate(quantized[name], seqs)
    errs = _row_errors(ref, run_schedule(engine, seqs, MIXED_PLAN, seed=5))
    scale = max(float(np.abs(r).max()) for r in ref)
    if name.startswith("int8_sq"):
        assert np.mean(errs < 1e-4) > 0.5 and errs.max() < 0.02 * scale
    else:
        assert errs.max() < 1e-4


def test_fp8_per_token_is_refused_on_tensorrt(quantized, tmp_path):
    from llmc.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="per-token"):
        build_engine(quantized["fp8_pc_pt"], tmp_path / "trt", BuildOptions(backend="tensorrt", graph_only=True,
                                                                             max_seq_len=128))


def test_inspect_names_the_engine_by_its_qformat(engines):
    """`llmc inspect ENGINE` shows the --qformat name users typed, algo beside it (not the kernel kind)."""
    from llmc.inspect import describe

    for name, engine_dir in engines.items():
        d = describe(engine_dir)
        assert d["quantization"].startswith(f"{name.split('-kv')[0]} ("), d["quantization"]
        assert "qformat" not in d and "quant_algo" not in d


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_residual_add_and_norm_match_numpy(backend):
    """emit_add_rmsnorm: ORT's one SkipSimplifiedLayerNormalization kernel and TensorRT's Add +
    norm pattern (run here on ORT, in float32) both give x + skip and RMSNorm(x + skip) * w to
    float32 rounding, against a float64 numpy reference; and with a linear's pre-quant scale folded
    into the norm weight (`_fold_pre_scale`, ONNX Runtime only) the norm's output is the scaled
    input that linear used to compute."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto

    from llmc.build.model_graph import _fold_pre_scale
    from llmc.plugins.base import Target
    from llmc.plugins.graph import GraphBuilder
    from llmc.plugins.rmsnorm import emit_add_rmsnorm
    from llmc.quantize.layout import QLinear

    t = Target.for_backend(backend, TensorProto.FLOAT)
    rng = np.random.default_rng(0)
    w = rng.normal(1, 0.2, 256).astype(np.float32)
    s = rng.uniform(0.2, 3.0, 256).astype(np.float32)
    lin = QLinear("l", "float", torch.zeros(8, 256), pre_quant_scale=torch.from_numpy(s))
    folded_w, folded_lin = _fold_pre_scale(t, w, lin)
    if t.is_trt:  # TensorRT keeps the Mul: nothing folded
        assert folded_w is w and folded_lin is lin
        folded_w = w * s
    else:
        assert folded_lin.pre_quant_scale is None
    g = GraphBuilder()
    x = g.input("x", TensorProto.FLOAT, ["n", 256])
    skip = g.input("skip", TensorProto.FLOAT, ["n", 256])
    for out, (normed, total) in (("y", emit_add_rmsnorm(g, t, x, skip, w, 1e-5, "a")),
                                 ("y_folded", emit_add_rmsnorm(g, t, x, skip, folded_w, 1e-5, "b"))):
        g.op("Identity", [normed], outputs=[out])
        g.output(out, TensorProto.FLOAT, ["n", 256])
    g.op("Identity", [total], outputs=["sum"])
    g.output("sum", TensorProto.FLOAT, ["n", 256])
    sess = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    xv, sv = (rng.normal(0, 3, (7, 256)).astype(np.float32) for _ in range(2))
    y, y_folded, total = sess.run(["y", "y_folded", "sum"], {"x": xv, "skip": sv})
    ref_sum = xv.astype(np.float64) + sv
    ref = ref_sum / np.sqrt((ref_sum ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_array_equal(total, xv + sv)
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(y_folded, ref * s, rtol=3e-6, atol=1e-6)
    assert (t.is_trt) == ("SkipSimplifiedLayerNormalization" not in {n.op_type for n in g.nodes})
