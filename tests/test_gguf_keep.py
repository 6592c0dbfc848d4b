"""`llmc convert model.gguf --keep-quantization` on the embedded SmolLM2 (Q4_1 linears, Q8_0
embedding): the GGUF blocks are kept bit for bit, and the engine computes what the fp32 engine of
the dequantized conversion computes, reading about a fifth of its bytes per token."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmc.cli.app import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    from llmc.default_model import default_gguf_path

    root = tmp_path_factory.mktemp("keep")
    gguf = default_gguf_path()
    assert main(["convert", str(gguf), "-o", str(root / "q"), "--keep-quantization"]) == 0
    assert main(["convert", str(gguf), "-o", str(root / "f")]) == 0
    return gguf, root / "q", root / "f"


def test_blocks_kept_exactly(kept):
    import gguf as gguf_pkg
    import torch

    from llmc.checkpoint.io import load_checkpoint
    from llmc.quantize.layout import read_quantized_linear

    path, q, f = kept
    ck = load_checkpoint(q)
    qc = ck.config.quantization
    assert (qc.quant_algo, qc.group_size, qc.has_zero_point) == ("W4A16_GPTQ", 32, True)
    meta = json.loads((q / "config.json").read_text())["llmc"]["quantization"]
    assert meta["kept"] == {"Q4_1": 150} and meta["dequantized"] == {}
    tensors, ref = ck.merged_tensors(), load_checkpoint(f).merged_tensors()
    for p in ("transformer.layers.0.attention.qkv", "transformer.layers.29.mlp.proj"):
        assert torch.equal(read_quantized_linear(tensors, p, qc).dequantize(), ref[p + ".weight"].float())
    # independently: the stored nibbles of blk.7.ffn_up are gguf's own Q4_1 codes, and the
    # scales its block d values (gguf's reference dequantizer agrees with the checkpoint)
    reader = gguf_pkg.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "blk.7.ffn_up.weight")
    deq = gguf_pkg.quants.dequantize(t.data, t.tensor_type).reshape(ref["transformer.layers.7.mlp.gate.weight"].shape)
    got = read_quantized_linear(tensors, "transformer.layers.7.mlp.gate", qc).dequantize().numpy()
    np.testing.assert_array_equal(got, deq)


def _logits(engine_dir, ids, level):
    from llmc.engine import load_engine
    from llmc.engine.step import SeqSlice, StepBatch

    e = load_engine(engine_dir, int4_accuracy_level=level)
    bs = e.config.tokens_per_block
    blocks = -(-e.config.max_seq_len // bs)
    e.allocate_kv_pool(blocks)
    table = list(range(blocks))
    n = len(ids)
    pos = np.arange(n, dtype=np.int64)
    slots = np.asarray([table[p // bs] * bs + p % bs for p in pos], np.int64)
    return np.asarray(e.step(StepBatch(np.asarray(ids, np.int64), pos, slots, [SeqSlice(0, n, n, table)],
                                       np.arange(n, dtype=np.int64))))


def test_engine_equals_fp32_engine_at_a_fifth_of_the_bytes(kept, tmp_path):
    from llmc.build import BuildOptions, build_engine
    from llmc.fsutil import dir_size

    _, q, f = kept
    opts = dict(max_batch_size=2, max_seq_len=256, max_num_tokens=256)
    eq = build_engine(q, tmp_path / "eq", BuildOptions(**opts)).out
    ef = build_engine(f, tmp_path / "ef", BuildOptions(**opts)).out
    ids = list(np.random.default_rng(0).integers(100, 40000, 96))
    a, b = _logits(ef, ids, 0), _logits(eq, ids, 0)  # exact kernels (fp32 inside MatMulNBits)
    assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()
    gq = json.loads((eq / "config.json").read_text())["engine"]["graph"]
    gf = json.loads((ef / "config.json").read_text())["engine"]["graph"]
    # bytes a decode step reads (the gathered-only embedding excluded): <= 35% of fp32's
    assert gq["decode_read_bytes"] <= 0.35 * gf["decode_read_bytes"], (gq["decode_read_bytes"], gf["decode_read_bytes"])
    # the whole engine too: the Q8_0 embedding table is looked up from its int8 blocks
    # (GatherBlockQuantized), not kept in float32 beside the int8 lm_head
    assert gq["op_counts"].get("GatherBlockQuantized") == 1
    assert gq["weight_bytes"] <= 0.35 * gf["weight_bytes"], (gq["weight_bytes"], gf["weight_bytes"])
    assert dir_size(eq) <= 0.35 * dir_size(ef), (dir_size(eq), dir_size(ef))


def test_keep_quantization_refuses_non_gguf(tiny_hf_dirs, tmp_path, capsys):
    assert main(["convert", str(tiny_hf_dirs["llama"]), "-o", str(tmp_path / "x"), "--keep-quantization"]) == 2
    assert ".gguf" in capsys.readouterr().err and not (tmp_path / "x").exists()
