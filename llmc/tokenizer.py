"""The checkpoint's own tokenizer (tokenizer.json & co. live beside the weights)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from llmc.errors import LlmcError, first_line

# The files that make up a model's tokenizer and generation defaults. Convert copies them from a
# Hugging Face directory into the checkpoint, quantize into the quantized checkpoint, build into
# the engine, so every artifact can tokenize on its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json", "tokenizer.model",
                   "vocab.json", "merges.txt")


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the TOKENIZER_FILES present in `src` into `dst`; returns their names."""
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


@lru_cache(maxsize=8)
def load_tokenizer(directory: str | Path):
    """A transformers fast tokenizer for a checkpoint or engine directory (chat template included)."""
    import logging

    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise LlmcError("no tokenizer.json: convert again so the tokenizer is copied beside the weights",
                        directory)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise LlmcError(f"cannot load the tokenizer ({first_line(exc)})", directory) from None


def eos_token_ids(directory: str | Path) -> set[int]:
    """EOS ids from generation_config.json (may be a list) and the tokenizer."""
    import json

    ids: set[int] = set()
    gen = Path(directory) / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    tok = load_tokenizer(directory)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return ids
