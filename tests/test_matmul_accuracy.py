"""`llmc build --matmul-accuracy fp32`: weight-only matmuls that keep the checkpoint's numbers.

ONNX Runtime's MatMulNBits at accuracy level 4 rounds activations to int8 per block, which is
enough to flip SmolLM2's greedy answers (tests/test_pipeline.py runs the default recipe). The
fp32 build computes 4-bit weights in float (level 1) and sends 8-bit weights, which have no fast
float kernel, through the int8 kernel on error-compensated activations. The reference here is
numpy in float64 on the same int8 values, not llmc's code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto

from llmc.checkpoint.quant_algos import QUANT_ALGOS
from llmc.engine.onnx_graph import SESSION_LEVEL_DOC
from llmc.plugins.base import Target
from llmc.plugins.graph import GraphBuilder
from llmc.plugins.linear import emit_linear
from llmc.quantize.layout import QLinear


def _session(lin: QLinear, target: Target):
    """The linear alone, in a session configured as an engine of that accuracy loads it."""
    import onnxruntime as ort

    from llmc.engine.backends.onnxruntime import ACCURACY_LEVELS, session_options

    g = GraphBuilder()
    x = g.input("x", TensorProto.FLOAT, ["t", lin.in_features])
    g.op("Identity", [emit_linear(g, target, x, lin, "lin")], outputs=["y"])
    g.output("y", TensorProto.FLOAT, ["t", lin.out_features])
    so = session_options(1, ACCURACY_LEVELS[target.matmul_accuracy])
    return ort.InferenceSession(g.model().SerializeToString(), so, providers=["CPUExecutionProvider"])


def _int8_linear(out: int, k: int, group: int | None, rng) -> tuple[QLinear, np.ndarray]:
    """An int8 weight-only linear (block scales, or W8A16's per-channel scale) and its float64 value."""
    q = rng.integers(-127, 128, (out, k)).astype(np.int8)
    if group is None:
        s = (rng.random(out) * 0.01 + 1e-3).astype(np.float32)
        lin = QLinear("lin", QUANT_ALGOS["W8A16"].kind, torch.from_numpy(q), torch.from_numpy(s))
        return lin, q.astype(np.float64) * s[:, None].astype(np.float64)
    s = (rng.random((out, k // group)) * 0.01 + 1e-3).astype(np.float32)
    lin = QLinear("lin", QUANT_ALGOS["W8A16_GPTQ"].kind, torch.from_numpy(q), torch.from_numpy(s), group_size=group)
    w = q.astype(np.float64).reshape(out, -1, group) * s[:, :, None]
    return lin, w.reshape(out, k)


@pytest.mark.parametrize("group", [32, 64, None])
def test_compensated_int8_matmul_is_float_accurate(group):
    rng = np.random.default_rng(group or 0)
    lin, w = _int8_linear(384, 256, group, rng)
    # activations with outliers along the input (what RMSNorm'd hidden states look like)
    x = (rng.standard_normal((5, 256)) * np.exp(rng.standard_normal(256))).astype(np.float32)
    ref = x.astype(np.float64) @ w.T
    scale = np.abs(ref).max()
    errs = {}
    for acc in ("fp32", "int8"):
        sess = _session(lin, Target(matmul_accuracy=acc))
        errs[acc] = float(np.abs(sess.run(None, {"x": x})[0] - ref).max() / scale)
    # float32 rounding (numpy's own float32 matmul of the same values is ~3e-7 off float64)
    assert errs["fp32"] < 2e-6, errs
    assert errs["int8"] > 1e-3, errs  # the kernel's own int8 rounding, which fp32 compensates away


def test_fp32_accuracy_emits_one_explicit_level4_node_per_int8_linear():
    """Each int8 linear is one 8-bit MatMulNBits at level 4: fp32 accuracy on 3 compensated rows (a
    fixed level), int8 accuracy on the activations as they are (its level follows the engine)."""
    rng = np.random.default_rng(1)
    lin, _ = _int8_linear(128, 128, 32, rng)
    for acc, compensated in (("fp32", True), ("int8", False)):
        g = GraphBuilder()
        x = g.input("x", TensorProto.FLOAT, ["t", 128])
        emit_linear(g, Target(matmul_accuracy=acc), x, lin, "lin")
        nbits = [n for n in g.nodes if n.op_type == "MatMulNBits"]
        assert len(nbits) == 1
        attrs = {a.name: a.i for a in nbits[0].attribute}
        assert attrs["accuracy_level"] == 4 and attrs["bits"] == 8 and attrs["block_size"] == 32
        assert (nbits[0].doc_string == SESSION_LEVEL_DOC) != compensated
        assert any(n.op_type == "Round" for n in g.nodes) == compensated
    # TensorRT keeps standard ops whatever the option (its GEMMs compute in float)
    g = GraphBuilder()
    x = g.input("x", TensorProto.FLOAT, ["t", 128])
    emit_linear(g, Target.for_backend("tensorrt", matmul_accuracy="fp32"), x, lin, "lin")
    assert all(n.domain == "" for n in g.nodes)


def test_per_token_int8_linear_is_numpys_integer_arithmetic_bit_for_bit():
    """SmoothQuant's per-token dynamic int8 linear on ORT (one per-row QuantizeLinear to uint8 with
    zero point 128, MatMulInteger, then * s_t * s_w) against numpy doing the same arithmetic:
    q = clip(rint(x / s_t), -128, 127) with s_t = max|x_t| / 127 (1 for an all-zero row), the
    int32 product exact, float32 products in that order. Rows include an all-zero one, outliers
    and values on exact .5 ties of the grid (round half to even)."""
    rng = np.random.default_rng(3)
    out, k = 96, 128
    q_w = rng.integers(-127, 128, (out, k)).astype(np.int8)
    s_w = (rng.random(out) * 0.01 + 1e-3).astype(np.float32)
    lin = QLinear("lin", QUANT_ALGOS["W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"].kind, torch.from_numpy(q_w),
                  torch.from_numpy(s_w), act_dtype="int8", act_granularity="token")
    g = GraphBuilder()
    emit_linear(g, Target(), g.input("x", TensorProto.FLOAT, ["t", k]), lin, "lin")
    ops = [n.op_type for n in g.nodes]
    assert ops.count("QuantizeLinear") == 1 and ops.count("MatMulInteger") == 1 and "Round" not in ops
    sess = _session(lin, Target())
    for trial in range(20):
        x = (rng.standard_normal((7, k)) * np.exp(rng.standard_normal(k))).astype(np.float32)
        x[0] = 0.0
        amax = np.abs(x).max(1)
        s = np.where(amax == 0, np.float32(1.0), amax / np.float32(127.0)).astype(np.float32)
        x[1, :16] = ((rng.integers(-120, 120, 16) + np.float32(0.5)) * s[1]).astype(np.float32)  # ties
        amax = np.abs(x).max(1)
        s = np.where(amax == 0, np.float32(1.0), amax / np.float32(127.0)).astype(np.float32)
        q = np.clip(np.rint(x / s[:, None]), -128, 127).astype(np.int32)
        ref = (q @ q_w.T.astype(np.int32)).astype(np.float32) * s[:, None] * s_w[None, :]
        np.testing.assert_array_equal(sess.run(None, {"x": x})[0], ref)
