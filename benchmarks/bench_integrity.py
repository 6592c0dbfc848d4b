"""Integrity-check cost: verifying an engine's file digests vs loading it.

    python benchmarks/bench_integrity.py [--engine DIR] [--repeat N]

Default engine: SmolLM2-135M fp32 on ONNX Runtime (the `smollm2-fp32` recipe, built once through
the resumable pipeline). Measures, median of --repeat (page cache warm, as on a repeated load):
the sizes-only check, the full xxh3-128 check that every `load_engine` runs, the same bytes
through sha256 and blake2b (the alternatives considered), and `load_engine` as a whole.
Prints a table and writes benchmarks/results/bench_integrity.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import engine_for, write_results  # noqa: E402


def _timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _hash_all(directory: Path, names: list[str], algo: str) -> None:
    for n in names:
        h = hashlib.new(algo)
        with open(directory / n, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from llmc.engine import load_engine
    from llmc.integrity import verify_record

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    engine = args.engine or engine_for("smollm2-fp32")
    record = json.loads((engine / "config.json").read_text())["integrity"]
    names = list(record["files"])
    size = sum(e["size"] for e in record["files"].values())
    rows = {
        "sizes only (llmc inspect)": _timed(lambda: verify_record(engine, record, full=False), args.repeat),
        "xxh3-128, every file (each load; llmc inspect --verify)": _timed(lambda: verify_record(engine, record), args.repeat),
        "sha256, every file (not used)": _timed(lambda: _hash_all(engine, names, "sha256"), args.repeat),
        "blake2b, every file (not used)": _timed(lambda: _hash_all(engine, names, "blake2b"), args.repeat),
        "load_engine (includes the xxh3 check)": _timed(lambda: load_engine(engine), max(1, args.repeat // 2)),
    }
    table = Table(title=f"integrity check of {engine} ({len(names)} files, {size / 2**20:.1f} MiB)")
    for col in ("check", "seconds", "GB/s"):
        table.add_column(col)
    for name, secs in rows.items():
        rate = f"{size / secs / 1e9:.2f}" if "load_engine" not in name and "sizes" not in name else "-"
        table.add_row(name, f"{secs:.3f}", rate)
    Console().print(table)
    path = write_results("bench_integrity", {"engine": str(engine), "files": len(names), "bytes": size,
                                             "seconds": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
