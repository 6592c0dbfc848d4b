"""Installed package versions and version comparison, for the stamps and checks that need them.

Versions are compared as tuples of their leading numbers ("1.23.0rc1" -> (1, 23, 0)), which is
all llmc's checks need (minimum ONNX Runtime, TensorRT's Attention importer, TensorRT-LLM's last
release with trtllm-build) and needs no `packaging` dependency.
"""

from __future__ import annotations


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution (pip name), or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except (PackageNotFoundError, ValueError):
        return None


def version_tuple(v: str | None, parts: int = 3) -> tuple[int, ...]:
    """The first `parts` numeric components of a version string; None or junk counts as 0."""
    out = []
    for part in (v or "0").split(".")[:parts]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)
