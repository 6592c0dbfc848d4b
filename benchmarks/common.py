"""Shared benchmark helpers: engines via the (resumable) pipeline, tables, JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WORK = Path(os.environ.get("LLMC_BENCH_WORK", ROOT / ".work"))


def engine_for(recipe_name: str, **overrides: Any) -> Path:
    """Build (or reuse, when unchanged) the engine of a shipped recipe; eval/run stages off."""
    from llmc.recipes.pipeline import Pipeline
    from llmc.recipes.schema import apply_overrides, load_recipe

    sets = ["eval=null", "run.max_new_tokens=4", "run.prompts=[Hello]"]
    sets += [f"{k}={v}" for k, v in overrides.items()]
    recipe = apply_overrides(load_recipe(recipe_name), sets)
    pipe = Pipeline(recipe, WORK / recipe_name, console=None, progress=False)
    stage = pipe.stage
    code = graph_code_fingerprint()

    def stage_keyed_by_code(name, options, *args, **kwargs):
        # The pipeline keys stages by options and llmc version; a benchmark must also rebuild the
        # engine when the graph emitters changed (checkpoints and calibration stay reused).
        if name == "build":
            options = {**options, "graph_code": code}
        return stage(name, options, *args, **kwargs)

    pipe.stage = stage_keyed_by_code
    pipe.run()
    return WORK / recipe_name / "engine"


def graph_code_fingerprint() -> str:
    """Hash of the sources that shape an engine graph (llmc/build, llmc/engine, llmc/plugins)."""
    import hashlib

    import llmc

    root = Path(llmc.__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted([*root.glob("build/*.py"), *root.glob("engine/*.py"), *root.glob("plugins/*.py")]):
        h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()[:16]


def machine() -> dict[str, Any]:
    import psutil

    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1)}


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2, default=str) + "\n")
    return path


def serving_workload_args(ap) -> None:
    """The options of the serving benchmarks' workload (bench_runtime, bench_triton)."""
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="8 requests, shorter outputs (a smoke run)")


def serving_workload(args, tokenizer):
    """(workload, output range): prompts of 16-256 State of the Union tokens, outputs 16-128."""
    from llmc import bench as b

    n = 8 if args.quick else args.num_requests
    out_range = (8, 32) if args.quick else (16, 128)
    return b.make_workload(b.corpus_tokens(tokenizer, None), n, (16, 256), out_range, 0, None), out_range
