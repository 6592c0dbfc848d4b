"""The stored quantized layout and its canonical view (no ModelOpt, no model: fast)."""

from __future__ import annotations

import pytest
import torch

from llmc.errors import LlmcError
from llmc.quantize.formats import QFORMATS, get_qformat, kv_cache_algo
from llmc.quantize.layout import (QLinear, expand_groups, fp8_round, pack_int4_row_pairs, quantize_fp8, quantize_int,
                                  read_quantized_linear, unpack_int4_row_pairs)

P = "transformer.layers.0.attention.qkv"


def test_int4_pack_roundtrip_and_byte_order():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (6, 10), generator=g, dtype=torch.int8)
    packed = pack_int4_row_pairs(q)
    assert packed.dtype == torch.int8 and packed.shape == (3, 10)
    assert torch.equal(unpack_int4_row_pairs(packed), q)
    # row 2j in the low nibble, row 2j+1 in the high nibble (ModelOpt / TensorRT-LLM order)
    two = torch.tensor([[-8, 7], [3, -1]], dtype=torch.int8)
    b = pack_int4_row_pairs(two).view(torch.uint8)
    assert b.tolist() == [[0x38, 0xF7]]
    with pytest.raises(ValueError):
        pack_int4_row_pairs(torch.zeros(3, 4, dtype=torch.int8))


def test_quantize_int_rounds_half_to_even_and_clamps():
    w = torch.tensor([0.5, 1.5, 2.5, -0.5, 200.0, -200.0])
    assert quantize_int(w, torch.tensor(1.0), 8).tolist() == [0, 2, 2, 0, 127, -128]
    assert quantize_int(w, torch.tensor(1.0), 4).tolist() == [0, 2, 2, 0, 7, -8]


def test_fp8_saturates():
    x = torch.tensor([1000.0, -1000.0, 0.3])
    assert fp8_round(x)[:2].tolist() == [448.0, -448.0]
    assert quantize_fp8(x, torch.tensor(2.0)).float()[:2].tolist() == [448.0, -448.0]


def _awq_tensors(out=8, inp=16, group=8, w4a8=False):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (out, inp), generator=g, dtype=torch.int8)
    s = torch.rand(out, inp // group, generator=g) + 0.1
    t = {f"{P}.weight": pack_int4_row_pairs(q), f"{P}.weights_scaling_factor": s,
         f"{P}.prequant_scaling_factor": torch.rand(inp, generator=g).half() + 0.5}
    if w4a8:  # as calibrated: the FP8 stage's amax is max|q * s| so nothing saturates
        t[f"{P}.weights_scaling_factor_2"] = ((q.float() * expand_groups(s, inp)).abs().max() / 448).reshape(1)
        t[f"{P}.activation_scaling_factor"] = torch.tensor([0.02])
    return q, s, t


def test_read_int4_awq():
    q, s, t = _awq_tensors()
    ql = read_quantized_linear(t, P, {"quant_algo": "W4A16_AWQ", "group_size": 8})
    assert ql.kind == "int4_awq" and ql.group_size == 8
    assert torch.equal(ql.weight, q) and ql.weight.dtype == torch.int8
    assert ql.pre_quant_scale.dtype == torch.float32 and ql.act_dtype is None
    assert torch.allclose(ql.dequantize(), q.float() * expand_groups(s, 16))
    assert torch.allclose(ql.effective_weight(), ql.dequantize() * ql.pre_quant_scale[None])
    with pytest.raises(LlmcError, match="group size"):
        read_quantized_linear(t, P, {"quant_algo": "W4A16_AWQ", "group_size": 4})


def test_read_w4a8_uses_tensorrt_llm_runtime_scales():
    q, s, t = _awq_tensors(w4a8=True)
    ql = read_quantized_linear(t, P, {"quant_algo": "W4A8_AWQ", "group_size": 8})
    assert ql.kind == "w4a8_awq" and ql.act_dtype == "fp8" and ql.act_granularity == "tensor"
    s2 = t[f"{P}.weights_scaling_factor_2"].reshape(())
    assert torch.allclose(ql.weight_scale, s / s2)  # weights_scaling_factor / weights_scaling_factor_2
    assert torch.equal(ql.weight_scale_2, s2)
    expected = fp8_round(q.float() * expand_groups(s / s2, 16)) * s2
    assert torch.equal(ql.dequantize(), expected)
    # within one INT4 step of q * s (the FP8 rounding of a value <= 448 costs < half a step)
    assert ((ql.dequantize() - q.float() * expand_groups(s, 16)).abs() <= expand_groups(s, 16)).all()


def test_read_fp8_and_int8():
    w = torch.randn(4, 8)
    s = w.abs().max() / 448
    t = {f"{P}.weight": quantize_fp8(w, s), f"{P}.weights_scaling_factor": s.reshape(1),
         f"{P}.activation_scaling_factor": torch.tensor([0.5])}
    ql = read_quantized_linear(t, P, {"quant_algo": "FP8"})
    assert ql.kind == "fp8" and ql.weight.dtype == torch.float8_e4m3fn and ql.weight_scale.shape == ()
    assert float(ql.input_scale) == 0.5
    assert torch.allclose(ql.dequantize(), w, rtol=2 ** -4, atol=float(s) * 2 ** -9)
    t8 = {f"{P}.weight": torch.ones(4, 8, dtype=torch.int8), f"{P}.weights_scaling_factor": torch.arange(1.0, 5.0),
          f"{P}.activation_scaling_factor": torch.tensor([0.1]), f"{P}.prequant_scaling_factor": torch.ones(8)}
    for algo, gran in (("W8A8_SQ_PER_CHANNEL", "tensor"), ("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "token")):
        ql = read_quantized_linear(t8, P, {"quant_algo": algo})
        assert (ql.kind, ql.act_dtype, ql.act_granularity) == ("int8_sq", "int8", gran)
        assert ql.dequantize()[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    wo = {f"{P}.weight": torch.ones(4, 8, dtype=torch.int8), f"{P}.weights_scaling_factor": torch.ones(4)}
    assert read_quantized_linear(wo, P, {"quant_algo": "W8A16"}).kind == "w8a16"


def test_float_and_bad_inputs():
    t = {f"{P}.weight": torch.randn(4, 8), f"{P}.bias": torch.randn(4)}
    ql = read_quantized_linear(t, P, {"quant_algo": "W8A16"})  # excluded layer stays float
    assert ql.kind == "float" and ql.bias is not None and torch.equal(ql.dequantize(), t[f"{P}.weight"])
    with pytest.raises(LlmcError, match="missing"):
        read_quantized_linear({f"{P}.weight": torch.ones(4, 8, dtype=torch.int8)}, P, {"quant_algo": "W8A16"})
    with pytest.raises(LlmcError, match="not supported"):
        read_quantized_linear({f"{P}.weight": torch.ones(4, 8, dtype=torch.int8)}, P, {"quant_algo": "NVFP4"})
    with pytest.raises(LlmcError, match="no tensor"):
        read_quantized_linear({}, P, {"quant_algo": "W8A16"})


def test_registry():
    assert list(QFORMATS) == ["fp8", "fp8_pc_pt", "int8_sq", "int4_awq", "w4a8_awq", "int8_wo", "int4_wo",
                              "int4_asym", "int8_sq_static", "int4_awq_asym"]
    with pytest.raises(LlmcError, match="fp8, fp8_pc_pt, int8_sq, int4_awq, w4a8_awq, int8_wo, int4_wo, int4_asym, int8_sq_static, int4_awq_asym"):
        get_qformat("int3")
    assert not get_qformat("int4_wo").needs_activations and get_qformat("int4_awq").needs_activations
    # dynamic per-token activations need no calibration data; per-tensor static ones do
    assert not get_qformat("fp8_pc_pt").needs_activations and get_qformat("fp8").needs_activations
    assert not get_qformat("int4_asym").uses_modelopt and get_qformat("int4_wo").uses_modelopt
    assert get_qformat("int4_awq_asym").uses_modelopt and get_qformat("int4_awq_asym").needs_activations


def test_zero_point_layout_reads_back():
    from llmc.quantize.layout import pack_int4_row_pairs

    q = torch.randint(-8, 8, (4, 64), dtype=torch.int8)
    s, z = torch.rand(4, 2) + 0.1, torch.randn(4, 2)
    t = {f"{P}.weight": pack_int4_row_pairs(q), f"{P}.weights_scaling_factor": s, f"{P}.zero": z}
    ql = read_quantized_linear(t, P, {"quant_algo": "W4A16_GPTQ", "has_zero_point": True, "group_size": 32})
    expect = q.float() * s.repeat_interleave(32, 1) + z.repeat_interleave(32, 1)
    assert ql.group_size == 32 and torch.equal(ql.dequantize(), expect)
    del t[f"{P}.zero"]
    with pytest.raises(LlmcError, match="missing"):
        read_quantized_linear(t, P, {"quant_algo": "W4A16_GPTQ", "has_zero_point": True})
    q8 = torch.randint(-128, 128, (4, 64), dtype=torch.int8)
    t8 = {f"{P}.weight": q8, f"{P}.weights_scaling_factor": s}
    ql = read_quantized_linear(t8, P, {"quant_algo": "W8A16_GPTQ", "group_size": 32})
    assert ql.kind == "w8a16" and torch.equal(ql.dequantize(), q8.float() * s.repeat_interleave(32, 1))
    assert kv_cache_algo("fp8") == "FP8" and kv_cache_algo(None) is None
    with pytest.raises(LlmcError, match="fp8, int8"):
        kv_cache_algo("int4")
    assert isinstance(QLinear("x", "float", torch.zeros(2, 2)).in_features, int)
