"""Model sources: a Hugging Face directory or a single GGUF file, behind one interface.

Both present the Hugging Face view (HF config dict, HF tensor names) so that the family name maps
are written once. Tensors are read one at a time, so conversion streams.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from llmc.errors import LlmcError, first_line
from llmc.fsutil import read_json


class ModelSource(Protocol):
    path: Path
    hf_config: dict[str, Any]

    def names(self) -> set[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def tensor(self, name: str) -> torch.Tensor: ...
    def write_tokenizer(self, out: Path) -> list[str]: ...


# --------------------------------------------------------------------------------------------
# Hugging Face directory
# --------------------------------------------------------------------------------------------
class HFSource:
    def __init__(self, path: Path):
        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise LlmcError("no config.json: not a Hugging Face model directory", path)
        self.hf_config = read_json(cfg_path)
        if not isinstance(self.hf_config, dict):
            raise LlmcError(f"config.json must hold a JSON object, not a {type(self.hf_config).__name__}",
                            cfg_path)
        self._file_of = self._index_files()
        self._handles: dict[Path, Any] = {}

    def _index_files(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not all(isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
                           for v in weight_map.values()):
                    raise ValueError("weight_map values must be file names in the model directory")
                return {name: self.path / fname for name, fname in weight_map.items()}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
                raise LlmcError(f"invalid safetensors index ({exc})", index) from None
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise LlmcError("no *.safetensors weights found (pytorch .bin is not supported)", self.path)
        mapping: dict[str, Path] = {}
        for f in files:
            for name in self._open(f).keys():
                mapping[name] = f
        return mapping

    def _open(self, f: Path):
        if f not in getattr(self, "_handles", {}):
            from llmc.checkpoint.io import open_safetensors

            self._handles = getattr(self, "_handles", {})
            self._handles[f] = open_safetensors(f, missing="missing safetensors shard named by the index")
        return self._handles[f]

    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._file_of[name]).get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        f = self._file_of[name]
        try:
            return self._open(f).get_tensor(name)
        except Exception as exc:
            raise LlmcError(f"cannot read tensor {name} ({first_line(exc)})", f) from None

    def write_tokenizer(self, out: Path) -> list[str]:
        from llmc.tokenizer import copy_tokenizer_files

        return copy_tokenizer_files(self.path, out)


# --------------------------------------------------------------------------------------------
# GGUF file
# --------------------------------------------------------------------------------------------
# llama.cpp tensor names -> Hugging Face names (llama architecture).
GGUF_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# GGUF metadata (after the "<arch>." prefix) -> HF config key.
GGUF_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}

GGUF_REQUIRED_KEYS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# llama.cpp permutes q/k rows of Llama models for its RoPE kernel; undo that (Qwen2 is stored as-is).
GGUF_PERMUTED_QK = {"llama"}


# GGUF block types whose codes are kept exactly by `convert --keep-quantization` (32-wide blocks)
GGUF_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q8_0")


@dataclass
class GGUFBlocks:
    """A GGUF block-quantized matrix [rows, cols]: real = codes * scale (+ zero) per 32-block.

    codes: int8 [rows, cols] (4-bit types: the nibble minus 8, in [-8, 7]); scale and zero: float32
    [rows, cols / 32] (zero: Q4_1's m + 8 d; None for the symmetric Q4_0 / Q8_0)."""

    kind: str
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None

    @property
    def bits(self) -> int:
        return 8 if self.kind == "Q8_0" else 4

    def map_rows(self, fn) -> "GGUFBlocks":
        return GGUFBlocks(self.kind, fn(self.codes), fn(self.scale), None if self.zero is None else fn(self.zero))

    def dequantize(self) -> torch.Tensor:
        w = self.codes.float() * self.scale.repeat_interleave(32, dim=1)
        return w if self.zero is None else w + self.zero.repeat_interleave(32, dim=1)


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert_hf_to_gguf `permute` of q/k projection rows."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self._reader = gguf.GGUFReader(str(path))
        except Exception as exc:
            raise LlmcError(f"not a readable GGUF file ({first_line(exc)})", path) from None
        arch = _field(self._reader, "general.architecture")
        if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
            raise LlmcError(f"unsupported GGUF architecture {arch!r}; supported: "
                            f"{', '.join(sorted(GGUF_ARCHITECTURES))}", path)
        self.arch = arch
        cfg: dict[str, Any] = {"architectures": [GGUF_ARCHITECTURES[arch]], "hidden_act": "silu",
                               "dtype": "float32"}
        for key, hf_key in GGUF_CONFIG_KEYS.items():
            value = _field(self._reader, f"{arch}.{key}")
            if value is not None:
                cfg[hf_key] = value
        tokens = self._reader.fields.get("tokenizer.ggml.tokens")
        if "vocab_size" not in cfg and tokens is not None:
            cfg["vocab_size"] = len(tokens.data)
        self._tensors = {}
        for t in self._reader.tensors:
            for pattern, hf in GGUF_TENSOR_NAMES.items():
                name = _match_layer_name(t.name, pattern, hf)
                if name:
                    self._tensors[name] = t
                    break
        cfg["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        for key in GGUF_REQUIRED_KEYS:
            if GGUF_CONFIG_KEYS[key] not in cfg:
                raise LlmcError(f"GGUF metadata lacks {arch}.{key}", path)
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        except (TypeError, ValueError):
            raise LlmcError(f"GGUF metadata {arch}.embedding_length / {arch}.attention.head_count are not "
                            "integers", path) from None
        if hidden < 1 or heads < 1:
            raise LlmcError(f"GGUF metadata: embedding_length ({hidden}) and attention.head_count ({heads}) "
                            "must be positive", path)
        cfg["head_dim"] = hidden // heads
        for key in ("bos_token_id", "eos_token_id"):
            value = _field(self._reader, f"tokenizer.ggml.{key}")
            if value is not None:
                cfg[key] = int(value)
        self.hf_config = cfg
        self._chat_template = _field(self._reader, "tokenizer.chat_template")
        # The parsed metadata (one numpy view per vocabulary entry and merge) costs ~170 MB for a
        # 49k vocabulary; everything needed from it is read above, so let it go before streaming.
        self._reader.fields.clear()

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def tensor(self, name: str) -> torch.Tensor:
        import gguf

        t = self._tensors[name]
        shape = self.shape(name)
        out = np.empty(shape, dtype=np.float32)
        rows = out.reshape(-1, shape[-1])
        # Dequantize a few MB of rows at a time: gguf's dequantizers allocate several float
        # intermediates the size of their input, which would triple the peak on big tensors.
        step = max(1, (4 << 20) // (4 * shape[-1]))
        try:
            raw = t.data.reshape(rows.shape[0], -1)
            for start in range(0, rows.shape[0], step):
                chunk = gguf.quants.dequantize(raw[start:start + step], t.tensor_type)
                rows[start:start + step] = chunk.reshape(-1, shape[-1])
        except Exception as exc:
            raise LlmcError(f"cannot dequantize {t.name} ({t.tensor_type.name}: {exc})", self.path) from None
        data = out
        w = torch.from_numpy(data).reshape(self.shape(name))
        heads = self._permuted_heads(name)
        return w if heads is None else _unpermute(w, heads)

    def _permuted_heads(self, name: str) -> int | None:
        """Heads of a q/k projection whose rows llama.cpp permuted (None: not permuted)."""
        if self.arch not in GGUF_PERMUTED_QK:
            return None
        heads = self.hf_config["num_attention_heads"]
        if name.endswith("q_proj.weight"):
            return heads
        if name.endswith("k_proj.weight"):
            return self.hf_config.get("num_key_value_heads") or heads
        return None

    def type_name(self, name: str) -> str:
        """The GGUF storage type of a tensor (F32, Q4_0, Q4_1, Q8_0, Q4_K ...)."""
        return self._tensors[name].tensor_type.name

    def blocks(self, name: str) -> "GGUFBlocks | None":
        """A Q4_0 / Q4_1 / Q8_0 matrix as its stored integer codes and per-block scales (q/k
        rows un-permuted like `tensor`), or None for any other type. No rounding happens: the
        values are d * q (+ m) exactly as llama.cpp dequantizes them."""
        t = self._tensors[name]
        kind = t.tensor_type.name
        if kind not in GGUF_BLOCK_TYPES or len(self.shape(name)) != 2:
            return None
        rows, cols = self.shape(name)
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(rows, cols // 32, -1)
        d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = None
        if kind == "Q8_0":
            q = raw[..., 2:34].copy().view(np.int8).reshape(rows, cols)
        else:
            qs = raw[..., 4:20] if kind == "Q4_1" else raw[..., 2:18]
            u = np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.int16)   # [rows, blocks, 32]
            q = (u - 8).astype(np.int8).reshape(rows, cols)                      # symmetric nibble
            if kind == "Q4_1":  # d * u + m = d * (u - 8) + (m + 8 d)
                m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
                zero = m + np.float32(8.0) * d
        out = GGUFBlocks(kind, torch.from_numpy(q), torch.from_numpy(d), None if zero is None else torch.from_numpy(zero))
        heads = self._permuted_heads(name)
        return out if heads is None else out.map_rows(lambda a: _unpermute(a, heads))

    def write_tokenizer(self, out: Path) -> list[str]:
        """Rebuild tokenizer.json etc. from the GGUF vocabulary (via transformers' converter)."""
        import logging

        from transformers import AutoTokenizer

        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as exc:
            raise LlmcError(f"cannot rebuild the tokenizer from GGUF metadata ({exc})", self.path) from None
        if self._chat_template:
            tok.chat_template = self._chat_template
        tok.save_pretrained(str(out))
        gen = {k: self.hf_config[k] for k in ("bos_token_id", "eos_token_id") if k in self.hf_config}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        return sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".jinja", ".txt"))


def _match_layer_name(name: str, pattern: str, target: str) -> str | None:
    if "{i}" not in pattern:
        return target if name == pattern else None
    head, tail = pattern.split("{i}")
    if name.startswith(head) and name.endswith(tail):
        idx = name[len(head): len(name) - len(tail)]
        if idx.isdigit():
            return target.replace("{i}", idx)
    return None


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def missing_source_error(src: str | Path) -> LlmcError:
    """'No such file', or, for what looks like a Hugging Face Hub id, how to get it locally:
    llmc never downloads."""
    text = str(src)
    if HUB_ID.match(text) and not text.startswith((".", "/")):
        return LlmcError(f"no such file or directory; {text!r} looks like a Hugging Face Hub id, and llmc never "
                         f"downloads: fetch it first (`hf download {text} --local-dir models/{text.split('/')[-1]}` "
                         f"where the hub is reachable), then `llmc convert models/{text.split('/')[-1]} -o OUT`",
                         src)
    return LlmcError("no such file or directory", src)


def open_source(src: str | Path) -> ModelSource:
    path = Path(src)
    if not path.exists():
        raise missing_source_error(src)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LlmcError("expected a Hugging Face model directory or a .gguf file", path)
        return GGUFSource(path)
    return HFSource(path)
