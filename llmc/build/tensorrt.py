"""TensorRT backend: rank0.engine from the same model.onnx, through TensorRT's ONNX parser.

Optional extra (`pip install "llmc[tensorrt]"` on a CUDA host); imported lazily. On a machine
without TensorRT or a CUDA device, `tensorrt_status()` says why, `--backend tensorrt` fails at
once with that reason (or, with --graph-only, writes and checks the graph only), and
`--backend auto` picks onnxruntime.

Build (TensorRT 10.x Python API): Builder -> create_network() (weakly typed; precision comes
from the builder flags chosen from the checkpoint: FP16/BF16 for the compute dtype, INT8 for
SmoothQuant, FP8 for FP8/W4A8, INT4 for AWQ/W4A16) -> OnnxParser.parse_from_file (reads the
external weights) -> one optimization profile whose ranges come from the max_* options ->
optional timing cache (loaded if the file exists, saved back after the build) ->
build_serialized_network -> rank0.engine.

Pure functions (`precision_flags`, `optimization_profile`) carry the decisions and are tested on
CPU; only `build_trt_engine` needs TensorRT and a GPU. Running the plan is
`llmc.engine.backends.tensorrt` (TrtSession), which the runtime uses without this module.

Known cost: TensorRT has no in-place aliasing of an input and an output, so the in-graph
ScatterND copies each layer's pool tensor every step (device memcpy, ~1 ms per GB on a modern
GPU). For large pools use the tensorrt-llm backend, whose attention plugin writes in place.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llmc.checkpoint.quant_algos import BY_KIND
from llmc.engine.backends.tensorrt import tensorrt_status
from llmc.errors import LlmcError, UnsupportedError


def precision_flags(compute_dtype: str, quant_kind: str, kv_dtype: str | None = None) -> list[str]:
    """Builder flags (names of trt.BuilderFlag members) for a graph's precisions: every storage type
    the quant kind's weights and activations use (`BY_KIND`), and the KV cache's."""
    flags: list[str] = []
    if compute_dtype == "float16":
        flags.append("FP16")
    elif compute_dtype == "bfloat16":
        flags.append("BF16")
    algo = BY_KIND.get(quant_kind)  # None: float
    types = {algo.weight, algo.act} if algo else set()
    if "int8" in types or kv_dtype == "int8":
        flags.append("INT8")
    if "fp8" in types or kv_dtype == "fp8":
        flags.append("FP8")
    if "int4" in types:
        flags.append("INT4")
    return flags


def optimization_profile(opts: Any, num_buckets: int, block_size: int, num_kv_heads: int, head_dim: int,
                         num_layers: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """{input: (min, opt, max) shapes} for the one optimization profile, from the max_* options.

    Rows of a bucket: at most max_num_tokens (one token each); tokens per row (Qt) at most
    max_input_len; padded row slots at most 2 x max_num_tokens; blocks per row at most
    ceil(max_seq_len / block_size); pool blocks at most kv_cache_blocks (the runtime cannot
    allocate a bigger pool for a TensorRT engine).
    """
    T, B = opts.max_num_tokens, opts.max_batch_size
    mb = math.ceil(opts.max_seq_len / block_size)
    opt_t = min(T, B)
    shapes: dict[str, tuple] = {
        "input_ids": ((1,), (opt_t,), (T,)),
        "positions": ((1,), (opt_t,), (T,)),
        "kv_write_index": ((1, 2), (opt_t, 2), (T, 2)),
        "attn_out_index": ((1,), (opt_t,), (T,)),
        "logits_index": ((1,), (B,), (T,)),
    }
    for b in range(num_buckets):
        shapes[f"attn_q_index_{b}"] = ((1,), (opt_t,), (2 * T,))
        shapes[f"attn_kv_blocks_{b}"] = ((1, 1), (opt_t, mb), (T, mb))
        shapes[f"attn_q_pos_{b}"] = ((1, 1), (opt_t, 1), (T, opts.max_input_len))
    pool_max = opts.kv_cache_blocks
    for layer in range(num_layers):
        for kind in ("key", "value"):
            shapes[f"kv_pool.{layer}.{kind}"] = ((num_kv_heads, 1, block_size, head_dim),
                                                 (num_kv_heads, pool_max, block_size, head_dim),
                                                 (num_kv_heads, pool_max, block_size, head_dim))
    return shapes


def build_trt_engine(onnx_path: Path, engine_path: Path, opts: Any, spec: Any, quant_kind: str,
                     log=print) -> dict[str, Any]:
    """Parse model.onnx and build rank0.engine. Returns facts for the engine config."""
    ok, reason = tensorrt_status()
    if not ok:
        raise UnsupportedError(f"cannot build a TensorRT engine here: {reason}")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise LlmcError(f"TensorRT's ONNX parser rejected the graph: {errors[0] if errors else 'unknown error'}"
                        + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""), onnx_path)
    config = builder.create_builder_config()
    flags = precision_flags(spec.compute_dtype, quant_kind, spec.kv_dtype)
    for name in flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    config.builder_optimization_level = int(opts.trt_opt_level)
    profile = builder.create_optimization_profile()
    shapes = optimization_profile(opts, spec.num_buckets, spec.block_size, spec.num_kv_heads, spec.head_dim,
                                  spec.num_layers)
    for name, (lo, mid, hi) in shapes.items():
        profile.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(profile)
    cache = None
    if opts.timing_cache:
        blob = Path(opts.timing_cache).read_bytes() if Path(opts.timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    log(f"building TensorRT engine ({', '.join(flags) or 'FP32'}, opt level {opts.trt_opt_level})...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LlmcError("TensorRT failed to build the engine (see the TensorRT log above)", onnx_path)
    engine_path.write_bytes(bytes(serialized))
    if cache is not None:
        from llmc.fsutil import write_file_atomic

        write_file_atomic(opts.timing_cache, bytes(config.get_timing_cache().serialize()))
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"flags": flags, "device": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "profile": {k: [list(s) for s in v] for k, v in shapes.items() if not k.startswith("kv_pool")}}
