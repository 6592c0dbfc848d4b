"""KV-cache quantization point of the reference attention.

TensorRT-LLM (and llmc's engine) store K after RoPE and V in the paged cache, per KV head, before
the heads are repeated for grouped-query attention. `attention_forward` runs the reference model's
own attention (`attention_with_kv_hooks`, the code `Attention.forward` runs) with hooks at exactly
that point: calibration plugs ModelOpt TensorQuantizers in (to collect amax), the simulation plugs
in the fake quantization the engine applies. One implementation, so the two cannot diverge.
"""

from __future__ import annotations

from typing import Callable

import torch

from llmc.models.reference import attention_with_kv_hooks

Hook = Callable[[torch.Tensor], torch.Tensor]


def attention_forward(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_hook: Hook, v_hook: Hook) -> torch.Tensor:
    """The reference model's attention with k_hook(k) / v_hook(v) applied to what the KV cache
    stores: k after RoPE and v, shaped [batch, kv_heads, seq, head_dim]."""
    return attention_with_kv_hooks(attn, x, cos, sin, k_hook, v_hook)
