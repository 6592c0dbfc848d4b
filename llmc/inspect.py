"""Describe an artifact (checkpoint, or engine via llmc.engine) as a flat dict of facts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llmc.errors import LlmcError


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    from llmc.checkpoint.io import load_checkpoint
    from llmc.checkpoint.schema import expected_shapes

    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    shapes = expected_shapes(cfg)
    params = sum(math.prod(s) for n, s in shapes.items()
                 if not (n == "lm_head.weight" and cfg.tie_word_embeddings))
    q = cfg.quantization
    return {
        "kind": "checkpoint",
        "path": str(ckpt.path),
        "architecture": cfg.architecture,
        "parameters": params,
        "dtype": cfg.dtype,
        "quantization": q.quant_algo or "none",
        "group_size": q.group_size if q.quant_algo and "W4" in q.quant_algo else None,
        "kv_cache_quantization": q.kv_cache_quant_algo or "none",
        "tensor_parallel": {"tp_size": cfg.mapping.tp_size, "pp_size": cfg.mapping.pp_size,
                            "world_size": cfg.mapping.world_size},
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": f"{cfg.num_attention_heads} q / {cfg.num_key_value_heads} kv x {cfg.head_size}",
        "vocab_size": cfg.vocab_size,
        "rope": {"base": cfg.rotary_base, "scaling": cfg.rotary_scaling},
        "tied_embeddings": cfg.tie_word_embeddings,
        "size_on_disk_bytes": ckpt.size_on_disk(),
        "kv_cache_bytes_per_token": cfg.kv_cache_bytes_per_token(),
        "integrity": (f"{len(cfg.llmc['integrity'].get('files', {}))} files verified (full xxh3-128 digests)"
                      if isinstance(cfg.llmc.get("integrity"), dict) else "no record (not written by this llmc)"),
    }


def describe(path: str | Path, verify: bool = False) -> dict[str, Any]:
    """Facts about a checkpoint or engine. Checkpoints are always verified against their digests
    (as on every load); engines check file sizes, or full digests with `verify`."""
    path = Path(path)
    cfg_path = path / "config.json"
    if path.is_dir() and cfg_path.is_file():
        try:
            data = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise LlmcError(f"invalid JSON ({exc.msg})", cfg_path) from None
        except UnicodeDecodeError:
            raise LlmcError("config.json is not UTF-8 text", cfg_path) from None
        if isinstance(data, dict) and "engine" in data:
            from llmc.engine import describe_engine  # provided by the engine package

            return describe_engine(path, verify=verify)
    return describe_checkpoint(path)
