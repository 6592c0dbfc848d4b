"""Engine config.json: what was built, from what, by which toolchain; and the load-time check.

An engine directory's config.json has
    <checkpoint keys>       the checkpoint config (TensorRT-LLM keys) at top level, with
                            llmc.engine = true (so `load_checkpoint` on an engine dir says so)
    engine                  {format_version, backend, files, graph (GraphSpec), ...}
    build                   resolved BuildOptions
    memory_plan             bytes of weights, KV pool at the max settings, activations
    versions                llmc, onnx, onnxruntime, tensorrt, tensorrt_llm, python, numpy
    source                  {checkpoint: path, sha256: hash of config.json + rank files}
    build_command           the `llmc build ...` line that rebuilds it

`check_compatible` refuses an engine of another format version or one whose toolchain cannot run
here, with a one-line message that includes the rebuild command.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shlex
from pathlib import Path
from typing import Any

from llmc.errors import LlmcError

ENGINE_FORMAT_VERSION = 1
MIN_ONNXRUNTIME = (1, 23)   # standard Attention / RMSNormalization (opset 23) CPU kernels


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def toolchain_versions(tensorrt: bool = False) -> dict[str, str | None]:
    from llmc import __version__

    v = {
        "llmc": __version__,
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "numpy": _version("numpy"),
        "python": platform.python_version(),
        "tensorrt": None,
        "tensorrt_llm": None,
    }
    if tensorrt:
        try:
            import tensorrt as trt  # noqa: F401

            v["tensorrt"] = trt.__version__
        except Exception:
            pass
        v["tensorrt_llm"] = _version("tensorrt_llm") or _version("tensorrt-llm")
    return v


def checkpoint_hash(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 over config.json and every rank*.safetensors, in name order (streamed)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path / "config.json"] + sorted(path.glob("rank*.safetensors"))
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return "sha256:" + h.hexdigest()


def build_command(checkpoint: str | Path, engine_dir: str | Path, options: dict[str, Any]) -> str:
    """The CLI line that rebuilds this engine with the same options."""
    args = ["llmc", "build", str(checkpoint), "-o", str(engine_dir), "--force"]
    defaults = {"backend": "auto", "paged_kv_cache": True, "inflight_batching": True, "dtype": "auto",
                "kv_cache_dtype": "auto", "attention": "auto", "attention_buckets": 3, "trt_opt_level": 3}
    if options.get("backend") and options["backend"] != "auto":
        args += ["--backend", options["backend"]]
    if not options.get("paged_kv_cache", True):
        args.append("--no-paged-kvcache")
    if not options.get("inflight_batching", True):
        args.append("--no-inflight-batching")
    for key in ("tokens_per_block", "max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens",
                "kv_cache_blocks", "dtype", "kv_cache_dtype", "attention", "attention_buckets",
                "trt_opt_level", "timing_cache"):
        val = options.get(key)
        if val is None or defaults.get(key) == val:
            continue
        if key == "tokens_per_block" and not options.get("paged_kv_cache", True):
            continue
        args += [f"--{key.replace('_', '-')}", str(val)]
    return " ".join(shlex.quote(a) for a in args)


def write_engine_config(out_dir: Path, data: dict[str, Any]) -> None:
    (out_dir / "config.json").write_text(json.dumps(data, indent=2, default=str) + "\n")


def read_engine_config(engine_dir: str | Path) -> dict[str, Any]:
    engine_dir = Path(engine_dir)
    if not engine_dir.exists():
        raise LlmcError("no such engine directory", engine_dir)
    path = engine_dir / "config.json"
    if not path.is_file():
        raise LlmcError("not an engine directory (no config.json)", engine_dir)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LlmcError(f"invalid JSON ({exc.msg} at line {exc.lineno})", path) from None
    if not isinstance(data, dict) or "engine" not in data:
        hint = " (this is a checkpoint: build it with `llmc build`)" if isinstance(data, dict) and \
            "architecture" in data else ""
        raise LlmcError(f"not an engine directory{hint}", engine_dir)
    return data


def _ver_tuple(v: str | None) -> tuple[int, ...]:
    out = []
    for part in (v or "0").split(".")[:3]:
        num = "".join(ch for ch in part if ch.isdigit())
        out.append(int(num) if num else 0)
    return tuple(out)


def check_compatible(data: dict[str, Any], engine_dir: str | Path) -> None:
    eng = data.get("engine") or {}
    rebuild = data.get("build_command") or f"llmc build CHECKPOINT -o {engine_dir} --force"
    fmt = eng.get("format_version")
    if fmt != ENGINE_FORMAT_VERSION:
        raise LlmcError(f"engine format version {fmt!r} is not the one this llmc reads "
                        f"({ENGINE_FORMAT_VERSION}); rebuild it: {rebuild}", engine_dir)
    backend = eng.get("backend")
    if backend == "onnxruntime":
        have = _version("onnxruntime")
        if have is None:
            raise LlmcError(f"onnxruntime is not installed; install it or rebuild: {rebuild}", engine_dir)
        if _ver_tuple(have)[:2] < MIN_ONNXRUNTIME:
            raise LlmcError(f"onnxruntime {have} is too old for this engine (needs >= "
                            f"{'.'.join(map(str, MIN_ONNXRUNTIME))}); upgrade or rebuild: {rebuild}", engine_dir)
    elif backend == "tensorrt":
        built = (data.get("versions") or {}).get("tensorrt")
        have = None
        try:
            import tensorrt as trt

            have = trt.__version__
        except Exception:
            pass
        if built and have and have != built:
            raise LlmcError(f"engine was built with TensorRT {built} but TensorRT {have} is installed "
                            f"(TensorRT engines are version-locked); rebuild: {rebuild}", engine_dir)
    elif backend not in ("tensorrt-llm",):
        raise LlmcError(f"unknown engine backend {backend!r}; rebuild: {rebuild}", engine_dir)


ENGINE_KEYS = ("engine", "build", "memory_plan", "versions", "source", "build_command", "tokenizer_files",
               "build_seconds")


def model_config_dict(data: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint config part of an engine config.json."""
    return {k: v for k, v in data.items() if k not in ENGINE_KEYS}
