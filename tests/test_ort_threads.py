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
    with pytest.raises(LlmcError, match=">= 1, got 0"):  # 0 is a bad argument, not "use the default"
        thread_settings(0)
    so = session_options()
    assert so.intra_op_num_threads == 3
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"


@pytest.mark.parametrize("var,value", [("LLMC_ORT_THREADS", "two"), ("LLMC_ORT_THREADS", "0"),
                                       ("LLMC_ORT_SPINNING", "yes")])
def test_bad_environment_is_a_user_error(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(LlmcError):
        thread_settings()


def test_llm_arguments_reach_the_session(tiny_checkpoints, tmp_path, monkeypatch):
    """LLM(num_threads=, spinning=) (what `llmc run/serve/bench --threads/--spin` pass) override
    the environment and the defaults in the session ORT actually runs."""
    from llmc.build import BuildOptions, build_engine
    from llmc.runtime.llm import LLM

    eng = tmp_path / "eng"
    build_engine(tiny_checkpoints["llama"], eng, BuildOptions(max_batch_size=2, max_input_len=32, max_seq_len=64,
                                                               tokens_per_block=16))
    monkeypatch.setenv("LLMC_ORT_THREADS", "2")
    monkeypatch.setenv("LLMC_ORT_SPINNING", "1")
    for threads, spin in ((1, False), (2, True)):
        so = LLM(eng, num_blocks=8, num_threads=threads, spinning=spin).engine._session.sess.get_session_options()
        assert so.intra_op_num_threads == threads
        assert so.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")
    so = LLM(eng, num_blocks=8).engine._session.sess.get_session_options()  # the environment
    assert (so.intra_op_num_threads, so.get_session_config_entry("session.intra_op.allow_spinning")) == (2, "1")


@pytest.mark.parametrize("command", ["run", "bench", "serve"])
def test_cli_rejects_zero_threads(command, tmp_path, capsys):
    from llmc.cli.app import main

    code = main([command, str(tmp_path), "--threads", "0"] + (["-p", "hi"] if command == "run" else []))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--threads must be >= 1, got 0" in err, err
