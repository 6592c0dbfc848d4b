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
