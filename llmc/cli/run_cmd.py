"""`llmc run`: smoke inference through the real runtime (paged KV cache, in-flight batching)."""

from __future__ import annotations

from pathlib import Path

import typer


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
) -> None:
    """Generate text for prompts and print Input/Output pairs, then TTFT, TPOT and tokens/s."""
    import math
    import sys
    import time

    from rich.console import Console

    from llmc.errors import LlmcError
    from llmc.runtime.llm import LLM
    from llmc.runtime.sampling import SamplingParams

    prompts = list(prompt or [])
    labels = list(range(len(prompts)))  # printed index of each prompt
    if prompts_file is not None:
        lines = read_prompts_file(prompts_file)
        skipped = [n for n, line in enumerate(lines, 1) if not line.strip()]
        # numbered by line (after any --prompt), so Output [i] is line i + 1 of the file
        labels += [len(prompts) + n - 1 for n, line in enumerate(lines, 1) if line.strip()]
        prompts += [line for line in lines if line.strip()]
        if skipped:
            shown = ", ".join(map(str, skipped[:10])) + (f" (+{len(skipped) - 10} more)" if len(skipped) > 10 else "")
            print(f"note: {prompts_file}: skipped {len(skipped)} empty line(s): {shown}", file=sys.stderr)
    if not prompts:
        raise LlmcError("give at least one --prompt or a --prompts-file with a non-empty line")
    if kv_cache_mb is not None and not (math.isfinite(kv_cache_mb) and kv_cache_mb > 0):
        raise LlmcError(f"--kv-cache-mb must be a positive number, got {kv_cache_mb}")
    console = Console()
    llm = LLM(engine_dir, kv_cache_mb=kv_cache_mb)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=None if seed is None else seed + i, max_new_tokens=max_new_tokens,
                             stop=list(stop or [])) for i in range(len(prompts))]
    start = time.perf_counter()
    if stream:
        outputs = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            console.print(f"[bold]Input [{labels[i]}]:[/] {p!r}")
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
    else:
        outputs = llm.generate(prompts, params, chat=chat)
        for i, out in enumerate(outputs):
            console.print(f"[bold]Input [{labels[i]}]:[/] {prompts[i]!r}")
            if out.error:
                console.print(f"[bold red]Output [{labels[i]}]: error:[/] {out.error}")
            else:
                console.print(f"[bold]Output [{labels[i]}]:[/] {out.text!r}")
    elapsed = time.perf_counter() - start
    ok = [o for o in outputs if not o.error]
    n_out = sum(len(o.output_token_ids) for o in ok)
    ttfts = sorted(o.ttft for o in ok if o.ttft is not None)
    tpots = sorted(o.tpot for o in ok if o.tpot is not None)
    med = lambda xs: xs[len(xs) // 2] if xs else float("nan")  # noqa: E731
    console.print(f"[dim]{len(ok)}/{len(outputs)} requests, {n_out} output tokens in {elapsed:.2f}s | "
                  f"TTFT {med(ttfts) * 1e3:.1f} ms | TPOT {med(tpots) * 1e3:.1f} ms | "
                  f"{n_out / elapsed:.1f} output tokens/s[/]")
    if len(ok) < len(outputs):
        raise typer.Exit(1)
