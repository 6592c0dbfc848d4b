"""The reference PyTorch model: one definition for every supported family.

It runs directly on a checkpoint (any rank count, merged on load) and is what ModelOpt
calibrates and what `llmc eval` measures. Module names mirror TensorRT-LLM's tensor names, so a
ModelOpt quantizer's name maps straight onto the checkpoint tensor it produces. The gated MLP's
two input projections are one Linear (`mlp.gate_up`, rows [fc; gate]): they share an input, so
calibration gives them one input scale, exactly what the engine's fused matmul executes. Family
differences are flags on the config (qkv bias, tied embeddings, RoPE scaling, GQA), not classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmc.checkpoint.config import CheckpointConfig
from llmc.models.rope import rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, -1)
    return torch.cat([-b, a], -1)


class Attention(nn.Module):
    def __init__(self, cfg: CheckpointConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attn_bias)
        self.dense = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return attention_with_kv_hooks(self, x, cos, sin)


def attention_with_kv_hooks(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            k_hook=None, v_hook=None) -> torch.Tensor:
    """The attention computation, with optional hooks on exactly what a KV cache stores (K after
    RoPE and V, [batch, kv_heads, seq, head_dim], before the heads are repeated for GQA).
    Calibration plugs ModelOpt's KV quantizers in there; the simulation plugs in the engine's
    fake quantization (llmc.quantize.simulate). One implementation, so the two cannot diverge."""
    cfg = attn.cfg
    b, s, _ = x.shape
    q, k, v = attn.qkv(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], -1)
    q = q.view(b, s, cfg.num_attention_heads, cfg.head_size).transpose(1, 2)
    k = k.view(b, s, cfg.num_key_value_heads, cfg.head_size).transpose(1, 2)
    v = v.view(b, s, cfg.num_key_value_heads, cfg.head_size).transpose(1, 2)
    cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    if k_hook is not None:
        k = k_hook(k)
    if v_hook is not None:
        v = v_hook(v)
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    k = k.repeat_interleave(groups, 1)
    v = v.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.dense(out.transpose(1, 2).reshape(b, s, cfg.q_size))


class GatedMLP(nn.Module):
    def __init__(self, cfg: CheckpointConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc, gate = self.gate_up(x).split(self.inter, -1)
        return self.proj(F.silu(fc) * gate)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: CheckpointConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.attention = Attention(cfg)
        self.post_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.mlp = GatedMLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: CheckpointConfig):
        super().__init__()
        self.vocab_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)


class ReferenceModel(nn.Module):
    def __init__(self, cfg: CheckpointConfig):
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        b, s = input_ids.shape
        if positions is None:
            positions = torch.arange(s, device=input_ids.device)[None].expand(b, s)
        cos, sin = rope_cos_sin(self.config, positions)
        x = self.transformer.vocab_embedding(input_ids)
        for layer in self.transformer.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.transformer.ln_f(x)).float()

    # ---------------------------------------------------------------------------------------
    @staticmethod
    def state_dict_from_checkpoint(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint names -> module names: fuse mlp.fc + mlp.gate into mlp.gate_up."""
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if ".mlp.fc.weight" in name:
                out[name.replace("mlp.fc.weight", "mlp.gate_up.weight")] = torch.cat(
                    [t, tensors[name.replace("mlp.fc.", "mlp.gate.")]], 0)
            elif ".mlp.gate.weight" in name:
                continue
            else:
                out[name] = t
        return out

    @classmethod
    def from_checkpoint(cls, ckpt, dtype: torch.dtype = torch.float32) -> "ReferenceModel":
        """Build from a checkpoint path or an opened `Checkpoint` (unquantized tensors)."""
        from llmc.checkpoint.io import Checkpoint, load_checkpoint

        if not isinstance(ckpt, Checkpoint):
            ckpt = load_checkpoint(Path(ckpt))
        if ckpt.config.quantization.quant_algo:
            raise ValueError("quantized checkpoint: use llmc.quantize.simulate to build its model")
        with torch.device("meta"):
            model = cls(ckpt.config)
        state = cls.state_dict_from_checkpoint(ckpt.merged_tensors())
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
        return model.eval()
