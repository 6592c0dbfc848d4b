"""`llmc run`: smoke inference through the real runtime (paged KV cache, in-flight batching)."""

from __future__ import annotations

from pathlib import Path

import typer

from llmc.cli.threads import SPIN, THREADS, check_threads


def read_prompts_file(path: Path) -> list[str]:
    """The lines of a prompts file (UTF-8; a one-line error naming the first bad line if not)."""
    from llmc.errors import LlmcError

    if not path.is_file():
        raise LlmcError("no such prompts file", path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LlmcError(f"line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        "save the file as UTF-8", path) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start a new one
    return [line.removesuffix("\r") for line in lines]


def run(
    engine_dir: Path = typer.Argument(..., help="Engine directory written by `llmc build`."),
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="A prompt; repeat for several (they run batched)."),
    prompts_file: Path = typer.Option(None, "--prompts-file", help="A UTF-8 text file with one prompt per line; "
                                      "outputs are numbered by line (empty lines are skipped and reported)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate per prompt (capped by the engine's max_seq_len)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap each prompt in the tokenizer's chat template."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."),
    top_p: float = typer.Option(1.0, "--top-p", help="1.0 = off."),
    seed: int = typer.Option(None, help="Seed for sampling (per request: seed + index)."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop string; repeat for several."),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they are generated (one prompt at a time)."),
    kv_cache_mb: float = typer.Option(None, "--kv-cache-mb", help="KV block pool size (default: a share of free memory, capped at max_batch_size full sequences)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (outputs, finish reasons, timings) on stdout and nothing else."),
    threads: int = THREADS,
    spin: bool = SPIN,
) -> None:
    """Generate text for prompts and print Input/Output pairs, then TTFT, TPOT and tokens/s."""
    import math
    import time

    from llmc.cli.output import err_console, out_console, print_json
    from llmc.errors import LlmcError
    from llmc.runtime.llm import LLM
    from llmc.runtime.sampling import SamplingParams

    prompts, labels = _collect_prompts(list(prompt or []), prompts_file)
    if kv_cache_mb is not None and not (math.isfinite(kv_cache_mb) and kv_cache_mb > 0):
        raise LlmcError(f"--kv-cache-mb must be a positive number, got {kv_cache_mb}")
    if stream and as_json:
        raise LlmcError("--stream prints text as it comes; --json prints one document at the end: pick one")
    check_threads(threads)
    console = err_console() if as_json else out_console()
    llm = LLM(engine_dir, kv_cache_mb=kv_cache_mb, num_threads=threads, spinning=spin)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=None if seed is None else seed + i, max_new_tokens=max_new_tokens,
                             stop=list(stop or [])) for i in range(len(prompts))]
    start = time.perf_counter()
    if stream:
        outputs = _generate_streaming(llm, prompts, labels, params, chat, console)
    else:
        outputs = llm.generate(prompts, params, chat=chat)
        if not as_json:
            _print_outputs(outputs, prompts, labels, console)
    summary = _summary(outputs, time.perf_counter() - start)
    if as_json:
        print_json({"outputs": [{"index": labels[i], "prompt": prompts[i], "text": o.text, "finish_reason": o.finish_reason,
                                 "error": o.error, "prompt_tokens": len(o.prompt_token_ids),
                                 "output_tokens": len(o.output_token_ids),
                                 "ttft_ms": None if o.ttft is None else o.ttft * 1e3,
                                 "tpot_ms": None if o.tpot is None else o.tpot * 1e3}
                                for i, o in enumerate(outputs)], "summary": summary})
    else:
        ms = lambda v: "-" if v is None else f"{v:.1f} ms"  # noqa: E731  (never "nan")
        console.print(f"[dim]{summary['ok']}/{summary['requests']} requests, {summary['output_tokens']} output "
                      f"tokens in {summary['seconds']:.2f}s | TTFT {ms(summary['ttft_ms_p50'])} | "
                      f"TPOT {ms(summary['tpot_ms_p50'])} | {summary['output_tokens_per_s'] or 0:.1f} output tokens/s[/]")
    if summary["ok"] < summary["requests"]:
        raise typer.Exit(1)


def _collect_prompts(prompts: list[str], prompts_file: Path | None) -> tuple[list[str], list[int]]:
    """(prompts, printed index of each): --prompt ones first, then the file's non-empty lines
    numbered by line, so Output [i] is line i + 1 of the file; skipped empty lines are noted."""
    from llmc.cli.output import note
    from llmc.errors import LlmcError

    labels = list(range(len(prompts)))
    if prompts_file is not None:
        lines = read_prompts_file(prompts_file)
        skipped = [n for n, line in enumerate(lines, 1) if not line.strip()]
        labels += [len(prompts) + n - 1 for n, line in enumerate(lines, 1) if line.strip()]
        prompts = prompts + [line for line in lines if line.strip()]
        if skipped:
            shown = ", ".join(map(str, skipped[:10])) + (f" (+{len(skipped) - 10} more)" if len(skipped) > 10 else "")
            note(f"note: {prompts_file}: skipped {len(skipped)} empty line(s): {shown}")
    if not prompts:
        raise LlmcError("give at least one --prompt or a --prompts-file with a non-empty line")
    return prompts, labels


def _generate_streaming(llm, prompts: list[str], labels: list[int], params, chat: bool, console) -> list:
    """--stream: one prompt at a time, its tokens printed as the engine produces them."""
    outputs = []
    for i, (p, sp) in enumerate(zip(prompts, params)):
        console.print(f"[bold]Input [{labels[i]}]:[/] ", end="")
        console.out(_shorten(p))
        console.print(f"[bold]Output [{labels[i]}]:[/] ", end="")
        outs = []
        rid = llm.add_request(p, sp, chat=chat)
        while True:
            done = llm.step(lambda r, t, text: print(text, end="", flush=True) if r == rid else None)
            outs += done
            if any(o.request_id == rid for o in done):
                break
        print()
        outputs += outs
        console.print(f"[dim]finish: {_reason(outs[-1])}[/]")
    return outputs


def _print_outputs(outputs, prompts: list[str], labels: list[int], console) -> None:
    """Input/Output pairs as text (not a repr), with each request's finish reason."""
    for i, out in enumerate(outputs):
        console.print(f"[bold]Input [{labels[i]}]:[/] ", end="")
        console.out(_shorten(prompts[i]))
        if out.error:
            console.print(f"[bold red]Output [{labels[i]}]: error:[/] ", end="")
            console.out(out.error)
        else:
            console.print(f"[bold]Output [{labels[i]}]:[/] ", end="")
            console.out(out.text if out.text else "(no text)")
            console.print(f"[dim]finish: {_reason(out)}, {len(out.output_token_ids)} tokens[/]")


def _summary(outputs, elapsed: float) -> dict:
    """Counts and median TTFT/TPOT over the requests that succeeded (None, never nan, when none did)."""
    ok = [o for o in outputs if not o.error]
    n_out = sum(len(o.output_token_ids) for o in ok)
    ttfts = sorted(o.ttft for o in ok if o.ttft is not None)
    tpots = sorted(o.tpot for o in ok if o.tpot is not None)
    med = lambda xs: xs[len(xs) // 2] if xs else None  # noqa: E731
    return {"requests": len(outputs), "ok": len(ok), "output_tokens": n_out, "seconds": elapsed,
            "ttft_ms_p50": None if med(ttfts) is None else med(ttfts) * 1e3,
            "tpot_ms_p50": None if med(tpots) is None else med(tpots) * 1e3,
            "output_tokens_per_s": n_out / elapsed if elapsed > 0 else None}


def _reason(out) -> str:
    """The finish reason in words a user reads (an empty answer says why it is empty)."""
    why = {"stop": "stop (EOS or a stop string)", "length": "length (--max-new-tokens or the engine's max_seq_len)",
           "abort": "aborted", "error": "error"}
    return why.get(out.finish_reason or "", str(out.finish_reason))


def _shorten(text: str, max_lines: int = 4, max_chars: int = 400) -> str:
    """An echoed prompt: long ones keep their head and tail so the output stays readable."""
    lines = text.splitlines() or [""]
    if len(lines) <= max_lines and len(text) <= max_chars:
        return text
    head, tail = "\n".join(lines[:2])[: max_chars // 2], "\n".join(lines[-1:])[-max_chars // 4:]
    return f"{head} [... {len(text)} characters in all ...] {tail}"
