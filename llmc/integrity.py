"""File digests of the artifacts llmc writes, and their verification on load.

Every file of a checkpoint (convert, quantize) and of an engine (build), except config.json, which
holds the record, gets its size and a full-content xxh3-128 digest in config.json:

    "integrity": {"algorithm": "xxh3_128", "files": {"model.onnx.data": {"size": N, "digest": "..."}}}

(under "llmc" for checkpoints, which TensorRT-LLM ignores; top level for engines). Loading an
artifact re-hashes every file: xxh3 runs at several GB/s, so the whole ~540 MB SmolLM2 fp32 engine
costs about 0.1 s on one core (measured; see README "Reliability"), which is why there is no
sampled "fast" mode: any flipped byte is caught, not just most. xxh3 detects accidental damage
(bit rot, truncation, a bad copy), not deliberate tampering: it is not a cryptographic hash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmc.errors import LlmcError

ALGORITHM = "xxh3_128"
CHUNK = 1 << 24
RECORD_FILE = "config.json"


def file_digest(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).as_posix() != RECORD_FILE)


def make_record(directory: str | Path) -> dict[str, Any]:
    """Sizes and digests of every file under `directory` but config.json."""
    directory = Path(directory)
    paths = _files(directory)
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "digest": file_digest(p)}
             for p in paths}
    return {"algorithm": ALGORITHM, "files": files}


def verify_record(directory: str | Path, record: Any, *, full: bool = True, rebuild: str = "") -> dict[str, str]:
    """Check every recorded file (size, then digest when `full`); LlmcError on the first damage.

    Returns {relative path: "ok"} for the files checked. A record that is not a dict of the
    expected shape is itself damage (config.json was edited or corrupted).
    """
    directory = Path(directory)
    hint = f"; {rebuild}" if rebuild else ""
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise LlmcError(f"damaged config.json: the integrity record is not valid{hint}", directory)
    if record.get("algorithm") != ALGORITHM:
        raise LlmcError(f"integrity record uses {record.get('algorithm')!r}, this llmc checks {ALGORITHM}{hint}",
                        directory)
    checked: dict[str, str] = {}
    for name, entry in record["files"].items():
        path = directory / name
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or ".." in Path(name).parts:
            raise LlmcError(f"damaged config.json: bad integrity entry for {name!r}{hint}", directory)
        if not path.is_file():
            raise LlmcError(f"missing file {name} (the artifact is incomplete){hint}", directory)
        size = path.stat().st_size
        if size != entry["size"]:
            raise LlmcError(f"{name} is damaged: {size:,} bytes where {entry['size']:,} were written{hint}",
                            directory)
        if full and file_digest(path) != entry.get("digest"):
            raise LlmcError(f"{name} is damaged: its {ALGORITHM} digest differs from the one recorded when it "
                            f"was written (corrupted, or edited since){hint}", directory)
        checked[name] = "ok"
    return checked
