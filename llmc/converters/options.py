"""`llmc convert` options: one dataclass shared by the CLI and recipes' `convert:` stage."""

from __future__ import annotations

from dataclasses import dataclass

from llmc.optionfields import option

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class ConvertOptions:
    """Every `llmc convert` option (its source and output paths aside)."""

    dtype: str = option("auto", choices=DTYPES)       # auto: the source's dtype (float32 for GGUF)
    tp_size: int = option(1, ge=1)
    keep_quantization: bool = option(False)           # GGUF Q4_0/Q4_1/Q8_0 kept as a quantized checkpoint
    force: bool = option(False, recipe=False)
