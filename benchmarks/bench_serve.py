"""Serving over HTTP vs in-process (issue 11): what `llmc serve` costs on top of the runtime.

One workload, the in-process bench's default: 32 requests, prompts of 16-256 real-text tokens,
16-128 output tokens, EOS ignored, all queued at t=0. Run
  - in-process: `llmc bench ENGINE` (its own process; `llmc.bench.run_workload` on an `LLM`);
  - over HTTP: `llmc serve ENGINE` in its own process, driven by `llmc bench --url` (another
    process; streaming /v1/completions with token-id prompts, so the prompts are identical).
The two legs run back to back for --rounds rounds (which goes first alternates), so a shared
host's drift hits both alike; the verdict is the median of the per-round ratios. Floor: the server's output tokens/s >= 90% of in-process.
Prints a table and writes benchmarks/results/bench_serve.json.

    python benchmarks/bench_serve.py [--recipe smollm2-fp32] [--num-requests 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import engine_for, write_results  # noqa: E402

from llmc.serve.triton.launch import free_port  # noqa: E402

FLOOR = 0.90


def in_process(engine: Path, args, tmp: Path) -> dict:
    """`llmc bench ENGINE` in its own process, like the server leg (no state shared with this one)."""
    out = tmp / "in-process.json"
    r = subprocess.run([sys.executable, "-m", "llmc.cli.app", "bench", str(engine), *workload_args(args),
                        "--output", str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"llmc bench failed: {r.stderr}")
    return json.loads(out.read_text())


def workload_args(args) -> list[str]:
    return ["--num-requests", str(args.num_requests), "--input-len", args.input_len, "--output-len", args.output_len,
            "--seed", str(args.seed)]


def over_http(engine: Path, args, tmp: Path) -> dict:
    from llmc.errors import LlmcError
    from llmc.serve.bench_client import wait_ready

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cli = [sys.executable, "-m", "llmc.cli.app"]
    log = tmp / f"serve-{port}.log"
    server = subprocess.Popen([*cli, "serve", str(engine), "--port", str(port), "--log-level", "warning"],
                              stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        try:
            wait_ready(url, 300, server)
        except LlmcError as exc:
            raise SystemExit(f"llmc serve: {exc}\n{log.read_text()}")
        out = tmp / f"http-{port}.json"
        r = subprocess.run([*cli, "bench", "--url", url, "--tokenizer", str(engine), *workload_args(args),
                            "--output", str(out)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"llmc bench --url failed: {r.stderr}")
        return json.loads(out.read_text())
    finally:
        server.terminate()
        server.wait(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="smollm2-fp32")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--input-len", default="16:256")
    ap.add_argument("--output-len", default="16:128")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    engine = engine_for(args.recipe)
    runs: dict[str, list[dict]] = {"in_process": [], "http": []}
    ratios: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            legs = [("in_process", in_process), ("http", over_http)]
            for name, leg in legs if i % 2 == 0 else legs[::-1]:  # alternate which leg goes first
                runs[name].append(leg(engine, args, Path(tmp)))
            ratios.append(runs["http"][-1]["output_tokens_per_s"] / runs["in_process"][-1]["output_tokens_per_s"])
            print(f"round {i + 1}: in-process {runs['in_process'][-1]['output_tokens_per_s']:.1f} tok/s, "
                  f"http {runs['http'][-1]['output_tokens_per_s']:.1f} tok/s, ratio {ratios[-1]:.3f}", flush=True)
    best = {k: max(v, key=lambda m: m["output_tokens_per_s"]) for k, v in runs.items()}
    ratio = float(np.median(ratios))  # adjacent legs share the host's load of the moment

    from rich.console import Console
    from rich.table import Table

    ms = lambda d: f"{d['p50'] * 1e3:.0f}/{d['p99'] * 1e3:.0f}"  # noqa: E731
    table = Table(title=f"llmc serve vs in-process: {args.recipe}, {args.num_requests} requests, "
                        f"in {args.input_len}, out {args.output_len}, EOS ignored (best of {args.rounds} rounds)")
    for col in ("leg", "out tok/s", "req/s", "TTFT p50/p99 ms", "TPOT p50/p99 ms", "errors"):
        table.add_column(col)
    for name, m in (("in-process (llmc bench ENGINE)", best["in_process"]), ("HTTP (llmc serve + bench --url)", best["http"])):
        table.add_row(name, f"{m['output_tokens_per_s']:.1f}", f"{m['requests_per_s']:.2f}", ms(m["ttft_s"]),
                      ms(m["tpot_s"]), str(m["errors"]))
    Console().print(table)
    verdict = "PASS" if ratio >= FLOOR else "FAIL"
    print(f"server / in-process output tok/s: median of per-round ratios {ratio:.3f} "
          f"({', '.join(f'{r:.3f}' for r in ratios)}); best vs best "
          f"{best['http']['output_tokens_per_s'] / best['in_process']['output_tokens_per_s']:.3f} "
          f"(floor {FLOOR:.2f}: {verdict})")
    path = write_results("bench_serve", {"recipe": args.recipe, "workload": vars(args), "ratio": ratio, "round_ratios": ratios,
                                         "floor": FLOOR, "pass": ratio >= FLOOR, "best": best, "runs": runs,
                                         "cpu_load_1m": os.getloadavg()[0]})
    print(f"wrote {path}")
    if ratio < FLOOR:
        sys.exit(1)


if __name__ == "__main__":
    main()
