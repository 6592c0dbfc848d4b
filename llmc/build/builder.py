"""The build stage: checkpoint -> engine directory (atomic).

    build_engine(checkpoint_dir, out_dir, BuildOptions(...)) -> BuildResult

1. Open and validate the checkpoint; resolve options (one-line LlmcError on settings that cannot
   hold); pick the backend (`auto`: TensorRT when it and a CUDA device are usable, else ONNX
   Runtime; an explicit `tensorrt` without them fails at once unless --graph-only).
2. Print the memory plan (weights + KV pool at the max settings + activations).
3. Inside `atomic_output_dir`: emit model.onnx (+ model.onnx.data, streamed), check it
   (onnx.checker; the TensorRT compatibility table for tensorrt targets), build rank0.engine
   (tensorrt) or hand the checkpoint to trtllm-build (tensorrt-llm), copy the tokenizer files,
   write config.json with the version stamps. An interrupted build leaves no engine directory.
"""

from __future__ import annotations

import dataclasses

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmc.checkpoint.quant_algos import QUANT_ALGOS
from llmc.errors import LlmcError, UnsupportedError
from llmc.build.options import BuildOptions
from llmc.measure import timed
from llmc.engine.stamps import (ENGINE_FORMAT_VERSION, build_command, checkpoint_hash, toolchain_versions,
                                write_engine_config)

_logger = logging.getLogger(__name__)


@dataclass
class BuildResult:
    out: Path
    config: dict[str, Any]
    seconds: float
    backend: str


def resolve_backend(requested: str, graph_only: bool = False) -> str:
    """auto -> tensorrt if usable else onnxruntime; explicit GPU backends fail at once if unusable."""
    from llmc.build.tensorrt import tensorrt_status

    if requested == "auto":
        return "tensorrt" if tensorrt_status()[0] else "onnxruntime"
    if requested == "tensorrt" and not graph_only:
        ok, reason = tensorrt_status()
        if not ok:
            raise UnsupportedError(f"--backend tensorrt: {reason}. Use --graph-only to write and check the "
                                   "TensorRT graph on this machine, or --backend onnxruntime")
    if requested == "tensorrt-llm" and not graph_only:
        from llmc.build.tensorrt_llm import trtllm_status

        ok, reason, _ = trtllm_status()
        if not ok:
            raise UnsupportedError(f"--backend tensorrt-llm: {reason}")
    return requested


def compute_dtype(backend: str, requested: str, ckpt_dtype: str) -> str:
    if requested == "bfloat16" and backend == "onnxruntime":
        # ORT 1.32's CPU kernels have no bfloat16 for Where, GroupQueryAttention and others: such an
        # engine would build and then fail to load.
        raise UnsupportedError("--dtype bfloat16: ONNX Runtime's CPU kernels do not run bfloat16 graphs; "
                               "use float32 (the default) or float16")
    if requested != "auto":
        return requested
    if backend == "tensorrt":
        return ckpt_dtype if ckpt_dtype in ("float16", "bfloat16") else "float16"
    return "float32"


def attention_impl(backend: str, requested: str) -> str:
    """"auto" stays auto (per-bucket choice), except on an installed TensorRT < 10.14, which has no
    Attention importer: decomposed."""
    if requested == "auto" and backend == "tensorrt":
        try:
            import tensorrt as trt

            from llmc.build.trt_compat import ATTENTION_MIN_TRT
            from llmc.versions import version_tuple

            if version_tuple(trt.__version__, 2) < version_tuple(ATTENTION_MIN_TRT, 2):
                return "decomposed"
        except Exception:
            pass
    return requested


# Checkpoints whose linears already run on ORT's integer kernels (at the engine's accuracy level).
INTEGER_KINDS = frozenset(a.kind for a in QUANT_ALGOS.values() if a.integer)


def lm_head_policy(option: str, target, qkind: str) -> str:
    """--lm-head -> what build_graph does with a float lm_head: "float" | "int8" (must be exact) |
    "int8-if-exact"."""
    if option == "int8":
        if target.is_trt:
            raise LlmcError("--lm-head int8 runs on ONNX Runtime's MatMulNBits; TensorRT engines keep it float")
        return "int8"
    if option == "auto" and not target.is_trt and qkind in INTEGER_KINDS:
        return "int8-if-exact"
    return "float"


@dataclass
class _Build:
    """Everything decided before the output directory is opened: the resolved options, the
    backend, dtypes and graph target, the validated weights and the memory plan."""

    ckpt: Any
    opts: BuildOptions
    backend: str
    dtype: str
    kv_dtype: str
    target: Any
    qkind: str
    tensors: dict[str, Any]
    plan: Any


def build_engine(checkpoint: str | Path, out: str | Path, options: BuildOptions | None = None,
                 log: Callable[[str], None] | None = None, console=None) -> BuildResult:
    """Compile `checkpoint` into the engine directory `out` (written atomically: an interrupted
    build leaves none). Every check runs before the output directory is touched."""
    from llmc.fsutil import atomic_output_dir
    from llmc.integrity import make_record
    from llmc.tokenizer import copy_tokenizer_files

    t0 = time.perf_counter()
    log = log or (lambda msg: None)
    out = Path(out)
    with timed(_logger, "build: load, validate and plan"):
        b = _prepare(checkpoint, out, options or BuildOptions(), log, console)
    with atomic_output_dir(out, force=b.opts.force, kind="engine", inputs=[b.ckpt.path],
                           expected_bytes=b.plan.weights) as tmp:
        with timed(_logger, f"build: {b.backend} engine"):
            if b.backend == "tensorrt-llm":
                spec, files, extra = _hand_to_trtllm(b, tmp, log)
            else:
                spec, files, extra = _emit_graph(b, tmp, log)
                # The plan's weights were estimated before lowering (float embedding / lm_head);
                # the engine config records what the graph actually stores.
                b.plan = dataclasses.replace(b.plan, weights=spec.weight_bytes)
        with timed(_logger, "build: tokenizer, config and integrity record"):
            data = _engine_config(b, out, spec, files, copy_tokenizer_files(b.ckpt.path, tmp), extra, t0)
            data["integrity"] = make_record(tmp)
            write_engine_config(tmp, data)
    return BuildResult(out, data, time.perf_counter() - t0, b.backend)


def _prepare(checkpoint: str | Path, out: Path, options: BuildOptions, log, console) -> _Build:
    """Load and validate the checkpoint, resolve the options against it, pick backend, dtypes and
    graph target, and print the memory plan: everything that can refuse the build, before any
    output exists."""
    from llmc.checkpoint.io import load_checkpoint
    from llmc.checkpoint.validate import validate_tensors
    from llmc.build.memory import plan_memory, render_plan
    from llmc.build.model_graph import check_supported
    from llmc.build.weights import kv_quant, quant_kind
    from llmc.fsutil import check_output_dir
    from llmc.plugins.base import Target
    from llmc.plugins.graph import ONNX_DTYPES

    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    check_output_dir(out, options.force, kind="engine", inputs=[ckpt.path])
    check_supported(cfg)
    qkind = quant_kind(cfg)
    opts = options.resolve(cfg.max_position_embeddings)
    backend = resolve_backend(opts.backend, opts.graph_only)
    dtype = compute_dtype(backend, opts.dtype, cfg.dtype)
    graph_backend = "tensorrt" if backend == "tensorrt" else "onnxruntime"
    target = Target.for_backend(graph_backend, ONNX_DTYPES[dtype], attention_impl(backend, opts.attention),
                                opts.matmul_accuracy)
    kvq = kv_quant(cfg) if opts.kv_cache_dtype == "auto" else (None if opts.kv_cache_dtype == "float" else opts.kv_cache_dtype)
    kv_dtype = kvq if (kvq and target.kv_storage == "native") else dtype
    if backend == "tensorrt" and kvq:
        log(f"note: TensorRT takes no {kvq.upper()} Gather/ScatterND, so the KV pool stores the "
            f"dequantized {kvq} values in {dtype} (same numerics, no memory saving)")
    tensors = ckpt.merged_tensors()
    validate_tensors(tensors, cfg, ckpt.path)
    plan = plan_memory(tensors, cfg, opts, dtype, kv_dtype, fp8_dequantized=(target.fp8 == "emulate"))
    render_plan(plan, opts, kv_dtype, console)
    return _Build(ckpt, opts, backend, dtype, kv_dtype, target, qkind, tensors, plan)


def _emit_graph(b: _Build, tmp: Path, log) -> tuple[Any, list[str], dict[str, Any]]:
    """model.onnx (+ streamed weights), checked by onnx.checker; for TensorRT also the
    compatibility table and rank0.engine. The weights are dropped as soon as the graph holds them."""
    import onnx

    from llmc.build.model_graph import build_graph

    opts = b.opts
    model, spec = build_graph(b.tensors, b.ckpt.config, b.target, tmp, block_size=opts.tokens_per_block,
                              max_positions=opts.max_seq_len, num_buckets=opts.attention_buckets,
                              kv_cache_dtype=opts.kv_cache_dtype,
                              lm_head=lm_head_policy(opts.lm_head, b.target, b.qkind))
    b.tensors = {}
    onnx_path = tmp / "model.onnx"
    onnx.save_model(model, str(onnx_path))
    onnx.checker.check_model(str(onnx_path))
    files = ["config.json", "model.onnx", "model.onnx.data"]
    n_bodies = len(spec.step_variants) + spec.contiguous_decode
    bodies = f" in {n_bodies} step bodies" if n_bodies > 1 else ""
    log(f"graph: {spec.node_count} nodes{bodies}, {spec.weight_bytes / 2**20:.1f} MiB of weights")
    extra: dict[str, Any] = {}
    if b.backend == "tensorrt":
        _check_trt_compatible(model, log)
        if not opts.graph_only:
            from llmc.build.tensorrt import build_trt_engine

            extra["tensorrt"] = build_trt_engine(onnx_path, tmp / "rank0.engine", opts, spec, b.qkind, log)
            files.append("rank0.engine")
    return spec, files, extra


def _check_trt_compatible(model, log) -> None:
    """Refuse ops the installed (or, without one, the minimum supported) TensorRT cannot parse,
    before minutes of engine building."""
    from llmc.build.trt_compat import assert_trt_compatible

    trt_version = None
    try:
        import tensorrt as trt

        trt_version = trt.__version__
    except Exception:
        pass
    assert_trt_compatible(model, trt_version)
    log("TensorRT compatibility check: ok")


def _hand_to_trtllm(b: _Build, tmp: Path, log) -> tuple[None, list[str], dict[str, Any]]:
    """tensorrt-llm: no llmc graph; trtllm-build compiles the checkpoint (skipped with --graph-only)."""
    b.tensors = {}
    files, extra = ["config.json"], {}
    if not b.opts.graph_only:
        from llmc.build.tensorrt_llm import build_with_trtllm

        extra["tensorrt_llm"] = build_with_trtllm(b.ckpt.path, tmp, b.opts, b.ckpt.config.quantization.quant_algo, log)
        files.append("trtllm/")
    return None, files, extra


def _engine_config(b: _Build, out: Path, spec, files: list[str], tokenizer_files: list[str],
                   extra: dict[str, Any], t0: float) -> dict[str, Any]:
    """config.json: the checkpoint config at top level (like TensorRT-LLM engine configs) plus
    what the runtime needs (engine), how it was built (build, build_command, versions) and from
    what (source hash), so a load can tell a stale or foreign engine."""
    opts = b.opts
    model_cfg = b.ckpt.config.to_dict()
    return {
        **model_cfg,
        "llmc": {**{k: v for k, v in (model_cfg.get("llmc") or {}).items() if k != "integrity"},
                 "engine": True, "engine_format_version": ENGINE_FORMAT_VERSION},
        "engine": {
            "format_version": ENGINE_FORMAT_VERSION,
            "backend": b.backend,
            "graph_only": bool(opts.graph_only and b.backend in ("tensorrt", "tensorrt-llm")),
            "files": files + tokenizer_files,
            "compute_dtype": b.dtype,
            "kv_cache_dtype": b.kv_dtype,
            "quantization": b.qkind,
            "matmul_accuracy": b.target.matmul_accuracy,
            "graph": spec.to_dict() if spec is not None else None,
            **extra,
        },
        "build": opts.to_dict(),
        "memory_plan": b.plan.to_dict(),
        "versions": toolchain_versions(tensorrt=b.backend != "onnxruntime"),
        "source": {"checkpoint": str(b.ckpt.path.resolve()), "hash": checkpoint_hash(b.ckpt.path)},
        "build_command": build_command(b.ckpt.path, out, opts.to_dict() | {"backend": opts.backend}),
        "tokenizer_files": tokenizer_files,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
