"""Bad input: one line on stderr, exit code 2, and no OUT left behind (issue 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from llmc.cli.app import main


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_path(tmp_path, capsys):
    code, err = run_cli(["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "out")], capsys)
    assert_user_error(code, err, "no such file")
    assert not (tmp_path / "out").exists()


def test_directory_without_config(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    code, err = run_cli(["convert", str(tmp_path / "src"), "-o", str(tmp_path / "out")], capsys)
    assert_user_error(code, err, "config.json")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_supported(tmp_path, capsys, tiny_hf_dirs):
    src = tmp_path / "src"
    shutil.copytree(tiny_hf_dirs["llama"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(["convert", str(src), "-o", str(tmp_path / "out")], capsys)
    assert_user_error(code, err, "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(tmp_path, capsys, tiny_hf_dirs):
    src = tmp_path / "src"
    shutil.copytree(tiny_hf_dirs["llama"], src)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    code, err = run_cli(["convert", str(src), "-o", str(tmp_path / "out")], capsys)
    assert_user_error(code, err, "model.safetensors", "truncated")
    assert not (tmp_path / "out").exists()


def test_wrong_tensor_shape(tmp_path, capsys, tiny_hf_dirs):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_hf_dirs["llama"], src)
    tensors = load_file(str(src / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name][:, :200].contiguous()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    code, err = run_cli(["convert", str(src), "-o", str(tmp_path / "out")], capsys)
    assert_user_error(code, err, name, "(128, 200)")
    assert not (tmp_path / "out").exists()


def test_non_empty_out_without_force(tmp_path, capsys, tiny_hf_dirs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(["convert", str(tiny_hf_dirs["llama"]), "-o", str(out)], capsys)
    assert_user_error(code, err, "not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only a previous llmc checkpoint (issue 10): a user's directory is refused
    code, err = run_cli(["convert", str(tiny_hf_dirs["llama"]), "-o", str(out), "--force"], capsys)
    assert_user_error(code, err, "not an llmc checkpoint", "--force only replaces")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    code, _ = run_cli(["convert", str(tiny_hf_dirs["llama"]), "-o", str(out)], capsys)  # empty: fine
    assert code == 0 and (out / "config.json").is_file()
    code, _ = run_cli(["convert", str(tiny_hf_dirs["qwen2"]), "-o", str(out), "--force"], capsys)
    assert code == 0 and "Qwen2" in (out / "config.json").read_text()


def test_tp_size_that_does_not_divide(tmp_path, capsys, tiny_hf_dirs):
    code, err = run_cli(["convert", str(tiny_hf_dirs["llama"]), "-o", str(tmp_path / "out"),
                         "--tp-size", "4"], capsys)
    assert_user_error(code, err, "num_key_value_heads=2")
    assert not (tmp_path / "out").exists()


def test_inspect_non_checkpoint(tmp_path, capsys):
    code, err = run_cli(["inspect", str(tmp_path)], capsys)
    assert_user_error(code, err, "config.json")


def test_interrupted_convert_leaves_nothing(tmp_path, tiny_hf_dirs, monkeypatch):
    """An exception mid-write (e.g. Ctrl-C) removes the temporary directory; OUT never appears."""
    from llmc.checkpoint import safetensors_stream
    from llmc.converters.convert import convert

    calls = {"n": 0}
    original = safetensors_stream.StreamingSafetensorsWriter.write

    def flaky(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, name, tensor)

    monkeypatch.setattr(safetensors_stream.StreamingSafetensorsWriter, "write", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_hf_dirs["llama"], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_help_is_instant_and_lists_every_command():
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "llmc.cli.app", "--help"], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert r.returncode == 0
    for command in ("convert", "quantize", "build", "run", "bench", "eval", "inspect", "pipeline",
                    "recipes", "default-model"):
        assert command in r.stdout, command
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmc.cli.app", "--help"],
                       capture_output=True, text=True)
    heavy = [m for m in ("torch", "onnxruntime", "modelopt", "tensorrt", "transformers")
             if f"| {m}\n" in r.stderr or f" {m}\n" in r.stderr]
    assert not heavy, f"heavy modules imported at start-up: {heavy}"
    assert elapsed < 3.0


def test_bfloat16_onnxruntime_engine_is_refused_before_building(tmp_path, capsys, tiny_checkpoints):
    """ONNX Runtime's CPU kernels have no bfloat16 (Where, GroupQueryAttention, ...): the build says
    so at once instead of writing an engine that cannot load."""
    code, err = run_cli(["build", str(tiny_checkpoints["llama"]), "-o", str(tmp_path / "e"), "--dtype", "bfloat16"],
                        capsys)
    assert_user_error(code, err, "bfloat16", "float16")
    assert not (tmp_path / "e").exists()
