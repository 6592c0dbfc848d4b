"""The engine step API (see docs/interfaces.md).

    engine = load_engine(engine_dir)           # refuses unknown formats with a rebuild hint
    pool = engine.allocate_kv_pool(num_blocks) # runtime-owned, bound once
    logits = engine.step(StepBatch(...))       # float32 [len(logits_indices), vocab]

`step()` returns a new float32 array each call (ONNX Runtime writes into it directly);
`step(batch, scratch=True)` returns the engine's own buffer instead, overwritten by the next step
(no per-step output binding: what the runtime uses, sampling at once). Host work per step is the
small index arrays of `step_feeds`; the pool and the weights are never copied.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from llmc.errors import LlmcError, UnsupportedError
from llmc.engine.step import StepBatch, step_feeds
from llmc.engine.stamps import (EngineConfig, check_compatible, read_engine_config, validate_engine_config,
                                verify_engine_files, warn_version_drift)


class Engine:
    def __init__(self, path: Path, config: EngineConfig, threads: int | None = None,
                 int4_accuracy_level: int | None = None, spinning: bool | None = None):
        """`config` comes from `validate_engine_config` (load_engine): every field read here was checked."""
        self.path = Path(path)
        self.config = cfg = config
        data = config.raw
        self.graph = data["engine"]["graph"]
        self.num_buckets = int(self.graph["num_buckets"])
        self.block_size = int(self.graph["block_size"])
        self.num_kv_heads = int(self.graph["num_kv_heads"])
        self.head_dim = int(self.graph["head_dim"])
        self.bucket_kinds = list(self.graph["bucket_kinds"])
        self.kv_bytes_per_block = self.block_size * cfg.model.kv_cache_bytes_per_token(cfg.kv_cache_dtype)
        self.pool = None
        # Graphs built with explicit reshape targets run unused MatMul/Softmax buckets as zero rows
        # on ORT (its Attention kernel refuses an empty batch: fused buckets keep a dummy row).
        empty = cfg.backend == "onnxruntime" and bool(self.graph.get("empty_buckets"))
        # Buckets guarded by If(rows > 0) may be empty whatever their attention form.
        guarded = self.graph.get("guarded_buckets") or [False] * self.num_buckets
        self._empty_buckets = [empty and (g or impl == "decomposed") for g, impl in zip(guarded, self.graph["attention"])]
        rebuild = data.get("build_command", "")
        if cfg.backend == "onnxruntime":
            from llmc.engine.backends.onnxruntime import ACCURACY_LEVELS, OrtSession

            if int4_accuracy_level is None:
                int4_accuracy_level = ACCURACY_LEVELS[data["engine"].get("matmul_accuracy", "int8")]
            self._session = OrtSession(self.path / "model.onnx", cfg.vocab_size, threads, int4_accuracy_level,
                                       spinning)
        elif cfg.backend == "tensorrt":
            if data["engine"].get("graph_only") or not (self.path / "rank0.engine").is_file():
                raise LlmcError(f"this TensorRT engine was built with --graph-only (no rank0.engine); "
                                f"build it on a GPU host: {rebuild.replace(' --graph-only', '')}", self.path)
            from llmc.engine.backends.tensorrt import TrtSession

            self._session = TrtSession(self.path / "rank0.engine", cfg.vocab_size)
        else:
            raise UnsupportedError(f"{cfg.backend} engines run with TensorRT-LLM's own runtime "
                                   f"(tensorrt_llm.runtime.ModelRunner on {self.path / 'trtllm'}), not llmc's step API")

    @property
    def tokenizer_dir(self) -> Path:
        return self.path

    def blocks_for_seq(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def allocate_kv_pool(self, num_blocks: int | None = None):
        """Allocate (zeroed) and bind the KV pool; returns the pool object (runtime-owned)."""
        cfg = self.config
        n = cfg.kv_cache_blocks if num_blocks is None else int(num_blocks)
        need = self.blocks_for_seq(cfg.max_seq_len)
        if n < need:
            raise LlmcError(f"a KV pool of {n} blocks cannot hold one sequence of max_seq_len "
                            f"{cfg.max_seq_len} ({need} blocks of {self.block_size} tokens needed)")
        if cfg.backend == "tensorrt":
            import torch

            from llmc.engine.backends.tensorrt import TrtKVPool

            if n > cfg.kv_cache_blocks:
                raise LlmcError(f"this TensorRT engine's profile allows at most {cfg.kv_cache_blocks} KV blocks "
                                "(rebuild with a larger --kv-cache-blocks)")
            tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.kv_cache_dtype]
            pool = TrtKVPool(cfg.num_layers, n, self.block_size, self.num_kv_heads, self.head_dim, tdt)
        else:
            from llmc.engine.backends.onnxruntime import OrtKVPool

            pool = OrtKVPool(cfg.num_layers, n, self.block_size, self.num_kv_heads, self.head_dim,
                             int(self.graph["kv_pool_onnx_type"]), self.graph.get("kv_pool_layout", "split"))
        self._session.bind_pool(pool)
        self.pool = pool
        return pool

    def step(self, batch: StepBatch, scratch: bool = False) -> np.ndarray:
        if self.pool is None:
            raise RuntimeError("call allocate_kv_pool() before step()")
        T = len(batch.input_ids)
        if T > self.config.max_num_tokens:
            raise ValueError(f"step of {T} tokens exceeds max_num_tokens {self.config.max_num_tokens}")
        feeds = step_feeds(batch, self.block_size, self.bucket_kinds, self._empty_buckets)
        return self._session.run(feeds, len(feeds["logits_index"]), scratch=scratch)


def load_engine(engine_dir: str | Path, *, threads: int | None = None, num_threads: int | None = None,
                int4_accuracy_level: int | None = None, spinning: bool | None = None) -> Engine:
    """Open an engine directory; refuses unknown format versions / incompatible toolchains.

    threads (alias num_threads): ONNX Runtime intra-op threads (default: physical cores; LLMC_ORT_THREADS).
    spinning: idle intra-op workers busy-wait for the next kernel (default: on; LLMC_ORT_SPINNING).
    int4_accuracy_level: ONNX Runtime MatMulNBits accuracy level for INT4/INT8 weights
    (default: the engine's --matmul-accuracy, int8 -> 4: int8 activations inside the kernel, fast;
    fp32 -> 1: float32 compute, exact).
    """
    threads = threads if threads is not None else num_threads
    data = read_engine_config(engine_dir)
    check_compatible(data, engine_dir)
    config = validate_engine_config(data, engine_dir)
    warn_version_drift(data, engine_dir)
    if verify_engine_files(data, engine_dir) is None:
        from llmc.errors import warn

        warn("engine has no integrity record (built by an older llmc): damage to its files cannot be "
             "detected; rebuild it", engine_dir)
    return Engine(Path(engine_dir), config, threads, int4_accuracy_level, spinning)


def describe_engine(path: str | Path, verify: bool = False) -> dict[str, Any]:
    """Facts about an engine directory, for `llmc inspect` (verify: hash every file)."""
    from llmc.fsutil import dir_size

    data = read_engine_config(path)
    validate_engine_config(data, path)
    checked = verify_engine_files(data, path, full=verify)
    e, b, m = data.get("engine", {}), data.get("build", {}), data
    graph = e.get("graph") or {}
    return {
        "kind": "engine",
        "path": str(path),
        "format_version": e.get("format_version"),
        "backend": e.get("backend"),
        "graph_only": e.get("graph_only", False),
        "architecture": data.get("architecture"),
        "compute_dtype": e.get("compute_dtype"),
        "quantization": e.get("quantization"),
        "quant_algo": (m.get("quantization") or {}).get("quant_algo"),
        "qformat": ((m.get("llmc") or {}).get("quantization") or {}).get("qformat"),
        "kv_cache_dtype": e.get("kv_cache_dtype"),
        "attention": graph.get("attention"),
        "layers": m.get("num_hidden_layers"),
        "vocab_size": m.get("vocab_size"),
        "build": {k: b.get(k) for k in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens",
                                        "tokens_per_block", "kv_cache_blocks", "paged_kv_cache",
                                        "inflight_batching")},
        "memory_plan": data.get("memory_plan"),
        "versions": data.get("versions"),
        "source": data.get("source"),
        "graph_nodes": graph.get("node_count"),  # every step body's (see engine.graph.step_variants)
        "step_variants": graph.get("step_variants") or None,
        "contiguous_decode": bool(graph.get("contiguous_decode")),  # the GroupQueryAttention body
        "kv_pool_layout": graph.get("kv_pool_layout", "split"),
        "size_on_disk_bytes": dir_size(path),
        "integrity": ("no record (built by an older llmc)" if checked is None else
                      f"{len(checked)} files {'verified (full xxh3-128 digests)' if verify else 'present, sizes match (--verify hashes them)'}"),
        "build_command": data.get("build_command"),
    }
