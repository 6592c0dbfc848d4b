"""Conversion + reference model parity against transformers (issue 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from llmc.checkpoint.io import load_checkpoint
from llmc.converters.convert import convert
from llmc.models.reference import ReferenceModel
from tiny_models import hf_logits


def _ids(vocab: int, b: int = 2, s: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, s), generator=g)


@pytest.mark.parametrize("family", ["llama", "llama_tied", "mistral", "qwen2"])
def test_reference_logits_match_transformers(family, tiny_hf_dirs, tiny_checkpoints):
    ids = _ids(320)
    expected = hf_logits(tiny_hf_dirs[family], ids)
    with torch.no_grad():
        got = ReferenceModel.from_checkpoint(tiny_checkpoints[family])(ids)
    assert (got - expected).abs().max().item() < 1e-4


def test_checkpoint_layout_is_tensorrt_llm(tiny_checkpoints):
    ckpt = tiny_checkpoints["qwen2"]
    cfg = json.loads((ckpt / "config.json").read_text())
    for key in ("architecture", "dtype", "vocab_size", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_size", "intermediate_size",
                "norm_epsilon", "rotary_base", "mapping", "quantization", "position_embedding_type"):
        assert key in cfg, key
    with safe_open(str(ckpt / "rank0.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("transformer.layers.0.attention.qkv.weight").get_shape() == [128 + 2 * 64, 128]
        assert f.get_slice("transformer.layers.0.attention.qkv.bias").get_shape() == [256]
    for suffix in ("attention.qkv.weight", "attention.dense.weight", "mlp.fc.weight", "mlp.gate.weight",
                   "mlp.proj.weight", "input_layernorm.weight", "post_layernorm.weight"):
        assert f"transformer.layers.1.{suffix}" in names
    assert {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"} <= names
    for fname in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (ckpt / fname).is_file()


def test_rope_scaling_carried_over(tiny_checkpoints):
    cfg = load_checkpoint(tiny_checkpoints["llama"]).config
    assert cfg.rotary_base == 500000.0
    assert cfg.rotary_scaling["type"] == "llama3" and cfg.rotary_scaling["factor"] == 8.0
    assert cfg.tie_word_embeddings is False
    assert load_checkpoint(tiny_checkpoints["llama_tied"]).config.tie_word_embeddings is True


def test_rope_parameters_spelling_of_transformers5(tmp_path, tiny_hf_dirs):
    """A config that only has `rope_parameters` (transformers 5) converts the same way."""
    import shutil

    src = tmp_path / "hf"
    shutil.copytree(tiny_hf_dirs["llama"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    cfg.pop("rope_theta", None)
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 20000.0, "factor": 4.0,
                              "original_max_position_embeddings": 128}
    (src / "config.json").write_text(json.dumps(cfg))
    out = convert(src, tmp_path / "ckpt", progress=False).config
    assert out.rotary_base == 20000.0
    assert out.rotary_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    ids = _ids(320, s=40)
    expected = hf_logits(src, ids)
    with torch.no_grad():
        got = ReferenceModel.from_checkpoint(tmp_path / "ckpt")(ids)
    assert (got - expected).abs().max().item() < 1e-4


def test_sharded_hf_source(tmp_path, tiny_hf_dirs):
    """A source split into shards with an index converts to the same tensors."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_dirs["qwen2"]))
    src = tmp_path / "sharded"
    model.save_pretrained(str(src), max_shard_size="200KB")
    for f in tiny_hf_dirs["qwen2"].glob("tokenizer*"):
        (src / f.name).write_bytes(f.read_bytes())
    assert (src / "model.safetensors.index.json").is_file()
    convert(src, tmp_path / "ckpt", progress=False)
    ids = _ids(320)
    with torch.no_grad():
        a = ReferenceModel.from_checkpoint(tmp_path / "ckpt")(ids)
    assert (a - hf_logits(tiny_hf_dirs["qwen2"], ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tp2_matches_tp1(family, tmp_path, tiny_hf_dirs, tiny_checkpoints):
    out = convert(tiny_hf_dirs[family], tmp_path / "tp2", dtype="float32", tp_size=2, progress=False)
    cfg = json.loads((out.out / "config.json").read_text())
    assert cfg["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert (out.out / "rank1.safetensors").is_file()
    with safe_open(str(out.out / "rank1.safetensors"), "pt") as f:
        assert f.get_slice("transformer.layers.0.attention.qkv.weight").get_shape() == [128, 128]
        assert f.get_slice("transformer.layers.0.attention.dense.weight").get_shape() == [128, 64]
        assert f.get_slice("transformer.layers.0.mlp.fc.weight").get_shape() == [128, 128]
        assert f.get_slice("transformer.layers.0.mlp.proj.weight").get_shape() == [128, 128]
    ids = _ids(320)
    with torch.no_grad():
        a = ReferenceModel.from_checkpoint(out.out)(ids)
        b = ReferenceModel.from_checkpoint(tiny_checkpoints[family])(ids)
    assert torch.equal(a, b)


def test_dtype_option(tmp_path, tiny_hf_dirs):
    out = convert(tiny_hf_dirs["llama"], tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert out.config.dtype == "bfloat16"
    with safe_open(str(out.out / "rank0.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.ln_f.weight").dtype == torch.bfloat16


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_checkpoint):
    """SmolLM2-135M converted from its GGUF matches transformers' own GGUF loader."""
    from transformers import AutoModelForCausalLM

    from llmc.default_model import default_gguf_path

    gguf = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = _ids(49152, b=1, s=48)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ReferenceModel.from_checkpoint(smollm2_checkpoint)(ids)
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.slow
def test_cli_convert_gguf_then_inspect(tmp_path):
    """The fresh-clone path: `llmc convert` on the SmolLM2 GGUF, then `llmc inspect`."""
    from llmc.default_model import default_gguf_path

    out = tmp_path / "ckpt"
    run = [sys.executable, "-m", "llmc.cli.app"]
    r = subprocess.run([*run, "convert", str(default_gguf_path()), "-o", str(out), "--dtype", "float16"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*run, "inspect", str(out), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["architecture"] == "LlamaForCausalLM" and facts["dtype"] == "float16"
    assert facts["kv_cache_bytes_per_token"] == 2 * 30 * 3 * 64 * 2
    assert 134e6 < facts["parameters"] < 136e6
    from llmc.tokenizer import load_tokenizer

    tok = load_tokenizer(out)
    assert tok.decode(tok.encode("The State of the Union")).endswith("The State of the Union")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
