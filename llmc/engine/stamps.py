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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmc.checkpoint.config import CheckpointConfig
from llmc.errors import LlmcError
from llmc.fsutil import read_json
from llmc.versions import installed_version, version_tuple

ENGINE_FORMAT_VERSION = 1
MIN_ONNXRUNTIME = (1, 23)   # standard Attention / RMSNormalization (opset 23) CPU kernels


def toolchain_versions(tensorrt: bool = False) -> dict[str, str | None]:
    from llmc import __version__

    v = {
        "llmc": __version__,
        "onnx": installed_version("onnx"),
        "onnxruntime": installed_version("onnxruntime"),
        "numpy": installed_version("numpy"),
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
        v["tensorrt_llm"] = installed_version("tensorrt_llm") or installed_version("tensorrt-llm")
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
                "kv_cache_dtype": "auto", "attention": "auto", "attention_buckets": 3, "trt_opt_level": 3,
                "lm_head": "auto", "matmul_accuracy": "int8"}
    if options.get("backend") and options["backend"] != "auto":
        args += ["--backend", options["backend"]]
    if not options.get("paged_kv_cache", True):
        args.append("--no-paged-kvcache")
    if not options.get("inflight_batching", True):
        args.append("--no-inflight-batching")
    for key in ("tokens_per_block", "max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens",
                "kv_cache_blocks", "dtype", "kv_cache_dtype", "attention", "attention_buckets",
                "lm_head", "matmul_accuracy", "trt_opt_level", "timing_cache"):
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
    data = read_json(path)
    if not isinstance(data, dict) or "engine" not in data:
        hint = " (this is a checkpoint: build it with `llmc build`)" if isinstance(data, dict) and \
            "architecture" in data else ""
        raise LlmcError(f"not an engine directory{hint}", engine_dir)
    return data


def check_compatible(data: dict[str, Any], engine_dir: str | Path) -> None:
    rebuild = data.get("build_command") or f"llmc build CHECKPOINT -o {engine_dir} --force"
    eng = data.get("engine")
    if not isinstance(eng, dict):
        raise LlmcError(f"damaged engine config.json: 'engine' is not an object; rebuild it: {rebuild}", engine_dir)
    fmt = eng.get("format_version")
    if fmt != ENGINE_FORMAT_VERSION:
        raise LlmcError(f"engine format version {fmt!r} is not the one this llmc reads "
                        f"({ENGINE_FORMAT_VERSION}); rebuild it: {rebuild}", engine_dir)
    backend = eng.get("backend")
    if backend == "onnxruntime":
        have = installed_version("onnxruntime")
        if have is None:
            raise LlmcError(f"onnxruntime is not installed; install it or rebuild: {rebuild}", engine_dir)
        if version_tuple(have, 2) < MIN_ONNXRUNTIME:
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
               "build_seconds", "integrity")

# Engine config.json fields the runtime reads: (section, key) -> what it must be.
_POS_INT = ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
_BOOL = ("true or false", lambda v: isinstance(v, bool))
_STR = ("a string", lambda v: isinstance(v, str))
_LIST = ("a list", lambda v: isinstance(v, list))
_INT = ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))
ENGINE_SCHEMA = {
    ("engine", "backend"): _STR, ("engine", "compute_dtype"): _STR, ("engine", "kv_cache_dtype"): _STR,
    ("build", "max_batch_size"): _POS_INT, ("build", "max_input_len"): _POS_INT,
    ("build", "max_seq_len"): _POS_INT, ("build", "max_num_tokens"): _POS_INT,
    ("build", "tokens_per_block"): _POS_INT, ("build", "kv_cache_blocks"): _POS_INT,
    ("build", "paged_kv_cache"): _BOOL, ("build", "inflight_batching"): _BOOL,
}
KV_CACHE_DTYPES = ("float32", "float16", "bfloat16", "int8", "fp8")
MATMUL_ACCURACIES = ("int8", "fp32")  # engine.matmul_accuracy (absent in engines built before it: int8)
GRAPH_SCHEMA = {"num_buckets": _POS_INT, "block_size": _POS_INT, "num_kv_heads": _POS_INT, "head_dim": _POS_INT,
                "bucket_kinds": _LIST, "attention": _LIST, "kv_pool_onnx_type": _INT}


@dataclass
class EngineConfig:
    """Model + build facts an engine runs with (attribute access; `raw` is config.json).

    Made by `validate_engine_config` only: its fields are ENGINE_SCHEMA's keys, so what is checked
    and what is read are one list."""

    model: CheckpointConfig
    backend: str
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    tokens_per_block: int
    kv_cache_dtype: str
    kv_cache_blocks: int
    paged_kv_cache: bool
    inflight_batching: bool
    compute_dtype: str
    quantization: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def num_layers(self) -> int:
        return self.model.num_hidden_layers


def validate_engine_config(data: dict[str, Any], engine_dir: str | Path) -> EngineConfig:
    """The EngineConfig of an engine config.json, or one line naming the first missing or mangled
    field of a damaged one."""
    rebuild = data.get("build_command") if isinstance(data.get("build_command"), str) else None
    hint = f"; rebuild it: {rebuild}" if rebuild else "; rebuild it with `llmc build`"

    def bad(what: str) -> LlmcError:
        return LlmcError(f"damaged engine config.json: {what}{hint}", engine_dir)

    for section in ("engine", "build"):
        if not isinstance(data.get(section), dict):
            raise bad(f"no '{section}' block" if section not in data else f"'{section}' is not an object")
    for (section, key), (what, ok) in ENGINE_SCHEMA.items():
        if not ok(data[section].get(key)):
            raise bad(f"{section}.{key} must be {what} (got {data[section].get(key)!r})")
    graph = data["engine"].get("graph")
    if data["engine"]["backend"] in ("onnxruntime", "tensorrt"):
        if not isinstance(graph, dict):
            raise bad("engine.graph is not an object")
        for key, (what, ok) in GRAPH_SCHEMA.items():
            if not ok(graph.get(key)):
                raise bad(f"engine.graph.{key} must be {what} (got {graph.get(key)!r})")
        n = graph["num_buckets"]
        if len(graph["bucket_kinds"]) != n or len(graph["attention"]) != n:
            raise bad(f"engine.graph lists {len(graph['bucket_kinds'])} bucket kinds for {n} buckets")
        if graph.get("num_layers") != data.get("num_hidden_layers"):
            raise bad(f"engine.graph.num_layers {graph.get('num_layers')!r} differs from num_hidden_layers "
                      f"{data.get('num_hidden_layers')!r}")
        if graph["block_size"] != data["build"]["tokens_per_block"]:
            raise bad(f"engine.graph.block_size {graph['block_size']} differs from build.tokens_per_block "
                      f"{data['build']['tokens_per_block']}")
    if data["engine"]["kv_cache_dtype"] not in KV_CACHE_DTYPES:
        raise bad(f"engine.kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}")
    if data["engine"].get("matmul_accuracy", "int8") not in MATMUL_ACCURACIES:
        raise bad(f"engine.matmul_accuracy must be one of {', '.join(MATMUL_ACCURACIES)}")
    b = data["build"]
    if b["max_input_len"] > b["max_seq_len"]:
        raise bad(f"build.max_input_len {b['max_input_len']} exceeds build.max_seq_len {b['max_seq_len']}")
    model = CheckpointConfig.from_dict(model_config_dict(data), Path(engine_dir) / "config.json")
    return EngineConfig(model=model, quantization=data["engine"].get("quantization", "float"), raw=data,
                        **{key: data[section][key] for section, key in ENGINE_SCHEMA})


def verify_engine_files(data: dict[str, Any], engine_dir: str | Path, full: bool = True) -> dict[str, str] | None:
    """Check every file against the integrity record written at build time (None: no record,
    an engine built before llmc recorded digests)."""
    from llmc.integrity import verify_record

    if "integrity" not in data:
        return None
    rebuild = data.get("build_command") if isinstance(data.get("build_command"), str) else "llmc build ..."
    return verify_record(engine_dir, data["integrity"], full=full, rebuild=f"rebuild it: {rebuild}")


def warn_version_drift(data: dict[str, Any], engine_dir: str | Path) -> list[str]:
    """Warn (stderr) when the engine was built by another llmc or onnxruntime version."""
    from llmc import __version__
    from llmc.errors import warn

    built = data.get("versions") if isinstance(data.get("versions"), dict) else {}
    now = {"llmc": __version__}
    if (data.get("engine") or {}).get("backend") == "onnxruntime":
        now["onnxruntime"] = installed_version("onnxruntime")
    notes = []
    for tool, have in now.items():
        was = built.get(tool)
        if was and have and was != have:
            notes.append(f"engine was built with {tool} {was}, this is {tool} {have}")
    if notes:
        rebuild = data.get("build_command") or "llmc build CHECKPOINT -o ENGINE --force"
        warn(f"{'; '.join(notes)} (the engine format is unchanged, so it loads; rebuild if outputs look "
             f"wrong: {rebuild})", engine_dir)
    return notes


def model_config_dict(data: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint config part of an engine config.json."""
    return {k: v for k, v in data.items() if k not in ENGINE_KEYS}
