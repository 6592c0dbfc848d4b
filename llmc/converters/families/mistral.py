"""Mistral: the Llama layout plus a sliding-window setting, carried into the config."""

from llmc.converters.family import LLAMA_NAME_MAP, Family

FAMILY = Family(
    name="mistral",
    architectures=("MistralForCausalLM",),
    name_map=LLAMA_NAME_MAP,
    model_types=("mistral",),
    extra_config={"sliding_window": "sliding_window"},
)
