"""TensorRT-LLM-layout checkpoints: config.json + rank{N}.safetensors.

`llmc.checkpoint.io` needs torch; it is imported lazily so that loading an engine (which only
reads the checkpoint config) works in a torch-free environment such as Triton's model venv.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmc.checkpoint.config import CheckpointConfig, Mapping, QuantConfig

if TYPE_CHECKING:  # pragma: no cover
    from llmc.checkpoint.io import Checkpoint, load_checkpoint, write_checkpoint

__all__ = ["Checkpoint", "CheckpointConfig", "Mapping", "QuantConfig", "load_checkpoint", "write_checkpoint"]

_LAZY = {"Checkpoint", "load_checkpoint", "write_checkpoint"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from llmc.checkpoint import io

        return getattr(io, name)
    raise AttributeError(f"module 'llmc.checkpoint' has no attribute {name!r}")
