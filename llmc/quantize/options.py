"""`llmc quantize` options: one dataclass, the defaults of `llmc.quantize.formats.DEFAULTS`.

The CLI (`llmc.cli.quantize_cmd`), the library (`quantize_checkpoint`) and recipes' `quantize:`
stage (generated from this class by `llmc.recipes.schema`) share these names and defaults.
None means "depends on the format or the model" (see each field's `derived`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from llmc.optionfields import check_values, option
from llmc.quantize.formats import AWQ_METHODS, DEFAULTS, KV_CACHE_DTYPES, QFORMATS


def parse_exclude(value: str | list[str] | None) -> list[str]:
    """--exclude 'a,b' (or a list) -> patterns; 'none' / '-' -> [] (quantize every linear)."""
    if value is None:
        return list(DEFAULTS["exclude"])
    items = value if isinstance(value, list) else value.split(",")
    items = [s.strip() for s in items if s.strip()]
    return [] if items in (["none"], ["-"]) else items


def group_defaults() -> str:
    """'128 for int4_awq, ...; 32 for int4_asym, ...': each INT4 format's preferred group."""
    by_size: dict[int, list[str]] = {}
    for f in QFORMATS.values():
        if f.is_int4:
            by_size.setdefault(f.default_group_size, []).append(f.name)
    return "; ".join(f"{g} for {', '.join(names)}" for g, names in by_size.items())


def _smoothquant_alphas() -> str:
    return ", ".join(f"{f.default_sq_alpha} for {f.name}" for f in QFORMATS.values() if f.is_smoothquant)


@dataclass
class QuantizeOptions:
    """Every `llmc quantize` option (its input and output paths aside)."""

    qformat: str = option(choices=tuple(QFORMATS))
    kv_cache_dtype: str | None = option(None, choices=tuple(KV_CACHE_DTYPES),
                                        derived="the KV cache stays in the model dtype")
    calib_data: str = option(DEFAULTS["calib_data"])
    calib_size: int = option(DEFAULTS["calib_size"], ge=1)
    calib_seq_len: int = option(DEFAULTS["calib_seq_len"], ge=8)
    batch_size: int = option(DEFAULTS["batch_size"], ge=1)
    group_size: int | None = option(None, ge=1, derived=f"INT4 formats: {group_defaults()}, or the largest of "
                                    "64 / 32 that divides every quantized layer's input width; others: none")
    sq_alpha: float | None = option(None, ge=0.0, le=1.0, derived=f"SmoothQuant formats: {_smoothquant_alphas()}")
    awq_method: str | None = option(None, choices=tuple(AWQ_METHODS),
                                    derived=f"AWQ formats: {DEFAULTS['awq_method']} (chosen by measurement on SmolLM2)")
    exclude: list[str] = option(default_factory=lambda: list(DEFAULTS["exclude"]), parse=parse_exclude)
    seed: int = option(DEFAULTS["seed"])
    force: bool = option(False, recipe=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> "QuantizeOptions":
        """Choices and bounds (one-line LlmcErrors named like the CLI flags)."""
        check_values(self)
        return self
