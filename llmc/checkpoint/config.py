"""The checkpoint's config.json, in TensorRT-LLM's schema.

Keys follow TensorRT-LLM's `PretrainedConfig` so that a checkpoint written by llmc on a CPU box
can feed TensorRT-LLM's own builder. llmc-only facts (format version, source, tokenizer) live
under the "llmc" key, which TensorRT-LLM ignores.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmc.checkpoint.quant_algos import KV_CACHE_ALGOS
from llmc.errors import LlmcError

CHECKPOINT_FORMAT_VERSION = 1

# Bytes per element of every dtype name llmc stores (the one table; memory plan and KV pool use it).
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "int8": 1}
POSITIVE_INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "intermediate_size", "head_size", "max_position_embeddings")


# rotary_scaling["type"] -> keys it needs (llmc.models.rope reads them); every numeric RoPE key
# present must be a finite positive number.
ROPE_REQUIRED: dict[str, tuple[str, ...]] = {
    "default": (), "linear": ("factor",), "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (),
}
ROPE_NUMERIC = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "beta_fast",
                "beta_slow", "attention_factor", "mscale", "mscale_all_dim")


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check_rope(scaling: Any, source: object) -> None:
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise LlmcError(f"rotary_scaling must be an object or null (got {scaling!r})", source)
    kind = scaling.get("type", "default")
    if not isinstance(kind, str) or kind not in ROPE_REQUIRED:
        raise LlmcError(f"rotary_scaling.type {kind!r} is not one of {', '.join(ROPE_REQUIRED)}", source)
    for key in ROPE_REQUIRED[kind]:
        if key not in scaling:
            raise LlmcError(f"rotary_scaling of type {kind} needs {key}", source)
    for key in ROPE_NUMERIC:
        if scaling.get(key) is not None and not _positive_number(scaling[key]):
            raise LlmcError(f"rotary_scaling.{key} must be a positive number (got {scaling[key]!r})", source)
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise LlmcError("rotary_scaling: high_freq_factor must exceed low_freq_factor", source)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@dataclass
class Mapping:
    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1


@dataclass
class QuantConfig:
    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int = 128
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: list[str] | None = None
    smoothquant_val: float | None = None


@dataclass
class CheckpointConfig:
    architecture: str
    dtype: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_size: int = 0
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    norm_epsilon: float = 1e-5
    position_embedding_type: str = "rope_gpt_neox"
    rotary_base: float = 10000.0
    rotary_scaling: dict[str, Any] | None = None
    rotary_dim: int | None = None
    attn_bias: bool = False
    mlp_bias: bool = False
    logits_dtype: str = "float32"
    share_embedding_table: bool = False
    tie_word_embeddings: bool = False
    use_parallel_embedding: bool = False
    sliding_window: int | None = None
    mapping: Mapping = field(default_factory=Mapping)
    quantization: QuantConfig = field(default_factory=QuantConfig)
    llmc: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.head_size and _positive_int(self.num_attention_heads) and isinstance(self.hidden_size, int):
            self.head_size = self.hidden_size // self.num_attention_heads

    def validate(self, source: object = "config.json") -> "CheckpointConfig":
        """Every size a positive integer, heads consistent: a damaged or hostile config.json
        becomes one line naming the field, never a ZeroDivisionError deep in the graph code."""
        for name in POSITIVE_INT_FIELDS:
            v = getattr(self, name)
            if not _positive_int(v):
                raise LlmcError(f"{name} must be a positive integer (got {v!r})", source)
        for name in ("world_size", "tp_size", "pp_size"):
            v = getattr(self.mapping, name)
            if not _positive_int(v):
                raise LlmcError(f"mapping.{name} must be a positive integer (got {v!r})", source)
        if self.num_attention_heads % self.num_key_value_heads:
            raise LlmcError(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                            f"num_key_value_heads ({self.num_key_value_heads})", source)
        if self.dtype not in DTYPE_BYTES:
            raise LlmcError(f"unknown dtype {self.dtype!r}", source)
        for name in ("norm_epsilon", "rotary_base"):
            if not _positive_number(getattr(self, name)):
                raise LlmcError(f"{name} must be a positive number (got {getattr(self, name)!r})", source)
        _check_rope(self.rotary_scaling, source)
        q = self.quantization
        for name in ("quant_algo", "kv_cache_quant_algo"):
            if getattr(q, name) is not None and not isinstance(getattr(q, name), str):
                raise LlmcError(f"quantization.{name} must be a string or null (got {getattr(q, name)!r})", source)
        if not isinstance(q.group_size, int) or isinstance(q.group_size, bool):
            raise LlmcError(f"quantization.group_size must be an integer (got {q.group_size!r})", source)
        if not isinstance(self.architecture, str):
            raise LlmcError(f"architecture must be a string (got {self.architecture!r})", source)
        return self

    # --- derived sizes -------------------------------------------------------------------
    @property
    def tp_size(self) -> int:
        return self.mapping.tp_size

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_size

    def kv_cache_bytes_per_token(self, kv_dtype: str | None = None) -> int:
        """2 (K and V) x layers x kv_heads x head_dim x bytes per element of `kv_dtype` (a
        DTYPE_BYTES name, or a kv_cache_quant_algo name such as FP8; default: this checkpoint's KV
        quantization, else its dtype). The engine's KV pool and the build's memory plan use it."""
        algo = kv_dtype or self.quantization.kv_cache_quant_algo or self.dtype
        if algo in KV_CACHE_ALGOS:
            algo = KV_CACHE_ALGOS[algo].dtype
        nbytes = DTYPE_BYTES.get(algo, DTYPE_BYTES.get(self.dtype, 4))
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_size * nbytes

    # --- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path = "config.json") -> "CheckpointConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        for key in ("mapping", "quantization", "llmc"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise LlmcError(f"not a valid llmc/TensorRT-LLM checkpoint config ({key} is not an object)", source)
        try:
            mapping = Mapping(**{k: v for k, v in (d.pop("mapping", None) or {}).items()
                                 if k in {"world_size", "tp_size", "pp_size"}})
            qd = d.pop("quantization", None) or {}
            qnames = {f.name for f in dataclasses.fields(QuantConfig)}
            quant = QuantConfig(**{k: v for k, v in qd.items() if k in qnames})
            known = {k: v for k, v in d.items() if k in names and k not in ("extra",)}
            extra = {k: v for k, v in d.items() if k not in names}
            return cls(**known, mapping=mapping, quantization=quant, extra=extra).validate(source)
        except TypeError as exc:
            raise LlmcError(f"not a valid llmc/TensorRT-LLM checkpoint config ({exc})", source) from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CheckpointConfig":
        path = Path(path)
        from llmc.fsutil import read_json

        try:
            data = read_json(path)
        except FileNotFoundError:
            raise LlmcError("missing config.json: not a checkpoint directory", path.parent) from None
        except OSError as exc:
            raise LlmcError(f"cannot read config.json ({exc.strerror or exc})", path) from None
        if not isinstance(data, dict) or "architecture" not in data:
            raise LlmcError("not an llmc/TensorRT-LLM checkpoint config (no 'architecture' key)", path)
        return cls.from_dict(data, path)
