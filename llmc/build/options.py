"""Build options: one dataclass, documented defaults, validation that raises one-line errors.

Defaults (None means "derived from the model"):
    backend            auto      onnxruntime unless TensorRT and a CUDA device are usable
    paged_kv_cache     True      False = one contiguous block of max_seq_len per sequence
    inflight_batching  True      packed prefill+decode steps (needs the paged KV cache)
    tokens_per_block   64        KV block size (TensorRT-LLM's default)
    max_batch_size     16        sequences per step
    max_seq_len        min(2048, max_position_embeddings)
    max_input_len      min(1024, max_seq_len)   longest prompt
    max_num_tokens     max(2048, max_input_len) packed tokens per step (TensorRT profiles; memory plan)
    kv_cache_blocks    max_batch_size x ceil(max_seq_len / tokens_per_block)   default pool size
    dtype              auto      float32 on ONNX Runtime CPU; the checkpoint's dtype (fp32 -> fp16) on TensorRT
    kv_cache_dtype     auto      the checkpoint's KV quantization (int8/fp8) or the compute dtype
    attention          auto      fused (standard ONNX Attention); decomposed = MatMul/Softmax
    attention_buckets  3         attention groups per step: 2 decode groups split by context length + 1 for prefill rows
    lm_head            auto      int8 = store a float lm_head as int8 blocks when that is exact (GGUF Q8_0
                                 sources), run by ONNX Runtime's 8-bit MatMulNBits; auto = int8 when exact,
                                 on ONNX Runtime, for integer-quantized checkpoints; float = never
    graph_only         False     TensorRT: write and check model.onnx, skip the engine build
    timing_cache       None      TensorRT timing cache file (read if present, updated after the build)
    trt_opt_level      3         TensorRT builder optimisation level (0-5)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from llmc.errors import LlmcError

BACKENDS = ("auto", "onnxruntime", "tensorrt", "tensorrt-llm")
DTYPES = ("auto", "float32", "float16", "bfloat16")
KV_DTYPES = ("auto", "float", "int8", "fp8")
ATTENTION = ("auto", "fused", "decomposed")
LM_HEAD = ("auto", "float", "int8")


@dataclass
class BuildOptions:
    backend: str = "auto"
    paged_kv_cache: bool = True
    inflight_batching: bool = True
    tokens_per_block: int = 64
    max_batch_size: int = 16
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    kv_cache_blocks: int | None = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    attention: str = "auto"
    attention_buckets: int = 3
    lm_head: str = "auto"
    graph_only: bool = False
    timing_cache: str | None = None
    trt_opt_level: int = 3
    force: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuildOptions":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def blocks_per_seq(self) -> int:
        return math.ceil(self.max_seq_len / self.tokens_per_block)

    def resolve(self, max_position_embeddings: int) -> "BuildOptions":
        """Fill derived defaults and validate; raises LlmcError on settings that cannot hold."""
        o = BuildOptions(**asdict(self))
        for name, allowed in (("backend", BACKENDS), ("dtype", DTYPES), ("kv_cache_dtype", KV_DTYPES),
                              ("attention", ATTENTION), ("lm_head", LM_HEAD)):
            if getattr(o, name) not in allowed:
                raise LlmcError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)} "
                                f"(got {getattr(o, name)!r})")
        for name in ("tokens_per_block", "max_batch_size", "max_input_len", "max_seq_len",
                     "max_num_tokens", "kv_cache_blocks", "attention_buckets"):
            v = getattr(o, name)
            if v is not None and v < 1:
                raise LlmcError(f"--{name.replace('_', '-')} must be >= 1 (got {v})")
        if o.max_seq_len is None:
            o.max_seq_len = min(2048, max_position_embeddings)
        if o.max_input_len is None:
            o.max_input_len = min(1024, o.max_seq_len)
        if o.max_input_len > o.max_seq_len:
            raise LlmcError(f"--max-input-len {o.max_input_len} exceeds --max-seq-len {o.max_seq_len}")
        if o.max_seq_len > max_position_embeddings:
            raise LlmcError(f"--max-seq-len {o.max_seq_len} exceeds the model's max_position_embeddings "
                            f"({max_position_embeddings})")
        if o.max_num_tokens is None:
            o.max_num_tokens = max(2048, o.max_input_len)
        if o.max_num_tokens < o.max_batch_size:
            raise LlmcError(f"--max-num-tokens {o.max_num_tokens} is smaller than --max-batch-size "
                            f"{o.max_batch_size}: a step of decodes could not fit")
        if not o.paged_kv_cache:
            if o.inflight_batching:
                raise LlmcError("in-flight batching needs the paged KV cache "
                                "(drop --no-paged-kvcache or add --no-inflight-batching)")
            o.tokens_per_block = o.max_seq_len  # contiguous: one block holds a whole sequence
        if o.tokens_per_block & (o.tokens_per_block - 1) and o.paged_kv_cache:
            raise LlmcError(f"--tokens-per-block must be a power of two (got {o.tokens_per_block})")
        if o.paged_kv_cache and o.tokens_per_block > o.max_seq_len:
            raise LlmcError(f"--tokens-per-block {o.tokens_per_block} exceeds --max-seq-len {o.max_seq_len}: "
                            "a block would be larger than the longest sequence")
        if o.kv_cache_blocks is None:
            o.kv_cache_blocks = o.max_batch_size * o.blocks_per_seq
        elif o.kv_cache_blocks < o.blocks_per_seq:
            raise LlmcError(f"a KV pool of {o.kv_cache_blocks} blocks x {o.tokens_per_block} tokens cannot hold "
                            f"one sequence of --max-seq-len {o.max_seq_len} ({o.blocks_per_seq} blocks needed)")
        if not 0 <= o.trt_opt_level <= 5:
            raise LlmcError(f"--trt-opt-level must be in 0..5 (got {o.trt_opt_level})")
        return o
