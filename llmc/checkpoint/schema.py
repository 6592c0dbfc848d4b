"""Which tensors a (tp-merged, unquantized) checkpoint holds, and their shapes.

One table drives validation at convert time (a source tensor of the wrong shape is a user error,
not a crash deep inside torch) and at load time.
"""

from __future__ import annotations

from llmc.checkpoint.config import CheckpointConfig

LAYER = "transformer.layers.{i}."


def expected_shapes(cfg: CheckpointConfig) -> dict[str, tuple[int, ...]]:
    h, inter, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qkv = cfg.q_size + 2 * cfg.kv_size
    per_layer: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (h,),
        "post_layernorm.weight": (h,),
        "attention.qkv.weight": (qkv, h),
        "attention.dense.weight": (h, cfg.q_size),
        "mlp.fc.weight": (inter, h),
        "mlp.gate.weight": (inter, h),
        "mlp.proj.weight": (h, inter),
    }
    if cfg.attn_bias:
        per_layer["attention.qkv.bias"] = (qkv,)
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.vocab_embedding.weight": (v, h),
        "transformer.ln_f.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for i in range(cfg.num_hidden_layers):
        for suffix, shape in per_layer.items():
            shapes[LAYER.format(i=i) + suffix] = shape
    return shapes
