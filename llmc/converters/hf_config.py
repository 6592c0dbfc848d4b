"""Hugging Face config.json -> checkpoint config, including every RoPE spelling.

transformers 4.x writes `rope_theta` and `rope_scaling`; transformers 5 writes
`rope_parameters` ({"rope_type", "rope_theta", ...}). Both become TensorRT-LLM's `rotary_base`
and `rotary_scaling` (`{"type": ..., "factor": ..., ...}`), so a Llama-3.1 config never breaks the
converter with a KeyError.
"""

from __future__ import annotations

from typing import Any

from llmc.checkpoint.config import ROPE_REQUIRED, CheckpointConfig
from llmc.converters.family import Family
from llmc.errors import LlmcError

SUPPORTED_ROPE_TYPES = tuple(t for t in ROPE_REQUIRED if t != "default")  # what llmc.models.rope computes
# Keys copied from the HF rope dict into rotary_scaling when present.
ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
             "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")

TORCH_DTYPE_NAMES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
                     "torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}


def rope_settings(hf: dict[str, Any], source: object) -> tuple[float, dict[str, Any] | None]:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    merged = {**params, **scaling}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise LlmcError(f"unsupported RoPE scaling type {rope_type!r}; supported: "
                        f"{', '.join(SUPPORTED_ROPE_TYPES)}", source)
    rot = {"type": rope_type}
    rot.update({k: merged[k] for k in ROPE_KEYS if merged.get(k) is not None})
    return float(theta), rot


def checkpoint_config(hf: dict[str, Any], family: Family, dtype: str, source: object) -> CheckpointConfig:
    try:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        if heads < 1 or hidden < 1:
            raise LlmcError(f"hidden_size ({hidden}) and num_attention_heads ({heads}) must be positive", source)
        theta, scaling = rope_settings(hf, source)
        extra = {k: hf.get(v) for k, v in family.extra_config.items()}
        cfg = CheckpointConfig(
            architecture=hf["architectures"][0],
            dtype=dtype,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_size=int(hf.get("head_dim") or hidden // heads),
            intermediate_size=int(hf["intermediate_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            hidden_act=hf.get("hidden_act", "silu"),
            norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            rotary_base=theta,
            rotary_scaling=scaling,
            attn_bias=family.attn_bias or bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **{k: v for k, v in extra.items() if v is not None},
        )
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError) as exc:
        raise LlmcError(f"config.json lacks or mangles a required field ({exc})", source) from None
    cfg.validate(source)
    if cfg.hidden_act != "silu":
        raise LlmcError(f"unsupported hidden_act {cfg.hidden_act!r} (only silu / SwiGLU)", source)
    if cfg.mlp_bias:
        raise LlmcError("mlp_bias=true is not supported", source)
    return cfg


def source_dtype(hf: dict[str, Any]) -> str:
    name = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    return TORCH_DTYPE_NAMES.get(name, "float32")
