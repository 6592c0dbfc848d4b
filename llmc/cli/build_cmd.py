"""`llmc build`: checkpoint -> engine directory (ONNX graph, + rank0.engine for TensorRT)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llmc.cli.output import DTYPE_ALIASES, choice
from llmc.build.options import ATTENTION, BACKENDS, DTYPES, KV_DTYPES, LM_HEAD, MATMUL_ACCURACY, BuildOptions

_D = BuildOptions()


def build(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (llmc convert / llmc quantize output)."),
    out: Path = typer.Option(..., "-o", "--output", help="Engine directory to write (atomically)."),
    backend: str = typer.Option(_D.backend, **choice(BACKENDS), help="auto: tensorrt when TensorRT and a "
                                "CUDA device are usable, else onnxruntime."),
    paged_kv_cache: bool = typer.Option(_D.paged_kv_cache, "--paged-kvcache/--no-paged-kvcache",
                                       help="Paged KV cache (blocks of --tokens-per-block). Off: one contiguous "
                                       "block of --max-seq-len per sequence."),
    inflight_batching: bool = typer.Option(_D.inflight_batching, "--inflight-batching/--no-inflight-batching",
                                           help="Steps mix prefill chunks and decodes of many sequences "
                                           "(packed tokens, no padding). Needs the paged KV cache."),
    tokens_per_block: int = typer.Option(_D.tokens_per_block, help="KV block size in tokens (power of two)."),
    max_batch_size: int = typer.Option(_D.max_batch_size, help="Most sequences in one step."),
    max_input_len: Optional[int] = typer.Option(_D.max_input_len, help="Longest prompt. Default: min(1024, max-seq-len)."),
    max_seq_len: Optional[int] = typer.Option(_D.max_seq_len, help="Longest prompt + output. Default: min(2048, "
                                              "the model's max_position_embeddings)."),
    max_num_tokens: Optional[int] = typer.Option(_D.max_num_tokens, help="Most packed tokens in one step. Default: "
                                                 "max(2048, max-input-len)."),
    kv_cache_blocks: Optional[int] = typer.Option(_D.kv_cache_blocks, help="Default KV pool size in blocks. Default: "
                                                  "max-batch-size x ceil(max-seq-len / tokens-per-block)."),
    dtype: str = typer.Option(_D.dtype, **choice(DTYPES, DTYPE_ALIASES), help="auto: float32 on onnxruntime (CPU), the "
                              "checkpoint's 16-bit dtype (else float16) on tensorrt."),
    kv_cache_dtype: str = typer.Option(_D.kv_cache_dtype, **choice(KV_DTYPES), help="auto: the "
                                       "checkpoint's KV-cache quantization, else the compute dtype."),
    attention: str = typer.Option(_D.attention, **choice(ATTENTION), help="auto: fused ONNX Attention "
                                  "for prefill rows and grouped MatMul/Softmax for decode rows on "
                                  "onnxruntime; fused on TensorRT >= 10.14."),
    attention_buckets: int = typer.Option(_D.attention_buckets, help="Attention groups per step (1 + number "
                                          "of decode groups split by context length)."),
    lm_head: str = typer.Option(_D.lm_head, **choice(LM_HEAD), help="int8: store a float lm_head as int8 "
                                "x per-32-block scales where that is exact (weights from GGUF Q8_0), run by "
                                "ONNX Runtime's 8-bit kernel (4x fewer bytes per token; int8 activations "
                                "inside the kernel). auto: int8 when exact for integer-quantized "
                                "checkpoints on onnxruntime."),
    matmul_accuracy: str = typer.Option(_D.matmul_accuracy, **choice(MATMUL_ACCURACY), help="onnxruntime "
                                        "weight-only (INT4/INT8) matmuls: int8 = activations rounded to int8 "
                                        "per block inside the kernel (fastest); fp32 = float compute for 4-bit "
                                        "weights and error-compensated int8 for 8-bit ones, so the engine "
                                        "keeps its checkpoint's answers (~10-20% slower decode)."),
    graph_only: bool = typer.Option(_D.graph_only, "--graph-only", help="tensorrt / tensorrt-llm: write and check "
                                    "the graph and config only (works without a GPU)."),
    timing_cache: Optional[Path] = typer.Option(_D.timing_cache, help="TensorRT timing cache file (read if present, "
                                                "written after the build)."),
    trt_opt_level: int = typer.Option(_D.trt_opt_level, help="TensorRT builder optimization level 0-5."),
    force: bool = typer.Option(_D.force, "--force", help="Replace OUT if it is a previous llmc engine (or empty); any other directory is refused, and OUT may never be, contain or lie inside the input."),
) -> None:
    """Compile a checkpoint into an engine: one ONNX graph of standard ops over a paged KV cache."""
    from rich.console import Console

    from llmc.build.builder import build_engine
    from llmc.cli.output import err_console
    from llmc.fsutil import dir_size

    console = err_console()
    opts = BuildOptions(backend=backend, paged_kv_cache=paged_kv_cache, inflight_batching=inflight_batching,
                        tokens_per_block=tokens_per_block, max_batch_size=max_batch_size,
                        max_input_len=max_input_len, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens,
                        kv_cache_blocks=kv_cache_blocks, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                        attention=attention, attention_buckets=attention_buckets, lm_head=lm_head,
                        matmul_accuracy=matmul_accuracy,
                        graph_only=graph_only,
                        timing_cache=str(timing_cache) if timing_cache else None, trt_opt_level=trt_opt_level,
                        force=force)
    result = build_engine(checkpoint, out, opts, log=lambda m: console.print(m, highlight=False), console=console)
    e = result.config["engine"]
    what = "graph only (build rank0.engine on a GPU host)" if e.get("graph_only") else e["backend"]
    Console().print(f"[green]built[/] {checkpoint} -> {result.out} ({what}, {e['compute_dtype']}, "
                    f"{e['quantization']}, KV {e['kv_cache_dtype']}, {dir_size(result.out) / 2**20:.1f} MiB) "
                    f"in {result.seconds:.1f}s")
