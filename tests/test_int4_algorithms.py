"""What each INT4 algorithm does on weights that are NOT on a 4-bit grid.

The embedded SmolLM2 came from a GGUF whose linears are Q4_1 (asymmetric, 32-wide blocks), so on
it an asymmetric g32 format is lossless for that reason alone and says nothing about the
algorithm. Here the tiny random float Llama (Gaussian weights, no grid) is quantized with every
INT4 algorithm at the same group size and compared with plain symmetric round-to-nearest
(int4_wo): the weight error (effective weight, AWQ's pre-quant scale folded in, vs the float
weight) and the output error (logits of the fake-quant simulation vs the float model on
held-out windows). The measured table is printed (pytest -s) and the README quotes it.
"""

from __future__ import annotations

import pytest
import torch

from llmc.quantize.api import quantize_checkpoint

GROUP = 32
CALIB = dict(calib_size=8, calib_seq_len=64, batch_size=4, group_size=GROUP)
ALGOS = {  # row -> (qformat, options)
    "int4_wo (RTN)": ("int4_wo", {}),
    "awq_lite": ("int4_awq", {"awq_method": "lite"}),
    "awq_clip": ("int4_awq", {"awq_method": "clip"}),
    "awq_full": ("int4_awq", {"awq_method": "full"}),
    "int4_asym": ("int4_asym", {}),
    "awq_lite+zp": ("int4_awq_asym", {"awq_method": "lite"}),
}


@pytest.fixture(scope="module")
def errors(tiny_checkpoints, tmp_path_factory):
    from test_quantize import make_text

    from llmc.checkpoint.io import load_checkpoint
    from llmc.evaluate import logits_fn
    from llmc.quantize.calib_data import calibration_windows
    from llmc.quantize.layout import read_quantized_linear
    from llmc.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("int4alg")
    calib = root / "calib.txt"
    calib.write_text(make_text(seed=0))
    held = root / "held.txt"
    held.write_text(make_text(seed=7))
    src = tiny_checkpoints["llama"]
    windows, _ = calibration_windows(load_tokenizer(src), held, calib_size=8, seq_len=64, seed=1)
    ref_logits = logits_fn(src, 64)(windows)
    float_w = load_checkpoint(src).merged_tensors()
    out = {}
    for row, (qformat, opts) in ALGOS.items():
        r = quantize_checkpoint(src, root / row.replace(" ", "_").replace("+", "_"), qformat,
                                calib_data=str(calib), progress=False, **CALIB, **opts)
        ck = load_checkpoint(r.out)
        tensors = ck.merged_tensors()
        num = den = 0.0
        for name, w in float_w.items():
            prefix = name.removesuffix(".weight")
            if name.endswith(".weight") and prefix + ".weights_scaling_factor" in tensors:
                q = read_quantized_linear(tensors, prefix, ck.config.quantization)
                num += float((q.effective_weight() - w.float()).pow(2).sum())
                den += float(w.float().pow(2).sum())
        logits = logits_fn(r.out, 64)(windows)
        out[row] = {"weight": (num / den) ** 0.5,
                    "output": float((logits - ref_logits).pow(2).mean().sqrt() / ref_logits.pow(2).mean().sqrt())}
    print("\nINT4 g32 on the tiny float Llama: relative RMS error (weights; logits on held-out text)")
    for row, e in out.items():
        print(f"  {row:14} weight {e['weight']:.4f} ({e['weight'] / out['int4_wo (RTN)']['weight']:.2f}x RTN)  "
              f"output {e['output']:.4f} ({e['output'] / out['int4_wo (RTN)']['output']:.2f}x RTN)")
    return out


def test_errors_vs_round_to_nearest(errors):
    """Measured (seeded): clip search 0.70x / full 0.77x RTN's output error; asymmetric groups
    0.81x RTN's weight error; AWQ-lite's scale search alone is WORSE than RTN here (1.20x: random
    weights have no salient channels for it to protect) and zero points bring it to 0.78x."""
    rtn = errors["int4_wo (RTN)"]
    assert errors["awq_clip"]["output"] < 0.85 * rtn["output"]
    assert errors["awq_full"]["output"] < 0.9 * rtn["output"]
    assert errors["int4_asym"]["weight"] < 0.9 * rtn["weight"]
    assert errors["awq_lite+zp"]["weight"] < 0.9 * errors["awq_lite"]["weight"]
    assert errors["awq_lite+zp"]["output"] < 0.9 * errors["awq_lite"]["output"]
