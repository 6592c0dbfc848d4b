"""`--lm-head`: a float lm_head whose values are exactly int8 blocks is stored and run as such.

The reference for "exactly int8 blocks" is the gguf package's own Q8_0 quantizer (what the
embedded SmolLM2 ships its tied embedding in), not llmc's code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from llmc.cli.app import main
from llmc.build import BuildOptions, build_engine
from llmc.engine import load_engine
from llmc.plugins.linear import exact_int8_blocks
from test_engine import MIXED_PLAN, mixed_seqs, run_schedule


def gguf_q8_0(w: np.ndarray) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    return dequantize(quantize(w, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0).astype(np.float32)


def test_exact_int8_blocks_recognises_gguf_q8_0_and_nothing_else():
    w = (np.random.default_rng(0).standard_normal((64, 128)) * 0.05).astype(np.float32)
    q8 = gguf_q8_0(w)
    spec = exact_int8_blocks(q8)
    assert spec is not None and spec.weight.dtype == np.int8 and spec.weight_scale.shape == (64, 4)
    assert np.array_equal(spec.dequantized(), q8)  # bit for bit
    assert exact_int8_blocks(w) is None
    off = q8.copy()
    off[3, 5] = np.nextafter(off[3, 5], np.float32(1.0))
    assert exact_int8_blocks(off) is None
    assert exact_int8_blocks(q8[:, :100]) is None  # input width not a multiple of the block


@pytest.fixture(scope="module")
def q8_head_int4(tiny_checkpoints, tmp_path_factory):
    """The tiny tied Llama with its embedding on the Q8_0 grid, quantized int4_wo (lm_head float)."""
    from llmc.checkpoint.io import load_checkpoint, write_checkpoint
    from llmc.quantize import quantize_checkpoint

    root = tmp_path_factory.mktemp("q8head")
    ck = load_checkpoint(tiny_checkpoints["llama_tied"])
    tensors = ck.merged_tensors()
    name = "transformer.vocab_embedding.weight"
    tensors[name] = torch.from_numpy(gguf_q8_0(tensors[name].numpy()))
    tensors["lm_head.weight"] = tensors[name].clone()  # tied: the checkpoint carries both names
    (root / "float").mkdir()
    write_checkpoint(root / "float", ck.config, [tensors])
    for f in ck.path.iterdir():  # tokenizer files
        if f.name.startswith(("tokenizer", "generation")):
            (root / "float" / f.name).write_bytes(f.read_bytes())
    q = quantize_checkpoint(root / "float", root / "int4", "int4_wo", calib_size=2, calib_seq_len=32,
                            group_size=64, progress=False).out
    opts = dict(tokens_per_block=4, max_batch_size=4, max_seq_len=128)
    return {"int8": build_engine(q, root / "e_int8", BuildOptions(**opts)).out,
            "float": build_engine(q, root / "e_float", BuildOptions(lm_head="float", **opts)).out,
            "exact": build_engine(q, root / "e_exact", BuildOptions(matmul_accuracy="fp32", **opts)).out,
            "float_ckpt": build_engine(root / "float", root / "e_fp32", BuildOptions(**opts)).out}


def test_auto_stores_an_exact_lm_head_as_int8_blocks(q8_head_int4):
    graph = {k: json.loads((v / "config.json").read_text())["engine"]["graph"] for k, v in q8_head_int4.items()}
    assert graph["int8"]["lm_head"] == "int8-blocks"
    assert graph["float"]["lm_head"] == "float"
    assert graph["float_ckpt"]["lm_head"] == "float"  # auto leaves float engines float
    # the lookup reads the same int8 blocks (GatherBlockQuantized: uint8 table + per-32 scales)
    # instead of the fp32 table, so int8 blocks for logits AND lookup are smaller than one fp32 table
    assert graph["int8"]["op_counts"].get("GatherBlockQuantized") == 1
    assert "GatherBlockQuantized" not in graph["float"]["op_counts"]
    assert graph["int8"]["weight_bytes"] < graph["float"]["weight_bytes"]
    # what a decode step reads (MBU): the lookup table is only gathered from
    emb = 320 * 128 + 320 * (128 // 32) * 4
    assert graph["int8"]["decode_read_bytes"] == graph["int8"]["weight_bytes"] - emb
    assert graph["float"]["decode_read_bytes"] == graph["float"]["weight_bytes"]  # tied: Gemm reads it


def test_int8_lm_head_logits_equal_the_float_ones(q8_head_int4):
    seqs = mixed_seqs(320)
    got = {}
    for k in ("int8", "float"):
        engine = load_engine(q8_head_int4[k], int4_accuracy_level=0)  # exact kernels
        got[k] = run_schedule(engine, seqs, MIXED_PLAN, seed=3)
    for a, b in zip(got["int8"], got["float"]):
        for p in a:
            np.testing.assert_allclose(a[p], b[p], atol=1e-4)
    fast = run_schedule(load_engine(q8_head_int4["int8"]), seqs, MIXED_PLAN, seed=3)
    scale = max(float(np.abs(r).max()) for s in got["float"] for r in s.values())
    assert max(float(np.abs(fast[i][p] - got["float"][i][p]).max()) for i in range(3) for p in fast[i]) < 0.05 * scale


def test_fp32_matmul_accuracy_engine_equals_float_kernels(q8_head_int4):
    """--matmul-accuracy fp32: int4 linears at ORT accuracy level 1 (stamped in config.json) and the
    int8-block lm_head on compensated activations give the float lm_head engine's exact-kernel
    logits (the default build's int8 rounding does not)."""
    cfg = json.loads((q8_head_int4["exact"] / "config.json").read_text())
    assert cfg["engine"]["matmul_accuracy"] == "fp32" and cfg["engine"]["graph"]["lm_head"] == "int8-blocks"
    assert "--matmul-accuracy fp32" in cfg["build_command"]
    seqs = mixed_seqs(320)
    exact = run_schedule(load_engine(q8_head_int4["exact"]), seqs, MIXED_PLAN, seed=3)
    ref = run_schedule(load_engine(q8_head_int4["float"], int4_accuracy_level=0), seqs, MIXED_PLAN, seed=3)
    for a, b in zip(exact, ref):
        for p in a:
            np.testing.assert_allclose(a[p], b[p], atol=1e-4)


def test_lm_head_int8_refuses_weights_off_the_grid(tiny_checkpoints, tmp_path, capsys):
    code = main(["build", str(tiny_checkpoints["llama"]), "-o", str(tmp_path / "e"), "--lm-head", "int8",
                 "--max-seq-len", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "not exactly int8" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()
