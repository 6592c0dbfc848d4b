"""Hostile and damaged inputs (issue 10): every stage answers with one line on stderr and exit
code 2, leaves no OUT and no temporary behind, never touches its input, and refuses corrupted
artifacts before producing any output.

Everything runs on the tiny random models of tests/tiny_models.py. Damaged safetensors headers,
GGUF headers and config.json values are generated with hypothesis.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmc.cli.app import main
from test_cli_errors import assert_user_error  # exit 2, one line, no traceback, fragments present

ROOT = Path(__file__).resolve().parents[1]
HYP = settings(max_examples=20, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --- helpers ---------------------------------------------------------------------------------

def cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err.strip()


def tree_hash(path: Path) -> str:
    """Names and contents of every file under `path` (or of the file itself)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def temporaries(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".llmc-tmp-")]


def refused(args, capsys, src: Path, out: Path, *fragments: str) -> str:
    """Run a stage that must be refused: exit 2, one line, SRC untouched, no OUT, no temporary."""
    before = tree_hash(src)
    code, _, err = cli(args, capsys)
    assert_user_error(code, err, *fragments)
    assert tree_hash(src) == before, "the input was modified"
    assert not out.exists(), "an output was left behind"
    assert not temporaries(out.parent)
    return err


def convert_damaged(src: Path, tmp: Path, capsys) -> None:
    """Convert a damaged source: success, or a one-line error; never a traceback, a half-written
    OUT, a temporary or a modified source."""
    out = tmp / "out"
    before = tree_hash(src)
    code, _, err = cli(["convert", src, "-o", out], capsys)
    assert tree_hash(src) == before
    if code != 0:
        assert_user_error(code, err)
        assert not out.exists()
    assert not temporaries(tmp)
    shutil.rmtree(tmp)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def rewrite_checkpoint(src: Path, dst: Path, edit_tensors=None, edit_config=None, restamp: bool = True) -> Path:
    """A copy of checkpoint `src` with its tensors/config edited, re-stamped with fresh digests so
    that the validation under test (not the integrity check) is what sees the damage."""
    from safetensors.torch import load_file

    from llmc.integrity import make_record

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "rank0.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    write_safetensors(dst / "rank0.safetensors", tensors)
    cfg = json.loads((dst / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    if restamp:
        cfg["llmc"]["integrity"] = make_record(dst)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def flip_bytes(path: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for off in rng.sample(range(size), count):
            f.seek(off)
            b = f.read(1)[0]
            f.seek(off)
            f.write(bytes([b ^ (1 << rng.randrange(8))]))


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_src(tiny_hf_dirs, tmp_path_factory) -> Path:
    return tiny_hf_dirs["llama"]


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoints) -> Path:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def engine(ckpt, tmp_path_factory) -> Path:
    from llmc.build import BuildOptions, build_engine

    return build_engine(ckpt, tmp_path_factory.mktemp("eng") / "e",
                        BuildOptions(max_batch_size=4, max_input_len=48, max_seq_len=64, tokens_per_block=16)).out


@pytest.fixture(scope="module")
def qckpt(ckpt, tmp_path_factory) -> Path:
    """A weight-only INT8 (W8A16) checkpoint: no calibration, so it is quick to make."""
    from llmc.quantize import quantize_checkpoint

    return quantize_checkpoint(ckpt, tmp_path_factory.mktemp("q") / "w8", "int8_wo", progress=False).out


@pytest.fixture(scope="module")
def q4ckpt(ckpt, tmp_path_factory) -> Path:
    from llmc.quantize import quantize_checkpoint

    return quantize_checkpoint(ckpt, tmp_path_factory.mktemp("q") / "w4", "int4_wo", progress=False).out


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# =============================================================================================
# 1. Data loss: OUT overlapping SRC, --force semantics, recipe names
# =============================================================================================

@pytest.mark.parametrize("relation", ["equal", "inside", "ancestor"])
@pytest.mark.parametrize("force", [False, True])
def test_convert_out_overlapping_src_is_refused(relation, force, hf_src, tmp_path, capsys):
    models = tmp_path / "models"
    src = copy_of(hf_src, models / "mine")
    (models / "other").mkdir()
    (models / "other" / "notes.txt").write_text("unrelated sibling")
    out = {"equal": src, "inside": src / "sub", "ancestor": models}[relation]
    before_models = tree_hash(models)
    code, _, err = cli(["convert", src, "-o", out, *(["--force"] if force else [])], capsys)
    assert_user_error(code, err, str(out), str(src))
    assert tree_hash(models) == before_models
    assert not temporaries(models) and not temporaries(src)


@pytest.mark.parametrize("stage", ["quantize", "build"])
@pytest.mark.parametrize("relation", ["equal", "inside", "ancestor"])
def test_quantize_and_build_out_overlapping_src_is_refused(stage, relation, ckpt, tmp_path, capsys):
    src = copy_of(ckpt, tmp_path / "models" / "ck")
    out = {"equal": src, "inside": src / "sub", "ancestor": src.parent}[relation]
    extra = ["--qformat", "int8_wo"] if stage == "quantize" else []
    before = tree_hash(src.parent)
    code, _, err = cli([stage, src, "-o", out, "--force", *extra], capsys)
    assert_user_error(code, err, str(out), str(src))
    assert tree_hash(src.parent) == before
    assert not temporaries(src.parent)


def test_force_replaces_only_llmc_artifacts_of_the_same_kind(hf_src, ckpt, engine, tmp_path, capsys):
    # a user's directory: refused with or without --force, untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for force in ([], ["--force"]):
        code, _, err = cli(["convert", hf_src, "-o", mine, *force], capsys)
        assert_user_error(code, err, "--force only replaces")
        assert (mine / "thesis.tex").read_text() == "years of work"
    # an engine is not a checkpoint: convert --force refuses to replace it
    eng = copy_of(engine, tmp_path / "eng")
    before = tree_hash(eng)
    code, _, err = cli(["convert", hf_src, "-o", eng, "--force"], capsys)
    assert_user_error(code, err, "llmc engine, not an llmc checkpoint")
    assert tree_hash(eng) == before
    # ... and build --force refuses to replace a checkpoint
    ck = copy_of(ckpt, tmp_path / "ck")
    code, _, err = cli(["build", ckpt, "-o", ck, "--force"], capsys)
    assert_user_error(code, err, "llmc checkpoint, not an llmc engine")
    # an empty directory and a previous checkpoint are replaced
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["convert", hf_src, "-o", empty], capsys)[0] == 0
    assert cli(["convert", hf_src, "-o", ck, "--force"], capsys)[0] == 0
    assert not temporaries(tmp_path)


def test_recipe_names_are_plain_names(tmp_path):
    from llmc.errors import LlmcError
    from llmc.recipes.schema import load_recipe, parse_recipe

    base = load_recipe("default").model_dump()
    for name in ["../../victim", "/abs/victim", "a/b", "..", ".hidden", "", "x" * 200, "a\\b", "name\n"]:
        with pytest.raises(LlmcError, match="name: must be a plain name"):
            parse_recipe({**base, "name": name}, "r.yaml")
    assert parse_recipe({**base, "name": "smollm2-int8_sq.v2"}, "r.yaml").name == "smollm2-int8_sq.v2"


def test_pipeline_outputs_stay_inside_the_work_dir(tmp_path):
    from llmc.errors import LlmcError
    from llmc.recipes.pipeline import output_under

    wd = tmp_path / "work"
    wd.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "checkpoint").mkdir()
    (wd / "checkpoint").symlink_to(victim / "checkpoint")
    with pytest.raises(LlmcError, match="outside the work dir"):
        output_under(wd, "checkpoint")
    with pytest.raises(LlmcError, match="outside the work dir"):
        output_under(wd, "../victim")
    assert output_under(wd, "engine") == wd / "engine"


def test_pipeline_refuses_to_replace_a_directory_llmc_did_not_write(hf_src, tmp_path, capsys):
    wd = tmp_path / "work"
    (wd / "checkpoint").mkdir(parents=True)
    (wd / "checkpoint" / "precious.txt").write_text("mine")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "t", "model": str(hf_src), "eval": None,
                                  "run": {"prompts": ["hi"], "max_new_tokens": 2, "chat": False}}))
    code, _, err = cli(["pipeline", recipe, "-o", wd], capsys)
    assert_user_error(code, err, "not an llmc checkpoint")
    assert (wd / "checkpoint" / "precious.txt").read_text() == "mine"


# =============================================================================================
# 2. Hangs and tracebacks
# =============================================================================================

@pytest.mark.parametrize("args,fragment", [
    (["--concurrency", "0"], "--concurrency must be >= 1"),
    (["--concurrency", "-3"], "--concurrency must be >= 1"),
    (["--request-rate", "-1"], "--request-rate must be a positive"),
    (["--request-rate", "0"], "--request-rate must be a positive"),
    (["--request-rate", "nan"], "--request-rate must be a positive"),
    (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
    (["--prefill-budget", "0"], "--prefill-budget must be >= 1"),
    (["--kv-cache-mb", "-5"], "--kv-cache-mb must be a positive"),
    (["--sweep", "max-batch-size=2,0"], "must be >= 1"),
    (["--input-len", "600:700", "--num-requests", "2"], "max_input_len 48"),
])
def test_bench_bad_options(args, fragment, engine, capsys):
    code, _, err = cli(["bench", engine, *args], capsys)
    assert_user_error(code, err, fragment)


def _convert_with_config(hf_src: Path, tmp_path: Path, capsys, edit) -> tuple[int, str, Path]:
    src = tmp_path / "src"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(hf_src, src)
    cfg = json.loads((src / "config.json").read_text())
    new = edit(cfg)
    (src / "config.json").write_text(json.dumps(cfg if new is None else new))
    out = tmp_path / "out"
    before = tree_hash(src)
    code, _, err = cli(["convert", src, "-o", out], capsys)
    assert tree_hash(src) == before
    assert not temporaries(tmp_path)
    return code, err, out


@pytest.mark.parametrize("edit,fragment", [
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads (0) must be positive"),
    (lambda c: [c], "must hold a JSON object, not a list"),
    (lambda c: "llama", "must hold a JSON object"),
    (lambda c: c.update(num_hidden_layers=1), "num_hidden_layers is 1 but the weights hold 2"),
    (lambda c: c.update(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
    (lambda c: c.update(num_hidden_layers=-1), "num_hidden_layers must be a positive integer"),
    (lambda c: c.update(num_hidden_layers=3), "num_hidden_layers is 3 but the weights hold 2"),
    (lambda c: c.update(num_hidden_layers=10**12), "weights hold 2"),
    (lambda c: c.update(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (lambda c: c.update(hidden_size="wide"), "lacks or mangles"),
    (lambda c: c.update(architectures=[5]), "unsupported architecture"),
    (lambda c: c.update(rms_norm_eps=float("nan")), "norm_epsilon must be a positive number"),
])
def test_convert_damaged_config(edit, fragment, hf_src, tmp_path, capsys):
    code, err, out = _convert_with_config(hf_src, tmp_path, capsys, edit)
    assert_user_error(code, err, fragment)
    assert not out.exists()


def test_convert_weights_with_unused_tensors_are_refused(hf_src, tmp_path, capsys):
    from safetensors.torch import load_file

    src = copy_of(hf_src, tmp_path / "src")
    t = load_file(str(src / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(128)  # config says attention_bias: false
    write_safetensors(src / "model.safetensors", t)
    refused(["convert", src, "-o", tmp_path / "out"], capsys, src, tmp_path / "out",
            "left unused", "q_proj.bias")


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) |
                     st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                     max_leaves=6)
CONFIG_KEYS = ["architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "rope_scaling", "head_dim", "tie_word_embeddings", "hidden_act", "torch_dtype", "model_type"]


@HYP
@given(key=st.sampled_from(CONFIG_KEYS), value=_JSON)
def test_convert_hypothesis_config_values(key, value, hf_src, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("cfg")
    code, err, out = _convert_with_config(hf_src, tmp, capsys, lambda c: c.update({key: value}))
    if code != 0:
        assert_user_error(code, err)
        assert not out.exists()
    shutil.rmtree(tmp)


@HYP
@given(data=st.data(), mode=st.sampled_from(["length", "flip", "truncate", "json"]))
def test_convert_hypothesis_safetensors_headers(data, mode, hf_src, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("st")
    src = copy_of(hf_src, tmp / "src")
    f = src / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = raw[8:8 + n], raw[8 + n:]
    if mode == "length":
        n2 = data.draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(max(0, n - 64), n + 64)))
        raw = struct.pack("<Q", n2) + raw[8:]
    elif mode == "flip":
        pos = data.draw(st.lists(st.integers(0, len(header) - 1), min_size=1, max_size=8))
        h = bytearray(header)
        for p in pos:
            h[p] = data.draw(st.integers(0, 255))
        raw = raw[:8] + bytes(h) + body
    elif mode == "truncate":
        raw = raw[:data.draw(st.integers(0, 8 + n + 16))]
    else:
        obj = data.draw(st.dictionaries(st.sampled_from(list(json.loads(header))[:6] + ["x"]), _JSON, max_size=4))
        h = json.dumps(obj).encode()
        raw = struct.pack("<Q", len(h)) + h + body
    f.write_bytes(raw)
    convert_damaged(src, tmp, capsys)


# --- GGUF ------------------------------------------------------------------------------------

GGUF_META = {"vocab_size": 320, "block_count": 2, "context_length": 512, "embedding_length": 128, "feed_forward_length": 256,
             "attention.head_count": 4, "attention.head_count_kv": 2, "attention.layer_norm_rms_epsilon": 1e-5}


def write_tiny_gguf(path: Path, drop: tuple[str, ...] = ()) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in GGUF_META.items():
        if key in drop:
            continue
        full = f"llama.{key}"
        if isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_uint32(full, value)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (320, 128), "output_norm.weight": (128,), "output.weight": (320, 128)}
    for i in range(2):
        shapes.update({f"blk.{i}.attn_norm.weight": (128,), f"blk.{i}.ffn_norm.weight": (128,),
                       f"blk.{i}.attn_q.weight": (128, 128), f"blk.{i}.attn_k.weight": (64, 128),
                       f"blk.{i}.attn_v.weight": (64, 128), f"blk.{i}.attn_output.weight": (128, 128),
                       f"blk.{i}.ffn_gate.weight": (256, 128), f"blk.{i}.ffn_up.weight": (256, 128),
                       f"blk.{i}.ffn_down.weight": (128, 256)})
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("drop", ["attention.head_count", "embedding_length", "block_count"])
def test_gguf_missing_metadata(drop, tmp_path, capsys):
    src = write_tiny_gguf(tmp_path / "m.gguf", drop=(drop,))
    refused(["convert", src, "-o", tmp_path / "out"], capsys, src, tmp_path / "out", f"lacks llama.{drop}")


@HYP
@given(data=st.data())
def test_convert_hypothesis_gguf_headers(data, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("gguf")
    src = write_tiny_gguf(tmp / "m.gguf")
    raw = bytearray(src.read_bytes())
    head = min(len(raw), 1024)  # magic, version, counts and the metadata key/values
    for p in data.draw(st.lists(st.integers(0, head - 1), min_size=1, max_size=6)):
        raw[p] = data.draw(st.integers(0, 255))
    src.write_bytes(bytes(raw))
    convert_damaged(src, tmp, capsys)


# --- read-only file system and full disk (real mounts in a private mount namespace) ------------

def _in_mount_namespace(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory) -> bool:
    d = tmp_path_factory.mktemp("probe")
    if shutil.which("unshare") is None:
        return False
    r = _in_mount_namespace(f"mount -t tmpfs -o size=64k none {d} && touch {d}/x")
    return r.returncode == 0


def test_convert_to_read_only_and_full_file_systems(can_mount, hf_src, tmp_path):
    if not can_mount:
        pytest.skip("cannot create a private mount namespace here (unshare -m)")
    llmc = f"{sys.executable} -m llmc.cli.app"
    ro, small, tight = tmp_path / "ro", tmp_path / "small", tmp_path / "tight"
    for d in (ro, small, tight):
        d.mkdir()
    before = tree_hash(hf_src)
    # params of the tiny llama in fp32, as convert estimates them
    need = 4 * (2 * 320 * 128 + 128 + 2 * (2 * 128 + 256 * 128 + 128 * 128 + 3 * 256 * 128))
    r = _in_mount_namespace(
        f"mount -t tmpfs -o ro,size=8m none {ro} && mount -t tmpfs -o size=256k none {small} && "
        f"mount -t tmpfs -o size={need + 4096} none {tight} && "
        f"{llmc} convert {hf_src} -o {ro}/out; echo rc=$?; "
        f"{llmc} convert {hf_src} -o {small}/out; echo rc=$?; "
        f"{llmc} convert {hf_src} -o {tight}/out; echo rc=$?; echo left=$(find {ro} {small} {tight} -mindepth 1 | wc -l)")
    errs = [line for line in r.stderr.splitlines() if line.strip()]
    assert [line for line in r.stdout.splitlines() if line.startswith("rc=")] == ["rc=2"] * 3, r.stdout + r.stderr
    assert len(errs) == 3 and "Traceback" not in r.stderr, r.stderr
    assert "read-only file system" in errs[0]
    assert "not enough free space" in errs[1] and "needs about 1.4 MiB" in errs[1] and "256.0 KiB free" in errs[1]
    assert "no space left on the device" in errs[2] and "before the disk filled" in errs[2]
    assert "the output needs about 1.4 MiB plus metadata" in errs[2] and "MiB was free" in errs[2]
    assert "left=0" in r.stdout  # nothing left on any of the file systems
    assert tree_hash(hf_src) == before


# --- build -----------------------------------------------------------------------------------

def _drop(name):
    return lambda t: t.pop(name)


def _set(name, fn):
    def edit(t):
        t[name] = fn(t[name])
    return edit


@pytest.mark.parametrize("edit_t,edit_c,fragment", [
    (_drop("transformer.vocab_embedding.weight"), None, "missing tensor transformer.vocab_embedding.weight"),
    (None, lambda c: c.update(num_hidden_layers=-1), "num_hidden_layers must be a positive integer"),
    (None, lambda c: c.update(num_hidden_layers=10**12), "weights hold 2 layer(s)"),
    (None, lambda c: c.update(quantization=5), "quantization is not an object"),
    (_set("transformer.layers.1.mlp.fc.weight", lambda w: w * float("nan")), None, "holds NaN or Inf"),
    (_set("transformer.ln_f.weight", lambda w: w.to(torch.int8)), None, "must stay float"),
    (_set("transformer.layers.0.attention.dense.weight", lambda w: w[:, :64]), None, "has shape"),
])
def test_build_damaged_float_checkpoint(edit_t, edit_c, fragment, ckpt, tmp_path, capsys):
    src = rewrite_checkpoint(ckpt, tmp_path / "ck", edit_t, edit_c)
    refused(["build", src, "-o", tmp_path / "e"], capsys, src, tmp_path / "e", fragment)


def test_build_tokens_per_block_larger_than_max_seq_len(ckpt, tmp_path, capsys):
    refused(["build", ckpt, "-o", tmp_path / "e", "--max-seq-len", "64", "--tokens-per-block", "128"], capsys,
            ckpt, tmp_path / "e", "--tokens-per-block 128 exceeds --max-seq-len 64")


W8 = "transformer.layers.0.attention.qkv"


@pytest.mark.parametrize("edit_t,fragment", [
    (_set(W8 + ".weight", lambda w: w.to(torch.int32)), "dtype torch.int32; W8A16 stores int8"),
    (_set(W8 + ".weight", lambda w: w.view(torch.uint8)), "W8A16 stores int8"),
    (_set(W8 + ".weight", lambda w: w[:-1]), "has shape"),
    (_set(W8 + ".weights_scaling_factor", lambda s: s * float("nan")), "NaN, Inf, zero or negative"),
    (_set(W8 + ".weights_scaling_factor", lambda s: s * float("inf")), "NaN, Inf, zero or negative"),
    (_set(W8 + ".weights_scaling_factor", lambda s: s * 0), "NaN, Inf, zero or negative"),
    (_set(W8 + ".weights_scaling_factor", lambda s: -s), "NaN, Inf, zero or negative"),
    (_set(W8 + ".weights_scaling_factor", lambda s: s[:3]), "3 values for"),
    (_set(W8 + ".weights_scaling_factor", lambda s: s.to(torch.int8)), "expected a float dtype"),
    (_drop(W8 + ".weights_scaling_factor"), "is missing"),
    (_set("transformer.layers.0.input_layernorm.weight", lambda w: w.to(torch.int8)), "must stay float"),
])
def test_build_damaged_int8_checkpoint(edit_t, fragment, qckpt, tmp_path, capsys):
    src = rewrite_checkpoint(qckpt, tmp_path / "q", edit_t)
    refused(["build", src, "-o", tmp_path / "e"], capsys, src, tmp_path / "e", fragment)


def test_build_zero_points_on_an_algo_without_them(qckpt, tmp_path, capsys):
    src = rewrite_checkpoint(qckpt, tmp_path / "q", None, lambda c: c["quantization"].update(has_zero_point=True))
    refused(["build", src, "-o", tmp_path / "e"], capsys, src, tmp_path / "e", "W8A16 carries no zero points")


W4P = "transformer.layers.0.mlp.proj"  # input width 256: two groups of 128


@pytest.mark.parametrize("edit_t,edit_c,fragment", [
    (_set(W8 + ".weight", lambda w: w.view(torch.float8_e4m3fn)), None, "W4A16_AWQ stores"),
    (_set(W4P + ".weights_scaling_factor", lambda s: s[:, :1]), None, "group size"),
    (None, lambda c: c["quantization"].update(group_size=0), "group size"),
    (_set(W8 + ".weights_scaling_factor", lambda s: torch.where(s > s.median(), -s, s)), None, "negative"),
    (None, lambda c: c["quantization"].update(has_zero_point=True), ".zero is missing"),
])
def test_build_damaged_int4_checkpoint(edit_t, edit_c, fragment, q4ckpt, tmp_path, capsys):
    src = rewrite_checkpoint(q4ckpt, tmp_path / "q", edit_t, edit_c)
    refused(["build", src, "-o", tmp_path / "e"], capsys, src, tmp_path / "e", fragment)


# --- run -------------------------------------------------------------------------------------

def test_run_prompts_file_not_utf8(engine, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_bytes("first\nsecond caf\xe9\n".encode("latin-1"))
    code, out, err = cli(["run", engine, "--prompts-file", f], capsys)
    assert_user_error(code, err, "line 2 is not UTF-8", "0xe9")
    assert out == ""


def test_run_prompts_file_numbered_by_line(engine, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("alpha\n\nbeta\n   \ngamma\n")
    code, out, err = cli(["run", engine, "--prompts-file", f, "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    assert "skipped 2 empty line(s): 2, 4" in err
    assert "Input [0]: alpha" in out and "Input [2]: beta" in out and "Input [4]: gamma" in out
    assert "Output [4]" in out and "Input [1]" not in out


@pytest.mark.parametrize("args,fragment", [
    (["--seed", "-1"], "seed"),
    (["--kv-cache-mb", "-1"], "--kv-cache-mb must be a positive"),
    (["--kv-cache-mb", "nan"], "--kv-cache-mb must be a positive"),
])
def test_run_bad_options(args, fragment, engine, capsys):
    code, _, err = cli(["run", engine, "-p", "hi", "--max-new-tokens", "2", *args], capsys)
    assert_user_error(code, err, fragment)


def test_run_huge_kv_cache_is_capped_or_refused(engine, capsys):
    code, _, err = cli(["run", engine, "-p", "hi", "--max-new-tokens", "2", "--kv-cache-mb", "1e12"], capsys)
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 2:
        assert_user_error(code, err, "kv")


def _greedy_text(engine: Path, prompt: str, n: int) -> str:
    from llmc.runtime.llm import LLM
    from llmc.runtime.sampling import SamplingParams

    return LLM(engine).generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))[0].text


@pytest.mark.parametrize("stream,others", [(False, []), (True, []), (False, ["x", "a longer second prompt"])])
def test_run_stop_string_ending_the_last_request(stream, others, engine):
    """The stop string ends the last running request: run must finish (no KeyError, no hang)."""
    text = _greedy_text(engine, "Count: 1, 2, 3,", 12)
    stop = text[4:7] if len(text.strip()) >= 7 else text[-2:]
    prompts = [a for p in ["Count: 1, 2, 3,", *others] for a in ("-p", p)]
    args = [sys.executable, "-m", "llmc.cli.app", "run", str(engine), *prompts,
            "--stop", stop, "--max-new-tokens", "12", *(["--stream"] if stream else [])]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert all(f"Output [{i}]" in r.stdout for i in range(1 + len(others)))


# --- damaged engine config.json: run, inspect, eval --------------------------------------------

def _damaged_engine(engine: Path, dst: Path, edit) -> Path:
    shutil.copytree(engine, dst)
    cfg = json.loads((dst / "config.json").read_text())
    new = edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg if new is None else new))
    return dst


ENGINE_DAMAGE = [
    (lambda c: {"engine": 5}, "damaged engine config.json"),
    (lambda c: c.pop("build") and None, "no 'build' block"),
    (lambda c: c["build"].update(max_seq_len=1e400), "build.max_seq_len must be a positive integer"),
    (lambda c: c["build"].update(tokens_per_block=0), "build.tokens_per_block must be a positive integer"),
    (lambda c: c["engine"].update(graph=None), "engine.graph is not an object"),
    (lambda c: c["engine"]["graph"].update(num_buckets=10**9), "bucket kinds"),
    (lambda c: c.update(num_hidden_layers=10**9), "num_layers"),
    (lambda c: c["engine"].update(kv_cache_dtype="int3"), "kv_cache_dtype"),
    (lambda c: c["engine"].update(matmul_accuracy="fp16"), "matmul_accuracy"),
    (lambda c: c.update(integrity=[1, 2]), "integrity record is not valid"),
]


@pytest.mark.parametrize("edit,fragment", ENGINE_DAMAGE)
def test_damaged_engine_config(edit, fragment, engine, tmp_path, capsys):
    bad = _damaged_engine(engine, tmp_path / "bad", edit)
    data = tmp_path / "t.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    for args in (["run", bad, "-p", "hi", "--max-new-tokens", "2"], ["inspect", bad], ["inspect", bad, "--verify"],
                 ["eval", bad, "--data", data, "--seq-len", "32", "--max-chunks", "1"]):
        code, out, err = cli(args, capsys)
        assert_user_error(code, err, fragment)
        assert "Output" not in out and "perplexity" not in out


ENGINE_FIELDS = [("engine", "backend"), ("engine", "format_version"), ("engine", "compute_dtype"),
                 ("engine", "matmul_accuracy"),
                 ("engine", "kv_cache_dtype"), ("engine", "graph"), ("build", "max_batch_size"),
                 ("build", "max_input_len"), ("build", "max_seq_len"), ("build", "max_num_tokens"),
                 ("build", "tokens_per_block"), ("build", "kv_cache_blocks"), ("build", "paged_kv_cache"),
                 ("graph", "num_buckets"), ("graph", "block_size"), ("graph", "num_kv_heads"),
                 ("graph", "head_dim"), ("graph", "kv_pool_onnx_type"), ("graph", "bucket_kinds"),
                 ("graph", "attention"), ("graph", "num_layers"), (None, "vocab_size"),
                 (None, "num_hidden_layers"), (None, "hidden_size"), (None, "llmc"), (None, "versions"),
                 (None, "integrity"), (None, "build_command")]


def _set_field(cfg: dict, where: str | None, key: str, value) -> None:
    block = cfg if where is None else cfg["engine"]["graph"] if where == "graph" else cfg[where]
    block[key] = value


@HYP
@given(field=st.sampled_from(ENGINE_FIELDS), value=_JSON)
def test_run_hypothesis_engine_config_values(field, value, engine, tmp_path_factory, capsys):
    """A damaged engine config.json: run either works or fails with one line, before any output."""
    tmp = tmp_path_factory.mktemp("ecfg")
    bad = _damaged_engine(engine, tmp / "e", lambda c: _set_field(c, *field, value))
    code, out, err = cli(["run", bad, "-p", "hi", "--max-new-tokens", "2"], capsys)
    if code != 0:
        assert_user_error(code, err)
        assert "Output" not in out
    shutil.rmtree(tmp)


CKPT_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "head_size", "max_position_embeddings", "norm_epsilon", "rotary_base",
               "rotary_scaling", "dtype", "mapping", "quantization", "tie_word_embeddings", "attn_bias",
               "architecture", "llmc"]


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(key=st.sampled_from(CKPT_FIELDS), value=_JSON)
def test_build_hypothesis_checkpoint_config_values(key, value, ckpt, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("ccfg")
    src = copy_of(ckpt, tmp / "ck")
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    before = tree_hash(src)
    code, _, err = cli(["build", src, "-o", tmp / "e", "--max-seq-len", "64", "--tokens-per-block", "16"], capsys)
    assert tree_hash(src) == before
    if code != 0:
        assert_user_error(code, err)
        assert not (tmp / "e").exists()
    assert not temporaries(tmp)
    shutil.rmtree(tmp)


# =============================================================================================
# 3. Integrity
# =============================================================================================

@pytest.mark.parametrize("flips", [64, 2000])
@pytest.mark.parametrize("seed", [0, 1])
def test_flipped_bytes_in_engine_weights_are_refused_before_output(flips, seed, engine, tmp_path, capsys):
    bad = copy_of(engine, tmp_path / "bad")
    flip_bytes(bad / "model.onnx.data", flips, seed)
    code, out, err = cli(["run", bad, "-p", "hello", "--max-new-tokens", "4"], capsys)
    assert_user_error(code, err, "model.onnx.data is damaged", "rebuild")
    assert out == ""
    code, out, err = cli(["inspect", bad, "--verify"], capsys)
    assert_user_error(code, err, "model.onnx.data is damaged")


def test_truncated_or_missing_engine_files_are_refused(engine, tmp_path, capsys):
    bad = copy_of(engine, tmp_path / "bad")
    with open(bad / "model.onnx.data", "r+b") as f:
        f.truncate(1000)
    code, out, err = cli(["inspect", bad], capsys)  # sizes are checked even without --verify
    assert_user_error(code, err, "model.onnx.data is damaged", "1,000 bytes")
    (bad / "tokenizer.json").unlink()
    code, out, err = cli(["run", bad, "-p", "x"], capsys)
    assert_user_error(code, err, "model.onnx.data is damaged")
    shutil.copy(engine / "model.onnx.data", bad / "model.onnx.data")
    code, out, err = cli(["run", bad, "-p", "x"], capsys)
    assert_user_error(code, err, "missing file tokenizer.json")


def test_healthy_engine_verifies(engine, capsys):
    code, out, err = cli(["inspect", engine, "--verify", "--json"], capsys)
    assert code == 0, err
    assert "verified" in json.loads(out)["integrity"]


def test_flipped_bytes_in_checkpoint_are_refused(ckpt, tmp_path, capsys):
    bad = copy_of(ckpt, tmp_path / "bad")
    flip_bytes(bad / "rank0.safetensors", 64, 3)
    for args in (["build", bad, "-o", tmp_path / "e"], ["quantize", bad, "-o", tmp_path / "q", "--qformat", "int8_wo"],
                 ["inspect", bad]):
        code, _, err = cli(args, capsys)
        assert_user_error(code, err, "rank0.safetensors is damaged")
    assert not (tmp_path / "e").exists() and not (tmp_path / "q").exists()


def test_engine_from_another_version_warns_naming_both(engine, tmp_path, capsys):
    import onnxruntime

    import llmc

    other = _damaged_engine(engine, tmp_path / "old", lambda c: c["versions"].update(llmc="0.0.1", onnxruntime="1.0.0"))
    code, out, err = cli(["run", other, "-p", "hi", "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    assert f"llmc 0.0.1, this is llmc {llmc.__version__}" in err
    assert f"onnxruntime 1.0.0, this is onnxruntime {onnxruntime.__version__}" in err


# =============================================================================================
# 4. Temporaries: stale ones of dead processes are removed; SIGTERM and SIGKILL at random moments
# =============================================================================================

def test_stale_temporaries_of_dead_processes_are_removed(hf_src, tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        stale = tmp_path / f".llmc-tmp-out-{dead.pid}-deadbeef"
        stale_old = tmp_path / f".llmc-tmp-out-old-{dead.pid}-0badf00d"
        live = tmp_path / f".llmc-tmp-out-{alive.pid}-cafebabe"
        other = tmp_path / f".llmc-tmp-other-{dead.pid}-deadbeef"
        for d in (stale, stale_old, live, other):
            d.mkdir()
            (d / "rank0.safetensors").write_bytes(b"x" * 1000)
        assert cli(["convert", hf_src, "-o", tmp_path / "out"], capsys)[0] == 0
        assert not stale.exists() and not stale_old.exists()
        assert live.exists(), "a running process's temporary must be left alone"
        assert other.exists(), "only OUT's own temporaries are touched"
    finally:
        alive.kill()
        alive.wait()


def test_failed_final_rename_keeps_the_previous_artifact(hf_src, tmp_path, monkeypatch):
    """A failure between moving the old OUT aside and renaming the new one in restores the old."""
    import errno

    import llmc.fsutil as fsutil
    from llmc.converters.convert import convert
    from llmc.errors import LlmcError

    out = convert(hf_src, tmp_path / "out", progress=False).out
    before = tree_hash(out)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".llmc-tmp-out-") and "-old-" not in Path(src).name:
            raise OSError(errno.EACCES, "Permission denied", str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(fsutil.os, "rename", rename)
    with pytest.raises(LlmcError, match="permission denied"):
        convert(hf_src, out, force=True, progress=False)
    assert tree_hash(out) == before
    assert temporaries(tmp_path) == []


STAGES = {
    "convert": lambda src, ck, out: ["convert", src, "-o", out],
    "quantize": lambda src, ck, out: ["quantize", ck, "-o", out, "--qformat", "int8_wo"],
    "build": lambda src, ck, out: ["build", ck, "-o", out, "--max-seq-len", "64", "--tokens-per-block", "16"],
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigterm_and_sigkill_at_random_moments_then_rerun(stage, hf_src, ckpt, tmp_path):
    """Kill the stage while it writes (or before), several seeds: SIGTERM removes its own
    temporary at once; a SIGKILLed one is removed by the next run, which succeeds."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "llmc.cli.app", *map(str, STAGES[stage](hf_src, ckpt, out))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    src_hash = tree_hash(hf_src if stage == "convert" else ckpt)
    for seed, sig in [(0, signal.SIGTERM), (1, signal.SIGKILL), (2, signal.SIGTERM), (3, signal.SIGKILL)]:
        rng = random.Random(seed)
        p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        early = rng.random() < 0.25  # sometimes before anything is written
        while not early and not temporaries(tmp_path) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05 if not early else 1.0))
        if p.poll() is None:
            p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        if sig == signal.SIGTERM:
            assert "Traceback" not in err, err
            assert p.returncode in (0, 143, -signal.SIGTERM), (p.returncode, err)
            assert not temporaries(tmp_path), "SIGTERM must remove the temporary"
        if out.exists():  # it finished before the signal: start the next round from nothing
            shutil.rmtree(out)
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").is_file()
    assert temporaries(tmp_path) == []
    assert tree_hash(hf_src if stage == "convert" else ckpt) == src_hash


# =============================================================================================
# 5. Calibration and evaluation text
# =============================================================================================

def test_text_decoding_warns_or_refuses(tmp_path, capsys):
    from llmc.errors import LlmcError
    from llmc.text import load_documents

    latin = tmp_path / "latin.txt"
    latin.write_bytes(("Caf\xe9 cr\xe8me, na\xefve fa\xe7ade. " * 50).encode("latin-1"))
    docs, _ = load_documents(latin)
    err = capsys.readouterr().err
    assert "warning:" in err and "200 of" in err and "200 invalid bytes replaced" in err
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"plain text\x00 with a few\x00 NULs " * 40)
    docs, _ = load_documents(nul)
    assert "\x00" not in docs[0] and "80 NUL/control characters dropped" in capsys.readouterr().err
    binary = tmp_path / "blob.txt"
    binary.write_bytes(random.Random(0).randbytes(20000))
    with pytest.raises(LlmcError, match="mostly not text"):
        load_documents(binary)
    ok = tmp_path / "ok.txt"
    ok.write_text("Tout est bien: \ufffd is a real character here. " * 10)
    load_documents(ok)
    assert capsys.readouterr().err == ""


def test_quantize_and_eval_refuse_binary_text_and_long_windows(ckpt, engine, tmp_path, capsys):
    blob = tmp_path / "blob.txt"
    blob.write_bytes(random.Random(1).randbytes(20000))
    refused(["quantize", ckpt, "-o", tmp_path / "q", "--qformat", "int8_sq", "--calib-data", blob], capsys,
            ckpt, tmp_path / "q", "mostly not text")
    refused(["quantize", ckpt, "-o", tmp_path / "q", "--qformat", "int8_sq", "--calib-seq-len", "4096"], capsys,
            ckpt, tmp_path / "q", "--calib-seq-len 4096 exceeds the model's max_position_embeddings (512)")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    code, _, err = cli(["eval", ckpt, "--data", blob], capsys)
    assert_user_error(code, err, "mostly not text")
    code, _, err = cli(["eval", ckpt, "--data", text, "--seq-len", "1024"], capsys)
    assert_user_error(code, err, "exceeds the model's max_position_embeddings (512)")
    code, _, err = cli(["eval", engine, "--data", text, "--seq-len", "128"], capsys)
    assert_user_error(code, err, "exceeds the engine's max_seq_len (64)")


# =============================================================================================
# 6. The preemption guarantee (kept in the suite)
# =============================================================================================

def test_200_random_requests_under_a_one_sequence_pool(engine):
    """A pool of exactly one max-length sequence: 200 requests of random lengths all finish with
    exactly their token counts, and greedy outputs equal running each request alone."""
    from llmc.runtime.llm import LLM
    from llmc.runtime.sampling import SamplingParams

    rng = random.Random(0)
    max_seq, max_in = 64, 48
    prompts, news = [], []
    for _ in range(200):
        n = rng.randint(1, max_in)
        prompts.append([rng.randrange(256) for _ in range(n)])
        news.append(rng.randint(1, max_seq - n))
    one_seq = -(-max_seq // 16)
    llm = LLM(engine, num_blocks=one_seq)
    outs = llm.generate(prompts, [SamplingParams(max_new_tokens=k, ignore_eos=True) for k in news])
    assert [len(o.output_token_ids) for o in outs] == news
    assert all(o.error is None for o in outs)
    assert sum(o.num_preemptions for o in outs) > 0, "a one-sequence pool must preempt"
    assert llm.block_manager.num_used_blocks == 0
    alone = LLM(engine, num_blocks=one_seq)
    for p, k, o in zip(prompts, news, outs):
        ref = alone.generate([p], SamplingParams(max_new_tokens=k, ignore_eos=True))[0].output_token_ids
        assert o.output_token_ids == ref
