"""`llmc export triton`: an llmc engine as a Triton Inference Server model repository.

    REPO/NAME/config.pbtxt    python backend, decoupled (token streaming), CPU instance group,
                              EXECUTION_ENV_PATH = the numpy<2 venv from env.py
    REPO/NAME/1/model.py      a thin adapter: llmc's EngineLoop per instance (backend.py)
    REPO/NAME/1/llmc_path/    a symlink to the exporting llmc package (model.py imports it;
                              without it, llmc must be installed in the model's environment)
    REPO/NAME/1/engine/       only with --copy-engine; otherwise the engine is referenced

The tensor names are those of TensorRT-LLM's Triton backend (ensemble / tensorrt_llm_bls), so
clients written for tensorrtllm_backend work unchanged: inputs text_input, max_tokens, stream,
temperature, top_k, top_p, random_seed, stop_words, end_id, pad_id; output text_output, plus
output_ids (the token ids of each response) and finish_reason as extras.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from llmc.errors import LlmcError
from llmc.fsutil import TRITON_MODEL_MARK, atomic_output_dir

# (name, Triton type, dims, optional) -- the TensorRT-LLM backend's names and types.
INPUTS = [
    ("text_input", "TYPE_STRING", "[ 1 ]", False),
    ("max_tokens", "TYPE_INT32", "[ 1 ]", True),
    ("stream", "TYPE_BOOL", "[ 1 ]", True),
    ("temperature", "TYPE_FP32", "[ 1 ]", True),
    ("top_k", "TYPE_INT32", "[ 1 ]", True),
    ("top_p", "TYPE_FP32", "[ 1 ]", True),
    ("random_seed", "TYPE_UINT64", "[ 1 ]", True),
    ("stop_words", "TYPE_STRING", "[ -1 ]", True),
    ("end_id", "TYPE_INT32", "[ 1 ]", True),
    ("pad_id", "TYPE_INT32", "[ 1 ]", True),
]
OUTPUTS = [
    ("text_output", "TYPE_STRING", "[ -1 ]"),
    ("output_ids", "TYPE_INT32", "[ -1 ]"),
    ("finish_reason", "TYPE_STRING", "[ 1 ]"),
]
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
TEMPLATE = Path(__file__).with_name("model_template.py")


@dataclass(frozen=True)
class ExportOptions:
    model_name: str = "llmc"
    instances: int = 1
    max_batch_size: int | None = None   # sequences in flight per instance (<= the engine's)
    kv_cache_mb: float | None = None    # per instance
    max_queue: int | None = None        # waiting requests per instance before "queue full"
    copy_engine: bool = False
    env_path: str | None = None         # EXECUTION_ENV_PATH; default: the llmc-managed venv


LLMC_LINK_DIR = "llmc_path"  # REPO/NAME/1/llmc_path/llmc -> this llmc package


def llmc_package() -> Path:
    """The `llmc` package model.py must import: this one (the stub ignores PYTHONPATH).

    The repository links to it from a directory that holds nothing else, so the stub's sys.path
    gains llmc only, never the rest of the exporting environment (its numpy 2 above all)."""
    import llmc

    return Path(llmc.__file__).resolve().parent


def _check(engine_dir: Path, opts: ExportOptions) -> int:
    """Validate the options against the engine; return the batch size per instance."""
    from llmc.engine.stamps import read_engine_config

    if not engine_dir.is_dir():
        raise LlmcError("no such engine directory", engine_dir)
    cfg = read_engine_config(engine_dir)
    if not MODEL_NAME_RE.match(opts.model_name):
        raise LlmcError(f"--model-name {opts.model_name!r}: use letters, digits, '_', '-', '.'")
    if opts.instances < 1:
        raise LlmcError(f"--instances must be >= 1, got {opts.instances}")
    built = int(cfg["build"]["max_batch_size"]) if "build" in cfg else None
    if opts.max_batch_size is not None:
        if opts.max_batch_size < 1:
            raise LlmcError(f"--max-batch-size must be >= 1, got {opts.max_batch_size}")
        if built is not None and opts.max_batch_size > built:
            raise LlmcError(f"--max-batch-size {opts.max_batch_size} exceeds the engine's "
                            f"max_batch_size {built} (rebuild with a larger --max-batch-size)")
    if opts.kv_cache_mb is not None and not opts.kv_cache_mb > 0:
        raise LlmcError(f"--kv-cache-mb must be > 0, got {opts.kv_cache_mb}")
    if opts.max_queue is not None and opts.max_queue < 1:
        raise LlmcError(f"--max-queue must be >= 1 (a request waits in the queue until the next step), "
                        f"got {opts.max_queue}")
    return opts.max_batch_size or built or 8


def _pbtxt_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(name: str, engine_ref: str, batch: int, opts: ExportOptions, env_path: str) -> str:
    """config.pbtxt text. max_batch_size > 0 with dims [1] matches TensorRT-LLM's models (clients
    send [1, 1] tensors); one prompt per request, the engine loop batches across requests."""
    def tensor(kind: str, row: tuple) -> str:
        name_, dtype, dims = row[:3]
        opt = "\n    optional: true" if kind == "input" and row[3] else ""
        return f"  {{\n    name: {_pbtxt_string(name_)}\n    data_type: {dtype}\n    dims: {dims}{opt}\n  }}"

    params = {"EXECUTION_ENV_PATH": env_path, "engine_dir": engine_ref,
              "max_batch_size": str(batch),
              "kv_cache_mb": "" if opts.kv_cache_mb is None else str(opts.kv_cache_mb),
              "max_queue": "" if opts.max_queue is None else str(opts.max_queue)}
    lines = [
        f"{TRITON_MODEL_MARK}: llmc's engine loop behind Triton's Python backend.",
        f"name: {_pbtxt_string(name)}",
        'backend: "python"',
        f"max_batch_size: {batch}",
        "model_transaction_policy { decoupled: true }",
        "input [\n" + ",\n".join(tensor("input", r) for r in INPUTS) + "\n]",
        "output [\n" + ",\n".join(tensor("output", r) for r in OUTPUTS) + "\n]",
        f"instance_group [ {{ count: {opts.instances} kind: KIND_CPU }} ]",
    ]
    lines += [f"parameters: {{ key: {_pbtxt_string(k)} value: {{ string_value: {_pbtxt_string(v)} }} }}"
              for k, v in params.items()]
    return "\n".join(lines) + "\n"


def export_triton(engine_dir: str | Path, repo: str | Path, opts: ExportOptions = ExportOptions(),
                  force: bool = False) -> Path:
    """Write (or replace, with force) REPO/NAME atomically; return that model directory.

    Other models already in REPO are left alone: a repository may serve several models."""
    engine_dir = Path(engine_dir).resolve()
    batch = _check(engine_dir, opts)
    env_path = opts.env_path
    if env_path is None:
        from llmc.serve.triton.env import triton_env_dir

        env_path = str(triton_env_dir())
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise LlmcError("exists and is not a directory", repo)
    model_dir = repo / opts.model_name
    with atomic_output_dir(model_dir, force=force, kind="triton-model", inputs=[engine_dir]) as tmp:
        version = tmp / "1"
        version.mkdir()
        shutil.copyfile(TEMPLATE, version / "model.py")
        (version / LLMC_LINK_DIR).mkdir()
        (version / LLMC_LINK_DIR / "llmc").symlink_to(llmc_package(), target_is_directory=True)
        engine_ref = str(engine_dir)
        if opts.copy_engine:
            shutil.copytree(engine_dir, version / "engine")
            engine_ref = "engine"  # relative: resolved against the version directory
        (tmp / "config.pbtxt").write_text(render_config(opts.model_name, engine_ref, batch, opts, env_path))
    return model_dir
