"""CLI conventions: --version, one-line usage errors with "did you mean", help that never cuts."""

from __future__ import annotations

import subprocess
import sys


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmc.cli.app", *args], capture_output=True, text=True,
                          timeout=120)


def test_version():
    from llmc import __version__

    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"llmc {__version__}"


def test_close_misses_get_did_you_mean_on_one_line():
    for args, wanted in ((("quantize", "x", "-o", "y", "--qformat", "int4-awq"), "'int4_awq'"),
                         (("build", "x", "-o", "y", "--dtype", "fp16x"), "'float16'"),
                         (("build", "x", "-o", "y", "--backend", "onnx-runtime"), "'onnxruntime'")):
        r = _cli(*args)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "did you mean" in r.stderr and wanted in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_common_dtype_spellings_are_accepted(tmp_path):
    r = _cli("convert", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "--dtype", "fp16")
    assert r.returncode == 2 and "no such file" in r.stderr, r.stderr  # fp16 parsed; the path is what fails


def test_unknown_option_and_command_are_one_line():
    for args in (("build", "x", "--bogus"), ("frobnicate",), ("build",)):
        r = _cli(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_help_shows_choices_and_is_never_cut():
    r = _cli("build", "--help")
    assert r.returncode == 0
    assert "--inflight-batching / --no-inflight-batching" in r.stdout
    assert "<auto|onnxruntime|tensorrt|tensorrt-llm>" in r.stdout
    assert "…" not in r.stdout
    top = _cli("--help").stdout
    assert "…" not in top and "..." not in top.split("Commands:")[1]


def test_hub_id_says_download_first(tmp_path):
    r = _cli("convert", "HuggingFaceTB/SmolLM2-135M-Instruct", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "Hugging Face Hub id" in r.stderr and "never downloads" in r.stderr and "--local-dir" in r.stderr


def test_json_is_the_whole_of_stdout(tiny_checkpoints, tmp_path):
    import json

    from llmc.build import BuildOptions, build_engine

    eng = tmp_path / "eng"
    build_engine(tiny_checkpoints["llama"], eng, BuildOptions(max_batch_size=2, max_input_len=32, max_seq_len=64,
                                                              tokens_per_block=16))
    data = tmp_path / "t.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    for args in (("inspect", str(eng), "--json"), ("inspect", str(tiny_checkpoints["llama"]), "--json"),
                 ("run", str(eng), "-p", "hi", "--max-new-tokens", "3", "--kv-cache-mb", "2", "--json"),
                 ("bench", str(eng), "--num-requests", "3", "--input-len", "4:8", "--output-len", "2:3",
                  "--kv-cache-mb", "2", "--json"),
                 ("eval", str(tiny_checkpoints["llama"]), str(eng), "--data", str(data), "--seq-len", "32",
                  "--max-chunks", "2", "--json")):
        r = _cli(*args)
        assert r.returncode == 0, r.stderr
        json.loads(r.stdout)  # nothing but the document on stdout
    rows = json.loads(r.stdout)
    assert len(rows) == 2  # several paths imply --compare


def test_piped_tables_keep_full_values(tiny_checkpoints):
    deep = str(tiny_checkpoints["llama"])
    r = _cli("inspect", deep)
    assert r.returncode == 0 and "…" not in r.stdout
    r = _cli("recipes", "list")
    assert "smollm2-int8_sq" in r.stdout and "…" not in r.stdout


def test_inspect_describes_a_gguf():
    from llmc.default_model import default_gguf_path

    r = _cli("inspect", str(default_gguf_path()), "--json")
    assert r.returncode == 0, r.stderr
    import json

    facts = json.loads(r.stdout)
    assert facts["kind"] == "gguf" and facts["layers"] == 30 and "Q4_1" in facts["tensor_types"]
