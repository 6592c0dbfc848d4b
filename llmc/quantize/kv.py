"""KV-cache quantization point of the reference attention.

TensorRT-LLM (and llmc's engine) store K after RoPE and V in the paged cache, per KV head, before
the heads are repeated for grouped-query attention. `attention_forward` is the reference model's
`Attention.forward` with a hook at exactly that point: calibration plugs ModelOpt TensorQuantizers
in (to collect amax), the simulation plugs in the fake quantization the engine applies.
`tests/test_quantize_simulate.py` checks that with identity hooks it equals the reference model
bit for bit, so a change to the reference attention cannot silently diverge from this copy.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from llmc.models.reference import rotate_half

Hook = Callable[[torch.Tensor], torch.Tensor]


def attention_forward(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_hook: Hook, v_hook: Hook) -> torch.Tensor:
    """llmc.models.reference.Attention.forward with k_hook(k) / v_hook(v) applied to what the KV
    cache stores: k after RoPE and v, shaped [batch, kv_heads, seq, head_dim]."""
    cfg = attn.cfg
    b, s, _ = x.shape
    q, k, v = attn.qkv(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], -1)
    q = q.view(b, s, cfg.num_attention_heads, cfg.head_size).transpose(1, 2)
    k = k.view(b, s, cfg.num_key_value_heads, cfg.head_size).transpose(1, 2)
    v = v.view(b, s, cfg.num_key_value_heads, cfg.head_size).transpose(1, 2)
    cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k, v = k_hook(k), v_hook(v)
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    k = k.repeat_interleave(groups, 1)
    v = v.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.dense(out.transpose(1, 2).reshape(b, s, cfg.q_size))
