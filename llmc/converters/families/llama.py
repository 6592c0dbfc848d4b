"""Llama 2, 3, 3.1, 3.2, SmolLM2, TinyLlama: RMSNorm, SwiGLU, RoPE, grouped-query attention."""

from llmc.converters.family import LLAMA_NAME_MAP, Family

FAMILY = Family(name="llama", architectures=("LlamaForCausalLM",), name_map=LLAMA_NAME_MAP,
                model_types=("llama",))
