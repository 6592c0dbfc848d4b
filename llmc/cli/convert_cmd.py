"""`llmc convert`: Hugging Face directory or GGUF file -> TensorRT-LLM-layout checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from llmc.cli.output import DTYPE_ALIASES, choice
from llmc.converters.options import DTYPES, ConvertOptions

_D = ConvertOptions()


def convert(
    src: Path = typer.Argument(..., help="Hugging Face model directory (config.json + safetensors) or a .gguf file."),
    out: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to write."),
    dtype: str = typer.Option(_D.dtype, **choice(DTYPES, DTYPE_ALIASES), help="auto: the source's dtype (float32 for GGUF)."),
    tp_size: int = typer.Option(_D.tp_size, "--tp-size", help="Tensor-parallel ranks to shard into (must divide heads, KV heads and intermediate size)."),
    force: bool = typer.Option(_D.force, "--force", help="Replace OUT if it is a previous llmc checkpoint (or empty); any other directory is refused, and OUT may never be, contain or lie inside the input."),
    keep_quantization: bool = typer.Option(_D.keep_quantization, "--keep-quantization", help="GGUF only: keep Q4_0 / Q4_1 / Q8_0 blocks exactly as a weight-only quantized checkpoint (W4A16_GPTQ with zero points / W4A16_AWQ / W8A16_GPTQ, group 32) instead of dequantizing; other types are dequantized and reported."),
) -> None:
    """Convert a model into a checkpoint: fused QKV, TensorRT-LLM names, dtype, TP shards."""
    from rich.console import Console

    from llmc.converters.convert import convert as run_convert

    if keep_quantization:
        return _convert_keeping(src, out, tp_size, force)
    result = run_convert(src, out, dtype=dtype, tp_size=tp_size, force=force)
    Console().print(f"[green]converted[/] {src} -> {result.out} "
                    f"({result.config.architecture}, {result.num_params / 1e6:.1f}M params, "
                    f"{result.config.dtype}, tp={tp_size}) in {result.seconds:.1f}s")


def _convert_keeping(src: Path, out: Path, tp_size: int, force: bool) -> None:
    from rich.console import Console

    from llmc.errors import LlmcError
    from llmc.quantize.gguf_keep import convert_keeping_quantization

    if tp_size != 1:
        raise LlmcError("--keep-quantization writes one rank: shard later or use --tp-size 1")
    r = convert_keeping_quantization(src, out, force=force)
    kept = ", ".join(f"{n} {k}" for k, n in sorted(r.kept.items()))
    msg = f"[green]converted[/] {src} -> {out} keeping its quantization ({r.quant_algo}, group 32): {kept} linears kept"
    if r.dequantized:
        msg += f"; {len(r.dequantized)} dequantized to float ({', '.join(sorted(set(r.dequantized.values())))})"
    Console().print(msg)
