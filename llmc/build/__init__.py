"""Build stage: checkpoint -> engine directory (one ONNX graph, + a TensorRT plan on GPU hosts).

    from llmc.build import BuildOptions, build_engine
    build_engine("ckpt/", "engine/", BuildOptions(max_batch_size=8))

Build-time code only (weights reading, the model graph, memory plan, TensorRT / TensorRT-LLM
builders); the artifact it writes is read by `llmc.engine`, which never imports this package, so
a serving host needs neither build code nor torch. Heavy modules are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmc.build.options import BuildOptions

if TYPE_CHECKING:  # pragma: no cover
    from llmc.build.builder import BuildResult, build_engine

__all__ = ["BuildOptions", "BuildResult", "build_engine"]

_LAZY = {"build_engine": "llmc.build.builder", "BuildResult": "llmc.build.builder"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmc.build' has no attribute {name!r}")
