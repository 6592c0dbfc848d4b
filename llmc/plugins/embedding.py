"""The token-embedding lookup: a float Gather, or ONNX Runtime's GatherBlockQuantized.

An integer-quantized engine otherwise keeps the embedding table in float32 for its Gather:
for SmolLM2-135M that is 108 MiB of a ~220 MiB int4 engine. When the table is EXACTLY int8 x
per-32-block scales (weights dequantized from GGUF Q8_0 are: `exact_int8_blocks` checks every
element bit for bit) the engine stores it that way and looks rows up with
`com.microsoft.GatherBlockQuantized` (uint8 data = q + 128, its default zero point for 8 bits,
float32 block scales), which returns (u - 128) * scale = q * d, the same float32 values as the
float table: logits are unchanged.

Used only where the float table is not needed anyway: ONNX Runtime, float32 activations (a
float16 table is rounded, the block dequantization would not be) and an engine whose lm_head
does not read the table as its float weight (`llmc build --lm-head auto` picks int8 blocks on
integer-quantized checkpoints; float engines stay float throughout).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from llmc.plugins.graph import CONTRIB_DOMAIN, GraphBuilder
from llmc.plugins.base import Target
from llmc.plugins.linear import Int8Blocks, exact_int8_blocks


def emit_embedding(g: GraphBuilder, t: Target, table: np.ndarray, input_ids: str, *,
                   allow_blocks: bool, known_blocks: Int8Blocks | None = None) -> tuple[str, str | None]:
    """[num_tokens] ids -> [num_tokens, hidden]. Returns (rows, float table initializer or None
    when the table is stored as int8 blocks). `known_blocks`: the table's int8 blocks when the
    caller already found them (a tied lm_head), so the element-wise check is not run twice."""
    blocks = None
    if allow_blocks and not t.is_trt and t.dtype == TensorProto.FLOAT:
        blocks = known_blocks if known_blocks is not None else exact_int8_blocks(table)
    if blocks is None:
        emb = g.weight("transformer.vocab_embedding.weight", table, t.dtype)
        return g.op("Gather", [emb, input_ids], name="embed", axis=0), emb
    data = g.weight("transformer.vocab_embedding.weight_u8",
                    (blocks.weight.astype(np.int16) + 128).astype(np.uint8))
    scales = g.weight("transformer.vocab_embedding.weight_scale", np.asarray(blocks.weight_scale, np.float32))
    rows = g.op("GatherBlockQuantized", [data, input_ids, scales], name="embed", domain=CONTRIB_DOMAIN,
                gather_axis=0, quantize_axis=1, block_size=int(blocks.block), bits=8)
    return rows, None
