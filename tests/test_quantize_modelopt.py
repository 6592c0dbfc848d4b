"""llmc's quantized checkpoint vs ModelOpt's own TensorRT-LLM export of the same tiny model.

Both sides start from identical float16 weights and see identical calibration windows: ModelOpt
calibrates the Hugging Face model and runs `export_tensorrt_llm_checkpoint`; llmc converts the
same model and runs `llmc quantize`. Expected:
- identical tensor names, shapes and dtypes for every format;
- identical scales (and integer weights) wherever the algorithm is deterministic: FP8 (+ FP8 KV),
  INT8 weight-only, INT4 round-to-nearest, SmoothQuant at alpha 1.0 (+ INT8 KV), and AWQ's
  unfused layers (attention.dense, mlp.proj);
- AWQ's fused layers (qkv, fc/gate) differ by design: llmc searches one scale for the fused
  matmul, ModelOpt searches q/k/v (gate/up) separately and averages. There the check is that both
  dequantize to within two INT4 steps of each other (each is within one of the original);
- documented config differences: int8_sq's quant_algo (llmc: per-token; int8_sq_static is
  ModelOpt's W8A8_SQ_PER_CHANNEL exactly), int4_wo's
  pre_quant_scale flag (ModelOpt writes true without writing any pre-quant scale), and RoPE
  settings, which ModelOpt's export drops under transformers 5 while llmc keeps them.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from llmc.quantize.api import quantize_checkpoint
from llmc.quantize.layout import read_quantized_linear

PRESETS = {"fp8": "FP8_DEFAULT_CFG", "fp8_pc_pt": "FP8_PER_CHANNEL_PER_TOKEN_CFG", "int8_sq": "INT8_SMOOTHQUANT_CFG", "int4_awq": "INT4_AWQ_CFG",
           "w4a8_awq": "W4A8_AWQ_BETA_CFG", "int8_wo": "INT8_WEIGHT_ONLY_CFG", "int4_wo": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
           "int8_sq_static": "INT8_SMOOTHQUANT_CFG"}
KV = {"fp8": "fp8", "int8_sq": "int8"}
FUSED = ("attention.qkv", "mlp.fc", "mlp.gate")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(HF dir, llmc checkpoint, calibration file, windows) from one float16 tiny Llama."""
    from tiny_models import make_tiny_hf_model
    from transformers import AutoModelForCausalLM

    from llmc.converters.convert import convert
    from llmc.quantize.calib_data import calibration_windows
    from llmc.tokenizer import load_tokenizer
    from test_quantize import make_text

    root = tmp_path_factory.mktemp("mo")
    hf = make_tiny_hf_model(root / "hf", "llama", seed=3)
    AutoModelForCausalLM.from_pretrained(hf).half().save_pretrained(hf)
    ck = convert(hf, root / "ck", dtype="float16", progress=False).out
    calib = root / "calib.txt"
    calib.write_text(make_text(4000, seed=1))
    windows, _ = calibration_windows(load_tokenizer(ck), calib, calib_size=8, seq_len=64, seed=0)
    return root, hf, ck, calib, windows


def modelopt_export(hf, windows, name, out):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_tensorrt_llm_checkpoint

        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        cfg = copy.deepcopy(getattr(mtq, PRESETS[name]))
        if name.startswith("int8_sq"):
            cfg["algorithm"] = {"method": "smoothquant", "alpha": 1.0}
        if KV.get(name) == "fp8":
            cfg["quant_cfg"] = cfg["quant_cfg"] + mtq.FP8_KV_CFG["quant_cfg"]
        if KV.get(name) == "int8":
            cfg["quant_cfg"] = cfg["quant_cfg"] + [{"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": 8, "axis": None}}]

        def loop(m):
            for b in windows.split(4):
                m(b)

        mtq.quantize(model, cfg, loop)
        export_tensorrt_llm_checkpoint(model, "llama", torch.float16, export_dir=out, inference_tensor_parallel=1)
    return load_file(out / "rank0.safetensors"), json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("name", list(PRESETS))
def test_layout_matches_modelopt_export(name, pair, capfd):
    root, hf, ck, calib, windows = pair
    mo, mo_cfg = modelopt_export(hf, windows, name, root / f"mo_{name}")
    r = quantize_checkpoint(ck, root / f"llmc_{name}", name, kv_cache_dtype=KV.get(name), calib_data=str(calib),
                            calib_size=8, calib_seq_len=64, batch_size=4,
                            sq_alpha=1.0 if name.startswith("int8_sq") else None, progress=False)
    ours = load_file(r.out / "rank0.safetensors")
    our_cfg = json.loads((r.out / "config.json").read_text())

    assert sorted(ours) == sorted(mo)
    for n in mo:
        assert (ours[n].dtype, tuple(ours[n].shape)) == (mo[n].dtype, tuple(mo[n].shape)), n

    deterministic = name != "int4_awq" and name != "w4a8_awq"
    for n in mo:
        fused = any(f".{f}." in n for f in FUSED)
        if "scaling_factor" in n or (n.endswith(".weight") and mo[n].dtype in (torch.int8, torch.float8_e4m3fn)):
            if deterministic or not fused:
                a, b = ours[n].float(), mo[n].float()
                assert torch.allclose(a, b, rtol=1e-5, atol=0), f"{name}: {n} differs (max {float((a - b).abs().max()):.3g})"

    mq, oq = mo_cfg["quantization"], our_cfg["quantization"]
    assert oq["kv_cache_quant_algo"] == mq["kv_cache_quant_algo"] and oq["exclude_modules"] == mq["exclude_modules"]
    assert oq["quant_algo"] == ("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN" if name == "int8_sq" else mq["quant_algo"])
    if "group_size" in mq:
        assert oq["group_size"] == mq["group_size"] and oq["has_zero_point"] == mq["has_zero_point"]
        assert oq["pre_quant_scale"] == (mq["pre_quant_scale"] if name != "int4_wo" else False)
    assert "rotary_base" not in mo_cfg  # ModelOpt's transformers-5 bug, which llmc must not copy
    assert our_cfg["rotary_base"] == 500000.0 and our_cfg["rotary_scaling"]["type"] == "llama3"

    if not deterministic:  # fused layers: both dequantize to within two steps of each other
        for i in range(2):
            for lin in FUSED:
                p = f"transformer.layers.{i}.{lin}"
                a = read_quantized_linear(ours, p, oq)
                b = read_quantized_linear(mo, p, mq)
                step = a.expanded_weight_scale() * a.pre_quant_scale[None] + b.expanded_weight_scale() * b.pre_quant_scale[None]
                if a.weight_scale_2 is not None:
                    step = step * torch.maximum(a.weight_scale_2, b.weight_scale_2)
                diff = (a.effective_weight() - b.effective_weight()).abs()
                assert (diff <= step * 1.01).all(), f"{name} {p}: {float((diff / step).max()):.2f} steps apart"
