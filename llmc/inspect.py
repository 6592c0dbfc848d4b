"""Describe an artifact (checkpoint, or engine via llmc.engine) as a flat dict of facts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any



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
        "quantization": qformat_label(ckpt_meta_qformat(cfg), q.quant_algo),
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


def ckpt_meta_qformat(cfg) -> str | None:
    """The `--qformat` name llmc recorded when it quantized the checkpoint (None otherwise)."""
    meta = cfg.to_dict().get("llmc") or {}
    q = meta.get("quantization") if isinstance(meta, dict) else None
    return q.get("qformat") if isinstance(q, dict) else None


def qformat_label(qformat: str | None, quant_algo: str | None) -> str:
    """`int8_sq (W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN)`: the short name users type, algo beside it."""
    if not quant_algo:
        return "none"
    if qformat is None:
        from llmc.quantize.formats import QFORMATS

        names = [f.name for f in QFORMATS.values() if f.quant_algo == quant_algo]
        qformat = names[0] if len(names) == 1 else None
    return f"{qformat} ({quant_algo})" if qformat else quant_algo


def describe_gguf(path: Path) -> dict[str, Any]:
    """A .gguf file: the model it holds and how its tensors are quantized."""
    from llmc.converters.sources import GGUFSource

    src = GGUFSource(path)
    cfg = src.hf_config
    types: dict[str, int] = {}
    params = 0
    for name in src.names():
        t = src._tensors[name]
        n = int(math.prod(int(d) for d in t.shape))
        params += n
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + n
    return {
        "kind": "gguf",
        "path": str(path),
        "architecture": cfg.get("architectures", ["?"])[0],
        "gguf_architecture": src.arch,
        "parameters": params,
        "tensor_types": {k: f"{100 * v / params:.1f}% of weights" for k, v in
                         sorted(types.items(), key=lambda kv: -kv[1])},
        "layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "heads": f"{cfg.get('num_attention_heads')} q / {cfg.get('num_key_value_heads')} kv",
        "vocab_size": cfg.get("vocab_size"),
        "context_length": cfg.get("max_position_embeddings"),
        "tied_embeddings": cfg.get("tie_word_embeddings"),
        "size_on_disk_bytes": path.stat().st_size,
        "convert_with": f"llmc convert {path} -o CHECKPOINT",
    }


def describe(path: str | Path, verify: bool = False) -> dict[str, Any]:
    """Facts about a checkpoint or engine. Checkpoints are always verified against their digests
    (as on every load); engines check file sizes, or full digests with `verify`."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return describe_gguf(path)
    cfg_path = path / "config.json"
    if path.is_dir() and cfg_path.is_file():
        from llmc.fsutil import read_json

        data = read_json(cfg_path)
        if isinstance(data, dict) and "engine" in data:
            from llmc.engine import describe_engine  # provided by the engine package

            facts = describe_engine(path, verify=verify)
            # the short --qformat name users type, algo beside it (the engine stores its kernel kind)
            qformat, algo = facts.pop("qformat"), facts.pop("quant_algo")
            if algo:
                facts["quantization"] = qformat_label(qformat, algo)
            return facts
    return describe_checkpoint(path)
