"""`llmc bench --url`: drive any OpenAI-compatible server with the in-process bench's workload.

The workload is `llmc.bench.make_workload`'s (same seed, same prompts cut from the same text,
same output lengths, same arrivals), sent to POST /v1/completions with streaming, greedy
decoding, `ignore_eos` and `max_tokens` = the request's output length, so a server's figures
compare directly with `llmc bench ENGINE`. Prompts go as token ids (exact lengths; llmc and vLLM
accept them) or, with prompt_format="text", as the text they decode to. Arrivals are closed loop
(at most `concurrency` in flight) or the workload's Poisson times. Reported like vLLM's
benchmark_serving: output tokens/s, requests/s, and p50/p90/p99 of TTFT, TPOT (per request,
after the first token), inter-token latency (between stream chunks) and end-to-end latency.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from llmc.bench import Workload, percentiles
from llmc.errors import LlmcError


@dataclass
class HttpResult:
    ok: bool = False
    error: str | None = None
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    text: str = ""

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def stream_completion(client, url: str, body: dict[str, Any], headers: dict[str, str]) -> HttpResult:
    """One streamed completion; times each chunk; tokens from the usage chunk (else one per chunk)."""
    res = HttpResult()
    t0 = time.perf_counter()
    last = None
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    res.error = str(msg["error"])
                    return res
                if msg.get("usage"):
                    usage_tokens = msg["usage"].get("completion_tokens")
                choices = msg.get("choices") or []
                if not choices:
                    continue
                text = choices[0].get("text") or (choices[0].get("delta") or {}).get("content") or ""
                if not text and res.ttft is not None:
                    continue
                now = time.perf_counter()
                if res.ttft is None:
                    res.ttft = now - t0
                elif last is not None:
                    res.itls.append(now - last)
                last = now
                chunks += 1 if text else 0
                res.text += text
    except Exception as exc:  # a dead server or a broken stream fails this request, not the bench
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.e2e = time.perf_counter() - t0
    res.output_tokens = usage_tokens if usage_tokens is not None else chunks
    res.ok = True
    return res


async def run_http_workload(base_url: str, work: Workload, model: str | None = None,
                            concurrency: int | None = None, prompt_format: str = "tokens", tokenizer=None,
                            api_key: str | None = None, timeout: float = 600.0) -> dict[str, Any]:
    base = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = concurrency or len(work.prompts)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0),
                                 limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit)) as client:
        if model is None:
            model = await first_model(client, base, headers)
        sem = asyncio.Semaphore(limit)

        async def one(i: int, t0: float) -> HttpResult:
            delay = work.arrivals[i] - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            prompt = work.prompts[i] if prompt_format == "tokens" else tokenizer.decode(work.prompts[i])
            body = {"model": model, "prompt": prompt, "max_tokens": work.output_lens[i], "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            async with sem:
                return await stream_completion(client, f"{base}/v1/completions", body, headers)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i, t0) for i in range(len(work.prompts))))
        elapsed = time.perf_counter() - t0
    return summarize(results, elapsed, work, model)


async def first_model(client, base: str, headers: dict[str, str]) -> str:
    try:
        r = await client.get(f"{base}/v1/models", headers=headers)
    except Exception as exc:
        raise LlmcError(f"cannot reach {base}: {type(exc).__name__}: {exc}") from None
    if r.status_code != 200:
        raise LlmcError(f"{base}/v1/models answered HTTP {r.status_code}; pass --model NAME")
    data = r.json().get("data") or []
    if not data:
        raise LlmcError(f"{base}/v1/models lists no model; pass --model NAME")
    return data[0]["id"]


def summarize(results: list[HttpResult], elapsed: float, work: Workload, model: str) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    n_out = sum(r.output_tokens for r in ok)
    return {
        "model": model, "requests": len(results), "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if r.error})[:3],
        "seconds": elapsed, "output_tokens": n_out,
        "expected_output_tokens": sum(n for n, r in zip(work.output_lens, results) if r.ok),
        "output_tokens_per_s": n_out / elapsed, "requests_per_s": len(ok) / elapsed,
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itls]),
        "e2e_s": percentiles([r.e2e for r in ok]),
    }


def wait_ready(base_url: str, timeout: float = 300.0, proc=None) -> None:
    """Poll GET /health until it answers 200 (a server started in `proc`, a Popen, must not exit)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise LlmcError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{base_url.rstrip('/')}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise LlmcError(f"{base_url} was not ready after {timeout:.0f} s")
        time.sleep(0.2)


def bench_url(base_url: str, work: Workload, **kw) -> dict[str, Any]:
    return asyncio.run(run_http_workload(base_url, work, **kw))
