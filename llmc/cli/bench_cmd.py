"""`llmc bench`: throughput, TTFT/TPOT percentiles, KV use and bandwidth utilisation."""

from __future__ import annotations

from pathlib import Path

import typer

from llmc.cli.output import choice
from llmc.cli.threads import SPIN, THREADS, check_threads


def bench(
    engine_dir: Path = typer.Argument(None, help="Engine directory written by `llmc build` (with --url: optional, only its tokenizer is used)."),
    num_requests: int = typer.Option(32, "--num-requests", help="Requests in the workload."),
    input_len: str = typer.Option("16:256", "--input-len", help="Prompt length range A:B in tokens (uniform)."),
    output_len: str = typer.Option("16:128", "--output-len", help="Output length range A:B in tokens (uniform; EOS ignored)."),
    concurrency: int = typer.Option(None, "--concurrency", help="Closed loop: at most C requests in flight (default: all at once)."),
    request_rate: float = typer.Option(None, "--request-rate", help="Open loop: Poisson arrivals at R requests/s."),
    dataset: Path = typer.Option(None, "--dataset", help="Text or .jsonl ('prompt'/'text') to cut prompts from (default: built-in State of the Union text)."),
    seed: int = typer.Option(0, help="Workload seed."),
    kv_cache_mb: float = typer.Option(None, "--kv-cache-mb", help="KV pool size (default: enough for max_batch_size full sequences, within free memory)."),
    max_batch_size: int = typer.Option(None, "--max-batch-size", help="Runtime cap on sequences per step (<= the engine's)."),
    prefill_budget: int = typer.Option(None, "--prefill-budget", help="At most N prompt tokens per step, decodes not counted (scheduler policy; default: prompts fill max_num_tokens)."),
    json_out: Path = typer.Option(None, "--output", help="Also write all figures as JSON to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print all figures as one JSON document on stdout and nothing else (the table goes to stderr)."),
    sweep: str = typer.Option(None, "--sweep", help="e.g. max-batch-size=1,2,4,8,16: run once per value; writes CSV/JSON and a throughput-latency PNG."),
    sweep_out: Path = typer.Option(Path("bench-sweep"), "--sweep-out", help="Directory for the sweep's CSV, JSON and PNG."),
    url: str = typer.Option(None, "--url", help="Benchmark a running OpenAI-compatible server (http://HOST:PORT) instead of an in-process engine."),
    model: str = typer.Option(None, "--model", help="With --url: the model name to send (default: the first of /v1/models)."),
    tokenizer_dir: Path = typer.Option(None, "--tokenizer", help="With --url: a checkpoint/engine directory whose tokenizer cuts the prompts (default: ENGINE, else the default model's)."),
    prompt_format: str = typer.Option("tokens", "--prompt-format", **choice(("tokens", "text")), help="With --url: send prompts as token ids (tokens) or as decoded text (text)."),
    api_key: str = typer.Option(None, "--api-key", help="With --url: bearer token (default: $LLMC_API_KEY)."),
    threads: int = THREADS,
    spin: bool = SPIN,
) -> None:
    """Benchmark an engine with in-flight batching over a reproducible workload (or a server, with --url)."""
    from llmc import bench as b
    from llmc.cli.output import err_console, out_console, print_json
    from llmc.errors import LlmcError

    _check_workload_options(num_requests, concurrency, request_rate, max_batch_size, kv_cache_mb, prefill_budget)
    check_threads(threads)
    in_range, out_range = b.parse_range(input_len, "--input-len"), b.parse_range(output_len, "--output-len")
    if url is not None:
        if (sweep or kv_cache_mb is not None or max_batch_size is not None or prefill_budget is not None
                or threads is not None or spin is not None):
            raise LlmcError("--sweep, --kv-cache-mb, --max-batch-size, --prefill-budget, --threads and --spin apply "
                            "to an in-process engine, not --url (give them to `llmc serve`)")
        _bench_url(url, engine_dir, tokenizer_dir, model, prompt_format, api_key, dataset, num_requests,
                   in_range, out_range, seed, request_rate, concurrency, json_out, as_json,
                   f"{num_requests} requests, in {input_len}, out {output_len}")
        return
    if engine_dir is None:
        raise LlmcError("give an ENGINE directory, or --url of a running server")
    values = _sweep_values(sweep) if sweep else [max_batch_size]
    console = err_console() if as_json else out_console()
    bandwidth = b.measure_memory_bandwidth()
    rows = [_bench_engine(engine_dir, value, kv_cache_mb, prefill_budget, dataset, num_requests, in_range, out_range, input_len,
                          seed, request_rate, concurrency, bandwidth, threads, spin) for value in values]
    _print_engine_table(console, rows, f"llmc bench: {engine_dir} ({num_requests} requests, in {input_len}, "
                        f"out {output_len})", bandwidth)
    if json_out:
        b.write_json(json_out, rows if sweep else rows[0])
    if as_json:
        print_json(rows if sweep else rows[0])
    if sweep:
        _write_sweep(sweep_out, rows)
        console.print(f"sweep written to {sweep_out}/sweep.{{csv,json,png}}")


def _check_workload_options(num_requests, concurrency, request_rate, max_batch_size, kv_cache_mb,
                            prefill_budget) -> None:
    """One-line errors for workload settings that cannot run, before an engine is loaded."""
    import math

    from llmc.errors import LlmcError

    if concurrency is not None and request_rate is not None:
        raise LlmcError("give --concurrency or --request-rate, not both")
    if num_requests < 1:
        raise LlmcError("--num-requests must be >= 1")
    if concurrency is not None and concurrency < 1:
        raise LlmcError(f"--concurrency must be >= 1, got {concurrency}")
    if request_rate is not None and not (math.isfinite(request_rate) and request_rate > 0):
        raise LlmcError(f"--request-rate must be a positive number of requests/s, got {request_rate}")
    if max_batch_size is not None and max_batch_size < 1:
        raise LlmcError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    if prefill_budget is not None and prefill_budget < 1:
        raise LlmcError(f"--prefill-budget must be >= 1 prompt tokens per step, got {prefill_budget}")
    if kv_cache_mb is not None and not (math.isfinite(kv_cache_mb) and kv_cache_mb > 0):
        raise LlmcError(f"--kv-cache-mb must be a positive number, got {kv_cache_mb}")


def _sweep_values(sweep: str) -> list[int]:
    """--sweep max-batch-size=1,2,4 -> [1, 2, 4] (the only sweepable setting so far)."""
    from llmc.errors import LlmcError

    key, _, vals = sweep.partition("=")
    if key != "max-batch-size" or not vals:
        raise LlmcError(f"--sweep supports max-batch-size=V1,V2,...; got {sweep!r}")
    try:
        values = [int(v) for v in vals.split(",")]
    except ValueError:
        raise LlmcError(f"--sweep values must be integers, got {vals!r}") from None
    if any(v < 1 for v in values):
        raise LlmcError(f"--sweep max-batch-size values must be >= 1, got {vals!r}")
    return values


def _bench_engine(engine_dir, max_batch_size, kv_cache_mb, prefill_budget, dataset, num_requests, in_range, out_range, input_len,
                  seed, request_rate, concurrency, bandwidth, threads=None, spin=None) -> dict:
    """One workload run on a fresh engine (after a warm-up), plus memory-bandwidth utilisation of
    its decode steps and of a batch-1 decode, the figure that says how far from the roofline it is."""
    from llmc import bench as b
    from llmc.errors import LlmcError
    from llmc.runtime.llm import LLM

    llm = LLM(engine_dir, kv_cache_mb=kv_cache_mb, max_batch_size=max_batch_size, prefill_budget=prefill_budget,
              num_threads=threads, spinning=spin)
    if in_range[1] > llm.max_input_len:
        raise LlmcError(f"--input-len {input_len}: prompts of up to {in_range[1]} tokens exceed the engine's "
                        f"max_input_len {llm.max_input_len}")
    tokens = b.corpus_tokens(llm.tokenizer, dataset)
    work = b.make_workload(tokens, num_requests, in_range, out_range, seed, request_rate)
    b.run_workload(llm, b.make_workload(tokens, 2, (8, 8), (4, 4), seed, None))  # warm-up
    m = b.run_workload(llm, work, concurrency)
    kv_tok = llm.engine.kv_bytes_per_block // llm.block_size
    weights = b.engine_weight_bytes(llm.engine)
    m["max_batch_size"] = llm.max_batch_size
    m["prefill_budget"] = prefill_budget
    m["mbu_decode"] = b.mbu(m, weights, kv_tok, bandwidth)
    single = b.run_workload(llm, b.make_workload(tokens, 1, (64, 64), (32, 32), seed, None))
    m["mbu_batch1_decode"] = b.mbu(single, weights, kv_tok, bandwidth, batch_size=1)
    m["memory_bandwidth_gb_s"] = bandwidth / 1e9
    return b.public(m)


def _print_engine_table(console, rows: list[dict], title: str, bandwidth: float) -> None:
    """One row per run (per swept max batch size); cells wrap, never cut."""
    from llmc.cli.output import table as out_table

    table = out_table(title, ("max batch", "out tok/s", "req/s", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms",
                              "peak KV blocks", "preempt", "MBU decode", "MBU b=1"))
    fmt = lambda d: "/".join(f"{d[k] * 1e3:.1f}" for k in ("p50", "p90", "p99"))  # noqa: E731
    for r in rows:
        table.add_row(str(r["max_batch_size"]), f"{r['output_tokens_per_s']:.1f}", f"{r['requests_per_s']:.2f}",
                      fmt(r["ttft_s"]), fmt(r["tpot_s"]), f"{r['peak_kv_blocks']}/{r['kv_blocks_total']}",
                      str(r["preemptions"]), f"{(r['mbu_decode'] or 0) * 100:.1f}%",
                      f"{(r['mbu_batch1_decode'] or 0) * 100:.1f}%")
    console.print(table)
    console.print(f"[dim]memory bandwidth {bandwidth / 1e9:.1f} GB/s (numpy copy)[/]")
    if any(r["errors"] for r in rows):
        console.print(f"[red]{sum(r['errors'] for r in rows)} requests failed[/]")


def _bench_url(url, engine_dir, tokenizer_dir, model, prompt_format, api_key, dataset, num_requests, in_range,
               out_range, seed, request_rate, concurrency, json_out, as_json, what) -> None:
    """Drive a running server with the same workload the in-process bench would run."""
    import os

    from llmc import bench as b
    from llmc.cli.output import err_console, out_console, print_json
    from llmc.cli.output import table as out_table
    from llmc.errors import LlmcError
    from llmc.tokenizer import load_tokenizer

    if not url.startswith(("http://", "https://")):
        raise LlmcError(f"--url must start with http:// or https://, got {url!r}")
    try:
        from llmc.serve.bench_client import bench_url
    except ModuleNotFoundError as exc:
        raise LlmcError(f"`llmc bench --url` needs the serve extra ({exc.name} is missing): "
                        "pip install 'llmc[serve]'") from None
    source = tokenizer_dir or engine_dir
    if source is None:
        from llmc.default_model import ensure_default_checkpoint

        source = ensure_default_checkpoint("float32")
    tok = load_tokenizer(source)
    work = b.make_workload(b.corpus_tokens(tok, dataset), num_requests, in_range, out_range, seed, request_rate)
    m = bench_url(url, work, model=model, concurrency=concurrency, prompt_format=prompt_format, tokenizer=tok,
                  api_key=api_key or os.environ.get("LLMC_API_KEY") or None)
    console = err_console() if as_json else out_console()
    table = out_table(f"llmc bench --url {url} ({m['model']}; {what})",
                      ("out tok/s", "req/s", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms", "ITL p50/p90/p99 ms",
                       "E2E p50/p90/p99 s", "errors"))
    fmt = lambda d, k=1e3: "/".join(f"{d[q] * k:.1f}" for q in ("p50", "p90", "p99"))  # noqa: E731
    table.add_row(f"{m['output_tokens_per_s']:.1f}", f"{m['requests_per_s']:.2f}", fmt(m["ttft_s"]),
                  fmt(m["tpot_s"]), fmt(m["itl_s"]), fmt(m["e2e_s"], 1), str(m["errors"]))
    console.print(table)
    if m["errors"]:
        console.print(f"[red]{m['errors']} requests failed[/]: {'; '.join(m['error_samples'])}")
    if json_out:
        b.write_json(json_out, m)
    if as_json:
        print_json(m)
    if m["errors"] == m["requests"]:
        raise LlmcError(f"every request to {url} failed: {m['error_samples'][0]}")


def _write_sweep(out: Path, rows: list[dict]) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmc.bench import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", rows)
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["max_batch_size", "output_tokens_per_s", "requests_per_s", "ttft_p50_ms", "tpot_p50_ms", "tpot_p99_ms"])
        for r in rows:
            w.writerow([r["max_batch_size"], r["output_tokens_per_s"], r["requests_per_s"],
                        r["ttft_s"]["p50"] * 1e3, r["tpot_s"]["p50"] * 1e3, r["tpot_s"]["p99"] * 1e3])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["tpot_s"]["p50"] * 1e3 for r in rows], [r["output_tokens_per_s"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"b={r['max_batch_size']}", (r["tpot_s"]["p50"] * 1e3, r["output_tokens_per_s"]))
    ax.set_xlabel("TPOT p50 (ms)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput vs latency (max batch size sweep)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
