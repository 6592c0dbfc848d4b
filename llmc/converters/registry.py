"""Families register themselves by architecture name (every module in converters/families)."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from llmc.converters.family import Family
from llmc.errors import LlmcError


@cache
def families() -> dict[str, Family]:
    import llmc.converters.families as pkg

    table: dict[str, Family] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        family: Family = importlib.import_module(f"{pkg.__name__}.{info.name}").FAMILY
        for arch in family.architectures:
            table[arch] = family
    return table


def supported_architectures() -> list[str]:
    return sorted(families())


def architecture_of(hf_config: dict) -> str | None:
    """`architectures[0]`, or the family's architecture for a bare `model_type`."""
    archs = hf_config.get("architectures") or []
    if isinstance(archs, list) and archs:
        return archs[0] if isinstance(archs[0], str) else repr(archs[0])
    model_type = hf_config.get("model_type")
    if not isinstance(model_type, str):
        return None
    for arch, family in families().items():
        if model_type in family.model_types:
            return arch
    return model_type


def family_for(architecture: str | None, source: object) -> Family:
    table = families()
    if architecture not in table:
        raise LlmcError(f"unsupported architecture {architecture!r}; supported: "
                        f"{', '.join(supported_architectures())}", source)
    return table[architecture]
