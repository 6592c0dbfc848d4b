"""The quant_algo table is the single source: every module reads its algos, kinds and KV dtypes
from `llmc.checkpoint.quant_algos`, and every row is readable, validated and buildable.

Each algo's linear is written here from the table's facts alone (storage, scale tensor name and
granularity, static activation scale, pre-quant scale, second weight scale, zero points), then read
by the layout reader, checked by the validator, lowered by the graph emitter and run on ONNX
Runtime; the result is compared with the float64 reference computed from the stored numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto

from llmc.checkpoint.quant_algos import BY_KIND, KV_CACHE_ALGOS, QUANT_ALGOS, weight_format
from llmc.quantize.formats import KV_CACHE_DTYPES, QFORMATS
from llmc.quantize.layout import (expand_groups, fp8_round, pack_int4_row_pairs, quantize_fp8, quantize_int,
                                  read_quantized_linear)

P = "transformer.layers.0.mlp.proj"
OUT, IN, GROUP = 8, 64, 16


def stored_linear(name: str, zeros: bool | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of one linear of quant_algo `name`, built from its table row (zeros: whether an
    algo that may carry zero points does; default: it does)."""
    a = QUANT_ALGOS[name]
    zeros = a.zero_point if zeros is None else zeros
    g = torch.Generator().manual_seed(len(name))
    w = torch.randn(OUT, IN, generator=g)
    shape = {"tensor": (1,), "channel": (OUT,), "group": (OUT, IN // GROUP)}[a.weight_granularity]
    s = (torch.rand(shape, generator=g) + 0.5) * 0.02
    full = expand_groups(s, IN) if s.dim() == 2 else s.reshape(-1, 1) if s.numel() > 1 else s
    t = {f"{P}.{a.weight_scale}": s}
    if a.weight == "fp8":
        t[f"{P}.weight"] = quantize_fp8(w, full)
    elif a.weight == "int8":
        t[f"{P}.weight"] = quantize_int(w, full, 8)
    else:
        t[f"{P}.weight"] = pack_int4_row_pairs(quantize_int(w, full, 4))
    if a.static_activations:
        t[f"{P}.activation_scaling_factor"] = torch.tensor([0.05])
    if a.pre_quant_scale:
        t[f"{P}.prequant_scaling_factor"] = torch.rand(IN, generator=g) + 0.5
    if a.weight_scale_2:
        t[f"{P}.weights_scaling_factor_2"] = torch.tensor([0.01])
    if zeros:
        t[f"{P}.zero"] = torch.randn(shape, generator=g) * 0.01
    return t, {"quant_algo": name, "group_size": GROUP, "has_zero_point": zeros}


def reference(t: dict[str, torch.Tensor], a, x: np.ndarray) -> np.ndarray:
    """y = fakequant(x * pqs) @ W^T in float64, from the stored numbers (not llmc's reader)."""
    x = x.astype(np.float64)
    if a.pre_quant_scale:
        x = x * t[f"{P}.prequant_scaling_factor"].double().numpy()
    bound = {"int8": 127.0, "fp8": 448.0}.get(a.act)
    if a.act is not None:
        s = (np.abs(x).max(-1, keepdims=True) / bound if a.act_granularity == "token"
             else float(t[f"{P}.activation_scaling_factor"]))
        x = (np.clip(np.round(x / s), -128, 127) * s if a.act == "int8"
             else fp8_round(torch.from_numpy(x / s).float()).double().numpy() * s)
    stored = t[f"{P}.weight"]
    if a.packed:
        u = stored.view(torch.uint8).to(torch.int16)
        lo, hi = u & 0xF, u >> 4
        q = torch.stack([lo - 16 * (lo >= 8), hi - 16 * (hi >= 8)], 1).reshape(OUT, IN).double()
    else:
        q = stored.double()
    s = t[f"{P}.{a.weight_scale}"].double()
    full = s.repeat_interleave(IN // s.shape[1], 1) if s.dim() == 2 else s.reshape(-1, 1)
    w = q * full
    if f"{P}.zero" in t:
        w = w + t[f"{P}.zero"].double().repeat_interleave(GROUP, 1)
    if a.weight_scale_2:  # TensorRT-LLM's W4A8: FP8 per group, then the per-tensor FP8 scale
        s2 = float(t[f"{P}.weights_scaling_factor_2"])
        w = fp8_round((w / s2).float()).double() * s2
    return x @ w.numpy().T


def run_linear(lin, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    from llmc.plugins.graph import GraphBuilder
    from llmc.plugins.base import Target
    from llmc.plugins.linear import emit_linear

    g = GraphBuilder()
    xi = g.input("x", TensorProto.FLOAT, ["n", IN])
    g.op("Identity", [emit_linear(g, Target.for_backend("onnxruntime"), xi, lin, "lin")], outputs=["y"])
    g.output("y", TensorProto.FLOAT, ["n", OUT])
    sess = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


# every row as written by default, plus algos that MAY carry zero points written without them
CASES = [(n, None) for n in QUANT_ALGOS] + [(n, False) for n, a in QUANT_ALGOS.items() if a.zero_point]


@pytest.mark.parametrize("name,zeros", CASES, ids=[f"{n}{'-no-zeros' if z is False else ''}" for n, z in CASES])
def test_every_algo_is_readable_validated_and_buildable(name, zeros):
    from llmc.checkpoint.validate import _check_linear
    from llmc.quantize.simulate import SimLinear

    a = QUANT_ALGOS[name]
    t, qcfg = stored_linear(name, zeros)
    _check_linear(P, (OUT, IN), t, name, GROUP, None, qcfg["has_zero_point"])  # the validator accepts it
    lin = read_quantized_linear(t, P, qcfg)                  # the layout reader reads it
    assert lin.kind == a.kind and weight_format(lin.kind) == a.weight
    assert (lin.act_dtype, lin.act_granularity) == (a.act, a.act_granularity)
    x = np.random.default_rng(0).standard_normal((5, IN)).astype(np.float32)
    want = reference(t, a, x)
    y = run_linear(lin, x)                                   # the emitter lowers it; ORT runs it
    sim = SimLinear(lin)(torch.from_numpy(x)).numpy()        # the simulation agrees
    scale = np.abs(want).max()
    np.testing.assert_allclose(sim, want, atol=1e-5 * scale)
    # weight-only INT8/INT4 run on ORT's MatMulNBits, which rounds activations to int8 blocks
    # (its accuracy level; measured <= 0.9% of max|y| here); everything else is float32-exact
    np.testing.assert_allclose(y, want, atol=(2e-2 if a.integer and a.act is None else 1e-5) * scale)


def test_formats_kinds_and_kv_derive_from_the_table():
    for f in QFORMATS.values():
        assert f.quant_algo in QUANT_ALGOS
        assert f.weight_dtype == f.algo.weight and f.act_dtype == f.algo.act
        assert not f.pre_quant_scale or f.algo.pre_quant_scale
    for a in QUANT_ALGOS.values():  # algos sharing a label agree on what the label stands for
        k = BY_KIND[a.kind]
        assert (a.weight, a.act, a.gemm, a.weight_scale_2) == (k.weight, k.act, k.gemm, k.weight_scale_2)
    assert KV_CACHE_DTYPES == {k.dtype: k.name for k in KV_CACHE_ALGOS.values()}


def test_builder_labels_and_cli_choices_come_from_the_tables():
    import click
    import typer

    from llmc.cli.app import app
    from llmc.build.tensorrt import precision_flags
    from llmc.build.builder import INTEGER_KINDS
    from llmc.quantize.gguf_keep import LINEAR_SOURCES
    from llmc.checkpoint.schema import LAYER_LINEARS

    assert INTEGER_KINDS == {a.kind for a in QUANT_ALGOS.values() if a.gemm in ("int8", "int4")}
    for a in QUANT_ALGOS.values():  # every label gets a TensorRT precision flag for its weight
        assert {"fp8": "FP8", "int8": "INT8", "int4": "INT4"}[a.weight] in precision_flags("float32", a.kind)
    assert set(LINEAR_SOURCES) == set(LAYER_LINEARS)
    cmd = typer.main.get_command(app)
    with click.Context(cmd) as ctx:
        params = {p.name: p for p in cmd.get_command(ctx, "quantize").params}
    assert params["qformat"].metavar == "<" + "|".join(QFORMATS) + ">"
    assert params["kv_cache_dtype"].metavar == "<" + "|".join(k.dtype for k in KV_CACHE_ALGOS.values()) + ">"
