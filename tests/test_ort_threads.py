"""ONNX Runtime thread settings: arguments, then LLMC_ORT_THREADS / LLMC_ORT_SPINNING, then defaults."""

import pytest

from llmc.engine.backends.onnxruntime import DEFAULT_SPINNING, default_threads, physical_cores, session_options, thread_settings
from llmc.errors import LlmcError


def test_defaults_and_environment(monkeypatch):
    monkeypatch.delenv("LLMC_ORT_THREADS", raising=False)
    monkeypatch.delenv("LLMC_ORT_SPINNING", raising=False)
    assert thread_settings() == (default_threads(), DEFAULT_SPINNING)
    assert default_threads() == physical_cores()
    monkeypatch.setenv("LLMC_ORT_THREADS", "3")
    monkeypatch.setenv("LLMC_ORT_SPINNING", "1")
    assert thread_settings() == (3, True)
    assert thread_settings(1, False) == (1, False)  # explicit arguments win
    so = session_options()
    assert so.intra_op_num_threads == 3
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"


@pytest.mark.parametrize("var,value", [("LLMC_ORT_THREADS", "two"), ("LLMC_ORT_THREADS", "0"),
                                       ("LLMC_ORT_SPINNING", "yes")])
def test_bad_environment_is_a_user_error(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(LlmcError):
        thread_settings()
