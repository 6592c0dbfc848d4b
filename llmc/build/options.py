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
    matmul_accuracy    int8      ONNX Runtime weight-only matmuls (MatMulNBits): int8 = activations rounded
                                 to int8 per block in the kernel (fastest); fp32 = float compute for 4-bit
                                 weights, error-compensated int8 for 8-bit ones (the engine reproduces its
                                 checkpoint to float rounding; see llmc.plugins.linear)
    graph_only         False     TensorRT: write and check model.onnx, skip the engine build
    timing_cache       None      TensorRT timing cache file (read if present, updated after the build)
    trt_opt_level      3         TensorRT builder optimisation level (0-5)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from llmc.errors import LlmcError
from llmc.optionfields import check_values, option

BACKENDS = ("auto", "onnxruntime", "tensorrt", "tensorrt-llm")
DTYPES = ("auto", "float32", "float16", "bfloat16")
KV_DTYPES = ("auto", "float", "int8", "fp8")
ATTENTION = ("auto", "fused", "decomposed")
LM_HEAD = ("auto", "float", "int8")
MATMUL_ACCURACY = ("int8", "fp32")


@dataclass
class BuildOptions:
    """Every `llmc build` option; recipes' `build:` stage is generated from these fields."""

    backend: str = option("auto", choices=BACKENDS)
    paged_kv_cache: bool = option(True)
    inflight_batching: bool = option(True)
    tokens_per_block: int = option(64, ge=1)
    max_batch_size: int = option(16, ge=1)
    max_input_len: int | None = option(None, ge=1, derived="min(1024, max_seq_len)")
    max_seq_len: int | None = option(None, ge=1, derived="min(2048, the model's max_position_embeddings)")
    max_num_tokens: int | None = option(None, ge=1, derived="max(2048, max_input_len)")
    kv_cache_blocks: int | None = option(None, ge=1,
                                         derived="max_batch_size x ceil(max_seq_len / tokens_per_block)")
    dtype: str = option("auto", choices=DTYPES)
    kv_cache_dtype: str = option("auto", choices=KV_DTYPES)
    attention: str = option("auto", choices=ATTENTION)
    attention_buckets: int = option(3, ge=1)
    lm_head: str = option("auto", choices=LM_HEAD)
    matmul_accuracy: str = option("int8", choices=MATMUL_ACCURACY)
    graph_only: bool = option(False)
    timing_cache: str | None = option(None, derived="no timing cache")
    trt_opt_level: int = option(3, ge=0, le=5)
    force: bool = option(False, recipe=False)

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
        check_values(o)
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
        return o
