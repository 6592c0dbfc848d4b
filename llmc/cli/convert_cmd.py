"""`llmc convert`: Hugging Face directory or GGUF file -> TensorRT-LLM-layout checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from llmc.cli.output import DTYPE_ALIASES, choice


def convert(
    src: Path = typer.Argument(..., help="Hugging Face model directory (config.json + safetensors) or a .gguf file."),
    out: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to write."),
    dtype: str = typer.Option("auto", **choice(("auto", "float32", "float16", "bfloat16"), DTYPE_ALIASES), help="auto: the source's dtype (float32 for GGUF)."),
    tp_size: int = typer.Option(1, "--tp-size", help="Tensor-parallel ranks to shard into (must divide heads, KV heads and intermediate size)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is a previous llmc checkpoint (or empty); any other directory is refused, and OUT may never be, contain or lie inside the input."),
) -> None:
    """Convert a model into a checkpoint: fused QKV, TensorRT-LLM names, dtype, TP shards."""
    from rich.console import Console

    from llmc.converters.convert import convert as run_convert

    result = run_convert(src, out, dtype=dtype, tp_size=tp_size, force=force)
    Console().print(f"[green]converted[/] {src} -> {result.out} "
                    f"({result.config.architecture}, {result.num_params / 1e6:.1f}M params, "
                    f"{result.config.dtype}, tp={tp_size}) in {result.seconds:.1f}s")
