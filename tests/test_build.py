"""`llmc build`: options, errors, stamps, atomicity, TensorRT / TensorRT-LLM plumbing checked on CPU."""

from __future__ import annotations

import json

import pytest

from llmc.cli.app import main
from llmc.build import BuildOptions, build_engine
from llmc.engine import load_engine
from llmc.errors import LlmcError


def run_cli(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def engine_dir(tiny_checkpoints, tmp_path_factory):
    return build_engine(tiny_checkpoints["qwen2"], tmp_path_factory.mktemp("b") / "eng",
                        BuildOptions(tokens_per_block=8, max_batch_size=4, max_seq_len=256)).out


# --- CLI errors: one line on stderr, exit code 2 ----------------------------------------------

def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    code, _, err = run_cli(["build", str(tmp_path / "junk"), "-o", str(tmp_path / "e")], capsys)
    assert code == 2 and err.count("\n") == 1 and "not a checkpoint" in err
    assert not (tmp_path / "e").exists()


def test_missing_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(["build", str(tmp_path / "nope"), "-o", str(tmp_path / "e")], capsys)
    assert code == 2 and err.count("\n") == 1


def test_engine_dir_is_not_a_checkpoint(engine_dir, tmp_path, capsys):
    code, _, err = run_cli(["build", str(engine_dir), "-o", str(tmp_path / "e")], capsys)
    assert code == 2 and "engine" in err


@pytest.mark.parametrize("args,needle", [
    (["--max-input-len", "300", "--max-seq-len", "200"], "exceeds --max-seq-len"),
    (["--max-seq-len", "256", "--kv-cache-blocks", "3"], "cannot hold one sequence"),
    (["--max-seq-len", "100000"], "max_position_embeddings"),
    (["--tokens-per-block", "48"], "power of two"),
    (["--backend", "cuda"], "--backend must be one of"),
    (["--max-batch-size", "0"], ">= 1"),
    (["--no-paged-kvcache"], "needs the paged KV cache"),
])
def test_settings_that_cannot_hold(args, needle, tiny_checkpoints, tmp_path, capsys):
    code, _, err = run_cli(["build", str(tiny_checkpoints["llama"]), "-o", str(tmp_path / "e"), *args], capsys)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "e").exists()


def test_refuses_to_overwrite_without_force(engine_dir, tiny_checkpoints, capsys):
    code, _, err = run_cli(["build", str(tiny_checkpoints["qwen2"]), "-o", str(engine_dir)], capsys)
    assert code == 2 and "--force" in err


def test_tensorrt_without_tensorrt_fails_at_once(tiny_checkpoints, tmp_path, capsys):
    from llmc.engine.backends.tensorrt import tensorrt_status

    if tensorrt_status()[0]:
        pytest.skip("TensorRT and a GPU are available here")
    code, _, err = run_cli(["build", str(tiny_checkpoints["llama"]), "-o", str(tmp_path / "e"),
                            "--backend", "tensorrt"], capsys)
    assert code == 2 and "--graph-only" in err and err.count("\n") == 1
    assert not (tmp_path / "e").exists()


def test_tensorrt_llm_without_it_fails_at_once(tiny_checkpoints, tmp_path, capsys):
    from llmc.build.tensorrt_llm import trtllm_status

    if trtllm_status()[0]:
        pytest.skip("TensorRT-LLM is available here")
    code, _, err = run_cli(["build", str(tiny_checkpoints["llama"]), "-o", str(tmp_path / "e"),
                            "--backend", "tensorrt-llm"], capsys)
    assert code == 2 and "TensorRT-LLM" in err


# --- the build itself ---------------------------------------------------------------------------

def test_cli_build_prints_memory_plan_and_stamps(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "e"
    code, stdout, err = run_cli(["build", str(tiny_checkpoints["llama"]), "-o", str(out), "--max-seq-len", "256",
                                 "--max-batch-size", "8"], capsys)
    assert code == 0, err
    assert "memory plan" in err and "KV pool" in err and "built" in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["engine"]["format_version"] == 1 and cfg["engine"]["backend"] == "onnxruntime"
    for k in ("llmc", "onnx", "onnxruntime", "tensorrt"):
        assert k in cfg["versions"]
    assert cfg["source"]["hash"].startswith("sha256:") and len(cfg["source"]["hash"]) == 71
    plan = cfg["memory_plan"]
    assert plan["kv_pool_max"] == 8 * 4 * plan["kv_bytes_per_block"]  # 8 seqs x 256/64 blocks
    assert plan["weights"] > 0 and plan["total_max"] > plan["weights"] + plan["kv_pool_max"]
    # the recorded plan holds the bytes the graph stores (the external-data file, small constants aside)
    data_bytes = (out / "model.onnx.data").stat().st_size
    assert 0.99 * data_bytes <= plan["weights"] <= data_bytes + 65536
    assert cfg["build"]["max_seq_len"] == 256 and cfg["build"]["max_input_len"] == 256
    assert (out / "model.onnx").is_file() and (out / "model.onnx.data").is_file()
    assert (out / "tokenizer.json").is_file()
    assert "--max-seq-len 256" in cfg["build_command"] and "--force" in cfg["build_command"]
    with pytest.raises(LlmcError, match="this is an engine directory"):
        from llmc.checkpoint import load_checkpoint

        load_checkpoint(out)


def test_checkpoint_hash_changes_with_content(tiny_checkpoints, tmp_path):
    import shutil

    from llmc.engine.stamps import checkpoint_hash

    copy = tmp_path / "c"
    shutil.copytree(tiny_checkpoints["llama"], copy)
    h = checkpoint_hash(copy)
    assert h == checkpoint_hash(tiny_checkpoints["llama"])
    with open(copy / "rank0.safetensors", "r+b") as f:
        f.seek(-1, 2)
        b = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([b[0] ^ 1]))
    assert checkpoint_hash(copy) != h


def test_interrupted_build_leaves_no_engine(tiny_checkpoints, tmp_path, monkeypatch):
    import llmc.build.model_graph as mg

    real = mg.build_graph

    def interrupted(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(mg, "build_graph", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_engine(tiny_checkpoints["llama"], tmp_path / "e", BuildOptions(max_seq_len=128))
    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_the_old_engine(engine_dir, tiny_checkpoints, monkeypatch):
    import llmc.build.model_graph as mg

    before = (engine_dir / "config.json").read_text()

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(mg, "build_graph", boom)
    with pytest.raises(RuntimeError):
        build_engine(tiny_checkpoints["qwen2"], engine_dir, BuildOptions(force=True, max_seq_len=256))
    assert (engine_dir / "config.json").read_text() == before
    assert [p.name for p in engine_dir.parent.iterdir()] == [engine_dir.name]


# --- loading -----------------------------------------------------------------------------------

def test_unknown_engine_format_is_refused_with_rebuild_hint(engine_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(engine_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["engine"]["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmcError) as exc:
        load_engine(bad)
    msg = str(exc.value)
    assert "\n" not in msg and "format version 99" in msg and "llmc build" in msg and "--force" in msg


def test_incompatible_tensorrt_version_is_refused(engine_dir):
    from llmc.engine.stamps import check_compatible

    data = json.loads((engine_dir / "config.json").read_text())
    data["engine"]["backend"] = "mystery"
    with pytest.raises(LlmcError, match="rebuild"):
        check_compatible(data, engine_dir)


def test_load_engine_errors(tmp_path, tiny_checkpoints):
    with pytest.raises(LlmcError, match="no such engine"):
        load_engine(tmp_path / "nope")
    with pytest.raises(LlmcError, match="checkpoint"):
        load_engine(tiny_checkpoints["llama"])


def test_kv_pool_that_cannot_hold_a_sequence(engine_dir):
    engine = load_engine(engine_dir)
    need = engine.blocks_for_seq(engine.config.max_seq_len)
    with pytest.raises(LlmcError, match="cannot hold one sequence"):
        engine.allocate_kv_pool(need - 1)
    pool = engine.allocate_kv_pool(need)
    assert pool.num_blocks == need and pool.nbytes == need * engine.kv_bytes_per_block


def test_describe_engine(engine_dir):
    from llmc.inspect import describe

    d = describe(engine_dir)
    assert d["kind"] == "engine" and d["backend"] == "onnxruntime" and d["format_version"] == 1


def test_graph_only_tensorrt_engine(tiny_checkpoints, tmp_path):
    out = build_engine(tiny_checkpoints["llama"], tmp_path / "t",
                       BuildOptions(backend="tensorrt", graph_only=True, max_seq_len=128)).out
    assert (out / "model.onnx").is_file() and not (out / "rank0.engine").exists()
    # TensorRT keeps a key and a value pool tensor per layer (its runtime ping-pongs each one)
    import onnx

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["engine"]["graph"]["kv_pool_layout"] == "split"
    names = {i.name for i in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.input}
    assert {f"kv_pool.{i}.{k}" for i in range(cfg["num_hidden_layers"]) for k in ("key", "value")} <= names
    from llmc.engine.backends.tensorrt import tensorrt_status

    if not tensorrt_status()[0]:
        with pytest.raises(LlmcError, match="graph-only"):
            load_engine(out)


# --- pure TensorRT / TensorRT-LLM decisions (CPU) -----------------------------------------------

def test_precision_flags():
    from llmc.build.tensorrt import precision_flags

    assert precision_flags("float16", "float") == ["FP16"]
    assert precision_flags("bfloat16", "fp8") == ["BF16", "FP8"]
    assert precision_flags("float16", "int8_sq") == ["FP16", "INT8"]
    assert precision_flags("float16", "int4_awq") == ["FP16", "INT4"]
    assert precision_flags("float16", "w4a8_awq") == ["FP16", "FP8", "INT4"]
    assert precision_flags("float32", "float", "int8") == ["INT8"]


def test_optimization_profile_covers_the_max_options():
    from llmc.build.tensorrt import optimization_profile

    opts = BuildOptions(max_batch_size=8, max_seq_len=512, max_input_len=256, max_num_tokens=1024,
                        tokens_per_block=64).resolve(4096)
    prof = optimization_profile(opts, 2, 64, 3, 64, num_layers=2)
    assert prof["input_ids"] == ((1,), (8,), (1024,))
    assert prof["attn_kv_blocks_0"][2] == (1024, 8)
    assert prof["attn_q_pos_1"][2] == (1024, 256)
    assert prof["kv_pool.1.value"][2] == (3, opts.kv_cache_blocks, 64, 64)
    for lo, opt, hi in prof.values():
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))


def test_trtllm_flag_mapping():
    from llmc.build.tensorrt_llm import trtllm_build_args

    opts = BuildOptions(max_batch_size=8, max_seq_len=512, max_input_len=256, tokens_per_block=32,
                        timing_cache="tc.bin").resolve(4096)
    args = trtllm_build_args("ck", "out", opts, None)
    flags = dict(zip(args[0::2], args[1::2]))
    assert flags["--checkpoint_dir"] == "ck" and flags["--output_dir"] == "out"
    assert flags["--kv_cache_type"] == "paged" and flags["--tokens_per_block"] == "32"
    assert flags["--remove_input_padding"] == "enable" and flags["--gpt_attention_plugin"] == "auto"
    assert flags["--use_fused_mlp"] == "enable" and flags["--gemm_plugin"] == "auto"
    assert flags["--use_paged_context_fmha"] == "enable" and flags["--context_fmha"] == "enable"
    assert flags["--max_seq_len"] == "512" and flags["--max_num_tokens"] == "2048"
    assert flags["--input_timing_cache"] == "tc.bin"
    legacy = dict(zip(*[iter(trtllm_build_args("ck", "out", opts, "FP8", "0.11.0"))] * 2))
    assert legacy["--paged_kv_cache"] == "enable" and legacy["--use_fused_mlp"] == "enable"
    assert "--gemm_plugin" not in legacy
    sq = dict(zip(*[iter(trtllm_build_args("ck", "out", opts, "W4A16_AWQ"))] * 2))
    assert sq["--use_fused_mlp"] == "disable"
    nopaged = BuildOptions(paged_kv_cache=False, inflight_batching=False, max_seq_len=512).resolve(4096)
    flags = dict(zip(*[iter(trtllm_build_args("ck", "out", nopaged, None))] * 2))
    assert flags["--kv_cache_type"] == "continuous" and flags["--remove_input_padding"] == "disable"
    assert "--tokens_per_block" not in flags


def test_trt_compat_rejects_what_tensorrt_cannot_parse():
    import numpy as np
    from onnx import TensorProto, helper

    from llmc.build.trt_compat import check_graph

    nodes = [
        helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["a"], domain="com.microsoft"),
        helper.make_node("RMSNormalization", ["x", "w"], ["b"]),
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["c"]),
        helper.make_node("Cast", ["x"], ["d"], to=TensorProto.FLOAT8E4M3FN),
        helper.make_node("MatMulInteger", ["c", "c"], ["e"]),
        helper.make_node("Attention", ["x", "x", "x", "", "x", "x"], ["f"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("f", TensorProto.FLOAT, None)],
                          [helper.make_tensor("w", TensorProto.FLOAT, [4], np.ones(4)),
                           helper.make_tensor("s", TensorProto.FLOAT, [], [1.0]),
                           helper.make_tensor("zp", TensorProto.INT8, [], [3])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23),
                                                helper.make_opsetid("com.microsoft", 1)])
    msgs = [str(p) for p in check_graph(model, "10.13")]
    joined = "\n".join(msgs)
    for needle in ("non-standard domain", "RMSNormalization", "zero point", "Cast to FLOAT8E4M3FN",
                   "MatMulInteger", "needs TensorRT >= 10.14", "past_key"):
        assert needle in joined, (needle, joined)


@pytest.mark.gpu
def test_tensorrt_engine_runs_like_onnxruntime(tiny_checkpoints, tmp_path):
    """On a GPU host: rank0.engine builds from the same graph and agrees with ORT (fp16 tolerance)."""
    from llmc.engine.backends.tensorrt import tensorrt_status

    ok, reason = tensorrt_status()
    if not ok:
        pytest.skip(reason)
    import numpy as np

    from test_engine import MIXED_PLAN, max_err, mixed_seqs, reference_logits, run_schedule

    out = build_engine(tiny_checkpoints["llama"], tmp_path / "trt",
                       BuildOptions(backend="tensorrt", tokens_per_block=4, max_batch_size=4, max_seq_len=128,
                                    kv_cache_blocks=256, timing_cache=str(tmp_path / "tc.bin"))).out
    assert (out / "rank0.engine").is_file() and (tmp_path / "tc.bin").is_file()
    engine = load_engine(out)
    seqs = mixed_seqs(engine.config.vocab_size)
    ref = reference_logits(tiny_checkpoints["llama"], seqs)
    got = run_schedule(engine, seqs, MIXED_PLAN, seed=3)
    assert max_err(ref, got) < 5e-2 * max(float(np.abs(r).max()) for r in ref)


@pytest.mark.gpu
def test_tensorrt_llm_build(tiny_checkpoints, tmp_path):
    from llmc.build.tensorrt_llm import trtllm_status

    ok, reason, _ = trtllm_status()
    if not ok:
        pytest.skip(reason)
    out = build_engine(tiny_checkpoints["llama"], tmp_path / "tl",
                       BuildOptions(backend="tensorrt-llm", max_seq_len=128, max_batch_size=4)).out
    assert any((out / "trtllm").glob("rank0.engine"))
