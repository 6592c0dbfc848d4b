"""The memory plan printed before a build and stored in the engine config.

weights:      engine weights in their stored precision (tied lm_head counted once; FP8 on the
              ORT CPU backend is dequantized to the compute dtype, so it counts 4 bytes/weight).
              Printed before lowering, it counts the embedding and lm_head as float; the engine
              config records the bytes the graph really stores.
kv_pool_max:  a pool holding max_batch_size sequences of max_seq_len tokens.
kv_pool:      the default pool (kv_cache_blocks), what `allocate_kv_pool()` takes by default.
activations:  a rough peak for one step of max_num_tokens tokens (hidden states, the widest
              matmul outputs, attention scores of the longest prefill row, logits).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from llmc.checkpoint.config import DTYPE_BYTES, CheckpointConfig
from llmc.fsutil import human_bytes

@dataclass
class MemoryPlan:
    weights: int
    kv_bytes_per_block: int
    kv_pool_max: int
    kv_pool: int
    kv_pool_blocks: int
    activations: int

    @property
    def total_max(self) -> int:
        return self.weights + self.kv_pool_max + self.activations

    def to_dict(self) -> dict:
        return {**asdict(self), "total_max": self.total_max}


def kv_bytes_per_block(cfg: CheckpointConfig, block_size: int, kv_dtype: str) -> int:
    return block_size * cfg.kv_cache_bytes_per_token(kv_dtype)


def estimate_weights(tensors: dict[str, torch.Tensor], cfg: CheckpointConfig, compute_dtype: str,
                     fp8_dequantized: bool) -> int:
    total = 0
    emb = tensors.get("transformer.vocab_embedding.weight")
    for name, t in tensors.items():
        if name.endswith("kv_cache_scaling_factor"):
            continue
        if name == "lm_head.weight" and emb is not None and t.shape == emb.shape and torch.equal(t, emb):
            continue
        n = t.numel()
        if t.is_floating_point() and t.dtype != torch.float8_e4m3fn and n > 1:
            total += n * DTYPE_BYTES[compute_dtype]
        elif t.dtype == torch.float8_e4m3fn and fp8_dequantized:
            total += n * DTYPE_BYTES[compute_dtype]
        else:
            total += n * t.element_size()
    return total


def plan_memory(tensors: dict[str, torch.Tensor], cfg: CheckpointConfig, opts, compute_dtype: str,
                kv_dtype: str, fp8_dequantized: bool) -> MemoryPlan:
    per_block = kv_bytes_per_block(cfg, opts.tokens_per_block, kv_dtype)
    blocks_max = opts.max_batch_size * math.ceil(opts.max_seq_len / opts.tokens_per_block)
    e = DTYPE_BYTES[compute_dtype]
    T = opts.max_num_tokens
    widest = max(cfg.q_size + 2 * cfg.kv_size, 2 * cfg.intermediate_size)
    hidden = T * (3 * cfg.hidden_size + widest + cfg.intermediate_size) * e
    row = min(T, opts.max_input_len)
    scores = row * opts.max_seq_len * cfg.num_attention_heads * 4
    gathered = 2 * T * opts.max_seq_len * cfg.kv_size * e if T > 1 else 0
    logits = max(opts.max_batch_size, 1) * cfg.vocab_size * 4
    acts = hidden + scores + min(gathered, 2 * blocks_max * per_block // max(cfg.num_hidden_layers, 1)) + logits
    rope_tables = 2 * opts.max_seq_len * cfg.head_size * e
    return MemoryPlan(
        weights=estimate_weights(tensors, cfg, compute_dtype, fp8_dequantized) + rope_tables,
        kv_bytes_per_block=per_block,
        kv_pool_max=blocks_max * per_block,
        kv_pool=opts.kv_cache_blocks * per_block,
        kv_pool_blocks=opts.kv_cache_blocks,
        activations=int(acts),
    )


human = human_bytes  # the one formatter, in llmc.fsutil


def render_plan(plan: MemoryPlan, opts, kv_dtype: str, console=None) -> None:
    from llmc.console import err_console, table

    console = console or err_console()
    t = table("memory plan (at the max settings)", ["item", ("bytes", {"justify": "right"}), "detail"])
    t.add_row("weights", human(plan.weights), "in stored precision; embedding and lm_head counted float "
              "(an exact int8-block copy stores less)")
    t.add_row("KV pool (max)", human(plan.kv_pool_max),
              f"{opts.max_batch_size} seqs x {opts.max_seq_len} tokens, {kv_dtype}, "
              f"{human(plan.kv_bytes_per_block)}/block of {opts.tokens_per_block}")
    t.add_row("KV pool (default)", human(plan.kv_pool), f"{plan.kv_pool_blocks} blocks (--kv-cache-blocks)")
    t.add_row("activations (peak, est.)", human(plan.activations), f"{opts.max_num_tokens} tokens per step")
    t.add_row("total (max)", human(plan.total_max), "")
    console.print(t)
