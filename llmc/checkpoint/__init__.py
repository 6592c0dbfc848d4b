"""TensorRT-LLM-layout checkpoints: config.json + rank{N}.safetensors."""

from llmc.checkpoint.config import CheckpointConfig, Mapping, QuantConfig
from llmc.checkpoint.io import Checkpoint, load_checkpoint, write_checkpoint

__all__ = ["Checkpoint", "CheckpointConfig", "Mapping", "QuantConfig", "load_checkpoint", "write_checkpoint"]
