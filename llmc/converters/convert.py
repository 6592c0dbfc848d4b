"""The convert stage: a model source -> a TensorRT-LLM-layout checkpoint, streamed.

Each target tensor is read from the source, fused (q/k/v), cast, checked against its expected
shape, split across tensor-parallel ranks and appended to every rank file before the next one is
read, so peak memory stays near the largest tensor rather than the whole model.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmc import __version__
from llmc.checkpoint import tensor_parallel as tpmod
from llmc.checkpoint.config import CHECKPOINT_FORMAT_VERSION, CheckpointConfig
from llmc.checkpoint.io import check_layer_count, rank_file
from llmc.checkpoint.safetensors_stream import StreamingSafetensorsWriter
from llmc.checkpoint.schema import expected_shapes
from llmc.converters.family import Family
from llmc.converters.hf_config import checkpoint_config, source_dtype
from llmc.converters.registry import architecture_of, family_for
from llmc.converters.sources import ModelSource, open_source
from llmc.errors import LlmcError
from llmc.fsutil import atomic_output_dir
from llmc.integrity import make_record
from llmc.progress import stage_progress

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)


@dataclass
class ConvertResult:
    out: Path
    config: CheckpointConfig
    seconds: float
    num_params: int


def _source_names(family: Family, target: str, layer: int | None) -> tuple[str, ...]:
    pattern = family.name_map.get(target if layer is None else _layer_pattern(target))
    if pattern is None:
        raise KeyError(target)
    names = pattern if isinstance(pattern, tuple) else (pattern,)
    return tuple(n.replace("{i}", str(layer)) for n in names) if layer is not None else names


def _layer_pattern(name: str) -> str:
    parts = name.split(".")
    parts[2] = "{i}"
    return ".".join(parts)


def _layer_of(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith("transformer.layers.") else None


def _resolve(source: ModelSource, family: Family, target: str, cfg: CheckpointConfig) -> tuple[str, ...]:
    names = _source_names(family, target, _layer_of(target))
    if target == "lm_head.weight" and names[0] not in source.names():
        names = ("model.embed_tokens.weight",)  # tied embeddings
        cfg.tie_word_embeddings = True
    missing = [n for n in names if n not in source.names()]
    if missing:
        raise LlmcError(f"missing tensor {missing[0]} (needed for {target})", source.path)
    return names


def _load(source: ModelSource, names: tuple[str, ...], target: str, shape: tuple[int, ...],
          dtype: torch.dtype) -> torch.Tensor:
    parts = []
    for n in names:
        t = source.tensor(n)
        parts.append(t.to(dtype) if t.dtype != dtype else t)
    t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    if tuple(t.shape) != shape:
        raise LlmcError(f"tensor {names[0] if len(names) == 1 else '+'.join(names)} has shape "
                        f"{tuple(t.shape)} where {target} needs {shape}", source.path)
    return t


def _check_source_shapes(source: ModelSource, family: Family, cfg: CheckpointConfig,
                         plan: dict[str, tuple[str, ...]], shapes: dict[str, tuple[int, ...]]) -> None:
    """Fail before writing anything if a source tensor has the wrong shape."""
    for target, names in plan.items():
        src_shapes = [source.shape(n) for n in names]
        rows = sum(s[0] for s in src_shapes)
        fused = (rows, *src_shapes[0][1:]) if len(src_shapes) > 1 else src_shapes[0]
        if any(s[1:] != src_shapes[0][1:] for s in src_shapes) or fused != shapes[target]:
            raise LlmcError(f"tensor {'+'.join(names)} has shape {fused} where {target} needs "
                            f"{shapes[target]}", source.path)


# Source tensors that carry nothing a checkpoint needs (recomputed from the config).
IGNORED_SOURCE_SUFFIXES = ("rotary_emb.inv_freq",)


def _check_all_used(source: ModelSource, cfg: CheckpointConfig, plan: dict[str, tuple[str, ...]]) -> None:
    """Config and weights must agree exactly: a tensor the plan never reads means the config
    describes a different (e.g. truncated) model, which would otherwise convert silently."""
    used = {n for names in plan.values() for n in names}
    if cfg.tie_word_embeddings:
        used.add("lm_head.weight")  # a tied copy, stored by some exporters
    unused = sorted(n for n in source.names() - used if not n.endswith(IGNORED_SOURCE_SUFFIXES))
    if unused:
        import re

        layers = {int(m.group(1)) for n in source.names() if (m := re.search(r"layers\.(\d+)\.", n))}
        held = f"; the weights hold {max(layers) + 1} layers" if layers else ""
        raise LlmcError(f"config and weights disagree: {len(unused)} tensor(s) would be left unused, e.g. "
                        f"{unused[0]} (config num_hidden_layers={cfg.num_hidden_layers}{held})", source.path)


def convert(src: str | Path, out: str | Path, dtype: str = "auto", tp_size: int = 1,
            force: bool = False, progress: bool = True) -> ConvertResult:
    """Convert a Hugging Face directory or a GGUF file into a checkpoint at `out`."""
    start = time.perf_counter()
    if dtype not in DTYPE_CHOICES:
        raise LlmcError(f"unknown --dtype {dtype!r}; choose from {', '.join(DTYPE_CHOICES)}")
    source = open_source(src)
    arch = architecture_of(source.hf_config)
    source.hf_config["architectures"] = [arch]
    family = family_for(arch, source.path)
    resolved_dtype = source_dtype(source.hf_config) if dtype == "auto" else dtype
    cfg = checkpoint_config(source.hf_config, family, resolved_dtype, source.path)
    tpmod.check_tp_size(cfg, tp_size, str(source.path))
    cfg.mapping.tp_size = cfg.mapping.world_size = tp_size
    check_layer_count(source.names(), cfg.num_hidden_layers, source.path)
    shapes = expected_shapes(cfg)
    plan = {target: _resolve(source, family, target, cfg) for target in shapes}
    _check_source_shapes(source, family, cfg, plan, shapes)
    _check_all_used(source, cfg, plan)
    torch_dtype = DTYPES[resolved_dtype]
    cfg.llmc = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "llmc_version": __version__,
        "family": family.name,
        "source": str(Path(src).resolve()),
        "source_format": "gguf" if Path(src).is_file() else "hf",
    }
    num_params = 0
    elem = torch.empty((), dtype=torch_dtype).element_size()
    expected = sum(math.prod(s) for s in shapes.values()) * elem
    with atomic_output_dir(out, force=force, kind="checkpoint", inputs=[src], expected_bytes=expected) as tmp:
        writers = [StreamingSafetensorsWriter(
            rank_file(tmp, r),
            [(n, torch_dtype, tpmod.shard_shape(n, shapes[n], tp_size, cfg)) for n in shapes],
        ) for r in range(tp_size)]
        digest = hashlib.sha256()
        with stage_progress(progress, len(shapes), "convert") as advance:
            for target, names in plan.items():
                t = _load(source, names, target, shapes[target], torch_dtype)
                num_params += t.numel()
                digest.update(target.encode())
                for r, w in enumerate(writers):
                    w.write(target, tpmod.shard(target, t, r, tp_size, cfg))
                del t
                advance()
        for w in writers:
            w.close()
        cfg.llmc["tokenizer_files"] = source.write_tokenizer(tmp)
        cfg.llmc["integrity"] = make_record(tmp)
        cfg.save(tmp / "config.json")
    return ConvertResult(Path(out), cfg, time.perf_counter() - start, num_params)
