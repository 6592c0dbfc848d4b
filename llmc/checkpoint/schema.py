"""Which tensors a (tp-merged, unquantized) checkpoint holds, and their shapes.

One table drives validation at convert time (a source tensor of the wrong shape is a user error,
not a crash deep inside torch) and at load time (`llmc.checkpoint.validate`), and names the
linears quantization and the engine builder walk over (`linear_names`).
"""

from __future__ import annotations

from llmc.checkpoint.config import CheckpointConfig

LAYER = "transformer.layers.{i}."

# The linears of one decoder layer (TensorRT-LLM names, checkpoint order) -> (out, in) sizes, by
# the name of the size in `sizes()`. mlp.fc is HF's gate_proj, mlp.gate its up_proj.
LAYER_LINEARS: dict[str, tuple[str, str]] = {
    "attention.qkv": ("qkv_size", "hidden_size"),
    "attention.dense": ("hidden_size", "q_size"),
    "mlp.fc": ("intermediate_size", "hidden_size"),
    "mlp.gate": ("intermediate_size", "hidden_size"),
    "mlp.proj": ("hidden_size", "intermediate_size"),
}
LM_HEAD = "lm_head"


def sizes(cfg: CheckpointConfig) -> dict[str, int]:
    """The sizes `LAYER_LINEARS` names."""
    return {"hidden_size": cfg.hidden_size, "q_size": cfg.q_size, "qkv_size": cfg.q_size + 2 * cfg.kv_size,
            "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size}


def linear_names(num_layers: int) -> list[str]:
    """Every linear of a checkpoint (prefix without ".weight"), in checkpoint order, lm_head last."""
    return [LAYER.format(i=i) + n for i in range(num_layers) for n in LAYER_LINEARS] + [LM_HEAD]


def linear_shapes(cfg: CheckpointConfig) -> dict[str, tuple[int, int]]:
    """Every linear (prefix) -> its (out, in) weight shape, in `linear_names` order."""
    shapes = expected_shapes(cfg)
    return {p: shapes[p + ".weight"] for p in linear_names(cfg.num_hidden_layers)}


# Tensors that are never quantized (embedding and norms) end in one of these.
FLOAT_SUFFIXES = ("vocab_embedding.weight", "ln_f.weight", "layernorm.weight")


def float_shapes(cfg: CheckpointConfig) -> dict[str, tuple[int, ...]]:
    """Tensors that are never quantized: embedding and norms."""
    return {n: s for n, s in expected_shapes(cfg).items() if n.endswith(FLOAT_SUFFIXES)}


def expected_shapes(cfg: CheckpointConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the unquantized checkpoint -> its shape (the order convert writes them in)."""
    h, n = cfg.hidden_size, sizes(cfg)
    per_layer: dict[str, tuple[int, ...]] = {"input_layernorm.weight": (h,), "post_layernorm.weight": (h,)}
    per_layer.update({name + ".weight": (n[o], n[k]) for name, (o, k) in LAYER_LINEARS.items()})
    if cfg.attn_bias:
        per_layer["attention.qkv.bias"] = (n["qkv_size"],)
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.vocab_embedding.weight": (cfg.vocab_size, h),
        "transformer.ln_f.weight": (h,),
        LM_HEAD + ".weight": (cfg.vocab_size, h),
    }
    for i in range(cfg.num_hidden_layers):
        for suffix, shape in per_layer.items():
            shapes[LAYER.format(i=i) + suffix] = shape
    return shapes
