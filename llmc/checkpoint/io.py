"""Read and write checkpoints (config.json + rank{N}.safetensors)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from llmc.checkpoint.config import CheckpointConfig
from llmc.checkpoint import tensor_parallel as tpmod
from llmc.errors import LlmcError, first_line


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank}.safetensors"


def open_safetensors(path: Path, missing: str = "missing rank file: checkpoint is incomplete"):
    """safe_open(path), with a one-line LlmcError for a missing (`missing`) or corrupt file."""
    from safetensors import safe_open

    if not path.is_file():
        raise LlmcError(missing, path)
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise LlmcError(f"corrupt or truncated safetensors file ({first_line(exc)})", path) from None


def check_layer_count(names, num_hidden_layers: int, source) -> None:
    """The config's num_hidden_layers must be exactly the number of layers the weights hold
    (checked before anything loops over the config's count, which may be absurd)."""
    import re

    layers = {int(m.group(1)) for n in names if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", n))}
    held = max(layers) + 1 if layers else 0
    if held != num_hidden_layers:
        raise LlmcError(f"config and weights disagree: num_hidden_layers is {num_hidden_layers} but the weights "
                        f"hold {held} layer(s)", source)


@dataclass
class Checkpoint:
    """An opened checkpoint directory. Tensors are read lazily, one at a time."""

    path: Path
    config: CheckpointConfig

    @property
    def world_size(self) -> int:
        return self.config.mapping.world_size

    def iter_rank(self, rank: int) -> Iterator[tuple[str, torch.Tensor]]:
        path = rank_file(self.path, rank)
        with open_safetensors(path) as f:
            for name in f.keys():
                try:
                    yield name, f.get_tensor(name)
                except Exception as exc:
                    raise LlmcError(f"cannot read tensor {name} ({exc})", path) from None

    def merged_tensors(self) -> dict[str, torch.Tensor]:
        """All ranks merged back into single tensors (TensorRT-LLM names)."""
        ranks = [dict(self.iter_rank(r)) for r in range(self.world_size)]
        merged = {name: tpmod.merge(name, [r[name] for r in ranks], self.config) for name in ranks[0]}
        if self.config.quantization.quant_algo is None:
            from llmc.checkpoint.schema import expected_shapes

            for name, shape in expected_shapes(self.config).items():
                if name not in merged:
                    raise LlmcError(f"missing tensor {name}", self.path)
                if tuple(merged[name].shape) != shape:
                    raise LlmcError(f"tensor {name} has shape {tuple(merged[name].shape)}, "
                                    f"expected {shape}", self.path)
        return merged

    def size_on_disk(self) -> int:
        from llmc.fsutil import dir_size

        return dir_size(self.path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise LlmcError("no such file or directory", path)
    if not path.is_dir():
        raise LlmcError("not a checkpoint directory", path)
    cfg = CheckpointConfig.load(path / "config.json")
    if "engine" in cfg.llmc:
        raise LlmcError("this is an engine directory, not a checkpoint", path)
    record = cfg.llmc.get("integrity")
    if record is not None:  # written by llmc >= issue 10; foreign checkpoints carry none
        from llmc.integrity import verify_record

        verify_record(path, record, rebuild="convert or quantize it again")
    for rank in range(cfg.mapping.world_size):
        with open_safetensors(rank_file(path, rank)) as f:
            if rank == 0:
                check_layer_count(f.keys(), cfg.num_hidden_layers, path)
    return Checkpoint(path, cfg)


def write_checkpoint(out_dir: str | Path, config: CheckpointConfig,
                     rank_tensors: list[dict[str, torch.Tensor]], side_files_from: str | Path | None = None) -> None:
    """Write config.json and one safetensors file per rank (in-memory; quantize uses this), with
    the tokenizer and generation files of `side_files_from` copied beside them; the integrity
    record then covers every file written."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    config.mapping.world_size = config.mapping.tp_size * config.mapping.pp_size
    if len(rank_tensors) != config.mapping.world_size:
        raise ValueError("one tensor dict per rank is required")
    for rank, tensors in enumerate(rank_tensors):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(rank_file(out_dir, rank)),
                  metadata={"format": "pt"})
    if side_files_from is not None:
        from llmc.tokenizer import copy_tokenizer_files

        copy_tokenizer_files(side_files_from, out_dir)
    from llmc.integrity import make_record

    # A record of the files written here (a config loaded from another checkpoint carries that
    # one's record, which no longer applies).
    config.llmc = {**config.llmc, "integrity": make_record(out_dir)}
    config.save(out_dir / "config.json")
