"""What a model family is, declaratively.

A family is a name map from each TensorRT-LLM tensor name to its Hugging Face source name(s)
(a tuple means "concatenate along the output dimension": the q/k/v fusion), plus the few config
flags that differ between families. `{i}` stands for the layer index, as in gpt-fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Source = str | tuple[str, ...]

LLAMA_NAME_MAP: dict[str, Source] = {
    "transformer.vocab_embedding.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "transformer.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "transformer.layers.{i}.post_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "transformer.layers.{i}.attention.qkv.weight": (
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
    ),
    "transformer.layers.{i}.attention.dense.weight": "model.layers.{i}.self_attn.o_proj.weight",
    # TensorRT-LLM's counter-intuitive naming: fc is the activated branch (HF gate_proj),
    # gate is the linear branch (HF up_proj).
    "transformer.layers.{i}.mlp.fc.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "transformer.layers.{i}.mlp.gate.weight": "model.layers.{i}.mlp.up_proj.weight",
    "transformer.layers.{i}.mlp.proj.weight": "model.layers.{i}.mlp.down_proj.weight",
}

QKV_BIAS_MAP: dict[str, Source] = {
    "transformer.layers.{i}.attention.qkv.bias": (
        "model.layers.{i}.self_attn.q_proj.bias",
        "model.layers.{i}.self_attn.k_proj.bias",
        "model.layers.{i}.self_attn.v_proj.bias",
    ),
}


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    name_map: dict[str, Source]
    attn_bias: bool = False
    # HF `model_type` values, used when config.json has no `architectures` list.
    model_types: tuple[str, ...] = ()
    # Extra config keys read from the HF config: checkpoint key -> HF key.
    extra_config: dict[str, str] = field(default_factory=dict)
