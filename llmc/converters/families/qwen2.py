"""Qwen2 / Qwen2.5: the Llama layout with a bias on the fused q/k/v projection."""

from llmc.converters.family import LLAMA_NAME_MAP, QKV_BIAS_MAP, Family

FAMILY = Family(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    name_map={**LLAMA_NAME_MAP, **QKV_BIAS_MAP},
    attn_bias=True,
    model_types=("qwen2",),
)
