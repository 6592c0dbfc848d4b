"""Triton-served throughput vs in-process llmc (and `llmc serve`, when present), one workload.

The workload of bench_runtime (llmc/bench.py): 32 requests, prompts of 16-256 real-text tokens,
16-128 output tokens, EOS ignored (end_id = -1 on Triton), all arriving at t=0. The SmolLM2 fp32
engine of the smollm2-fp32 recipe. Legs, run one after another on the same engine:
  - in-process: llmc.bench.run_workload on an LLM (no server at all);
  - Triton: the real tritonserver 2.51 (Python backend, decoupled) with an `llmc export triton`
    repository, 32 requests streamed over one gRPC stream by tritonclient;
  - llmc serve (OpenAI frontend): 32 concurrent streaming /v1/completions (llmc.serve.bench_client).
Prompts are sent as text; every leg uses the token ids that text encodes to, so all see the
same prompts. Prints a table with ratios to in-process; writes benchmarks/results/bench_triton.json.

    python benchmarks/bench_triton.py [--num-requests 32] [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import engine_for, serving_workload, serving_workload_args, write_results  # noqa: E402


def summarize(seconds: float, ttfts: list[float], counts: list[int], want: list[int]) -> dict:
    from llmc.bench import percentiles

    n_out = sum(counts)
    return {"requests": len(counts), "seconds": seconds, "output_tokens": n_out,
            "output_tokens_per_s": n_out / seconds, "requests_per_s": len(counts) / seconds,
            "ttft_s": percentiles(ttfts), "exact_counts": counts == want}


def in_process(engine: Path, work) -> dict:
    from llmc import bench as b
    from llmc.runtime.llm import LLM

    llm = LLM(engine)
    b.run_workload(llm, b.make_workload(list(range(100, 400)), 2, (8, 8), (4, 4), 0, None))  # warm-up
    m = b.run_workload(llm, work)
    outs = sorted(m["_outputs"], key=lambda o: o.request_id)
    return summarize(m["seconds"], [o.ttft for o in outs], [len(o.output_token_ids) for o in outs],
                     work.output_lens)


def triton(engine: Path, texts: list[str], want: list[int]) -> dict:
    import tritonclient.grpc as grpcclient

    from llmc.serve.triton.env import ensure_triton_env
    from llmc.serve.triton.export import ExportOptions, export_triton
    from llmc.serve.triton.launch import TritonServer, free_port

    env = ensure_triton_env()
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        export_triton(engine, Path(tmp) / "repo", ExportOptions(env_path=str(env.root)))
        log = open(Path(tmp) / "server.log", "w")
        with TritonServer(env, Path(tmp) / "repo", free_port(), free_port(), free_port(), host="127.0.0.1", log=log) as srv:
            def inputs(text: str, n: int):
                ins = []
                for name, arr, dtype in (("text_input", np.array([[text.encode()]], dtype=object), "BYTES"),
                                         ("max_tokens", np.array([[n]], np.int32), "INT32"),
                                         ("end_id", np.array([[-1]], np.int32), "INT32"),
                                         ("stream", np.array([[True]]), "BOOL")):
                    t = grpcclient.InferInput(name, list(arr.shape), dtype)
                    t.set_data_from_numpy(arr)
                    ins.append(t)
                return ins

            def run(batch_texts: list[str], batch_want: list[int]) -> dict:
                n = len(batch_texts)
                first: dict[int, float] = {}
                counts = [0] * n
                done = threading.Semaphore(0)
                errors: list[str] = []

                def callback(result, error):
                    now = time.perf_counter()
                    if error is not None:
                        errors.append(str(error))
                        done.release()
                        return
                    resp = result.get_response()
                    i = int(resp.id)
                    ids = result.as_numpy("output_ids")
                    if ids is not None and ids.size:
                        first.setdefault(i, now)
                        counts[i] += ids.size
                    if resp.parameters["triton_final_response"].bool_param:
                        done.release()

                client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
                client.start_stream(callback=callback)
                t0 = time.perf_counter()
                for i, (text, k) in enumerate(zip(batch_texts, batch_want)):
                    client.async_stream_infer("llmc", inputs(text, k), request_id=str(i),
                                              enable_empty_final_response=True)
                for _ in range(n):
                    done.acquire()
                seconds = time.perf_counter() - t0
                client.stop_stream()
                client.close()
                if errors:
                    raise RuntimeError(f"Triton errors: {errors[:3]}")
                return summarize(seconds, [first[i] - t0 for i in sorted(first)], counts, batch_want)

            run(["Hello there"], [4])  # warm-up
            return run(texts, want)


def llmc_serve(engine: Path, work) -> dict:
    """`llmc serve` (OpenAI frontend) in its own process, driven by llmc's HTTP bench client
    (32 concurrent streaming /v1/completions with the same token-id prompts)."""
    from llmc.serve.bench_client import bench_url, wait_ready
    from llmc.serve.triton.launch import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llmc.cli.app", "serve", str(engine), "--port", str(port),
                             "--host", "127.0.0.1", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=300, proc=proc)
        from llmc.bench import make_workload

        bench_url(base, make_workload(list(range(100, 400)), 2, (8, 8), (4, 4), 0, None))  # warm-up
        m = bench_url(base, work)
    finally:
        proc.terminate()
        proc.wait(60)
    m["exact_counts"] = m["errors"] == 0 and m["output_tokens"] == sum(work.output_lens)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serving_workload_args(ap)
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    from llmc.tokenizer import load_tokenizer

    console = Console()
    console.print("building the engine (reused when unchanged)...")
    engine = engine_for("smollm2-fp32")
    tok = load_tokenizer(engine)
    work, out_range = serving_workload(args, tok)
    n = len(work.prompts)
    # Text prompts for the servers; every leg uses what that text encodes to.
    texts = [tok.decode(p) for p in work.prompts]
    work.prompts = [list(tok.encode(t, add_special_tokens=False)) for t in texts]
    rows: dict[str, dict] = {}
    console.print("in-process (llmc.bench.run_workload)...")
    rows["in-process"] = in_process(engine, work)
    console.print("Triton (tritonserver 2.51, python backend, gRPC streaming)...")
    rows["triton"] = triton(engine, texts, work.output_lens)
    console.print("llmc serve (OpenAI frontend, llmc's HTTP bench client)...")
    rows["llmc serve"] = llmc_serve(engine, work)
    base = rows["in-process"]["output_tokens_per_s"]
    t = Table(title=f"{n} requests, prompts 16-256, outputs {out_range[0]}-{out_range[1]} (EOS ignored), SmolLM2 fp32")
    for col in ("leg", "seconds", "output tok/s", "vs in-process", "TTFT p50 (s)", "exact counts"):
        t.add_column(col, justify="right" if col != "leg" else "left")
    for name, r in rows.items():
        t.add_row(name, f"{r['seconds']:.2f}", f"{r['output_tokens_per_s']:.1f}",
                  f"{r['output_tokens_per_s'] / base:.2f}x", f"{r['ttft_s']['p50']:.2f}", str(r["exact_counts"]))
    console.print(t)
    ratios = {f"{k}/in-process": r["output_tokens_per_s"] / base for k, r in rows.items() if k != "in-process"}
    console.print(ratios)
    path = write_results("bench_triton", {"workload": {"requests": n, "input_len": [16, 256],
                                                       "output_len": list(out_range), "seed": 0},
                                          "engine": str(engine), "legs": rows, "ratios": ratios})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
