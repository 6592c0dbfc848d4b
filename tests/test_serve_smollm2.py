"""`llmc serve` on the real SmolLM2 engine: the official openai client, outputs equal to the
in-process runtime token for token while other streams run, and bounded load tests (200
concurrent streaming clients on loopback, with and without cancelling a third of them)."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_util import Server
from test_runtime_e2e import QUESTIONS, SYSTEM, _build

from llmc import LLM, SamplingParams

pytestmark = pytest.mark.slow

LOAD_CLIENTS = 200


@pytest.fixture(scope="module")
def smol_engine(smollm2_checkpoint, tmp_path_factory):
    return _build(smollm2_checkpoint, tmp_path_factory.mktemp("serve-smol") / "engine",
                  max_batch_size=32, max_input_len=96, max_seq_len=128)


@pytest.fixture(scope="module")
def ref(smol_engine):
    """The in-process runtime (what `llmc run` uses), for reference outputs."""
    return LLM(smol_engine, num_blocks=64)


@pytest.fixture(scope="module")
def server(smol_engine):
    s = Server(smol_engine, "--model-name", "smollm2")
    yield s
    assert s.stop() == 0, s.output()


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_completions_chat_stream_stop_usage(server, ref):
    client = _client(server)
    prompt = SYSTEM + QUESTIONS[0]
    want = ref.generate(prompt, SamplingParams(max_tokens=24))[0]
    c = client.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0)
    assert c.choices[0].text == want.text and c.choices[0].finish_reason == want.finish_reason
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(want.prompt_token_ids),
                                                                   len(want.output_token_ids))

    # Streaming: the pieces add up to the same text; usage arrives in a last, choice-less chunk.
    chunks = list(client.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.output_token_ids)

    # Stop string: cut before its first occurrence, finish_reason "stop", in both modes.
    long = ref.generate(prompt, SamplingParams(max_tokens=48, ignore_eos=True))[0].text
    words = long.split()
    stop = " " + words[len(words) // 2]
    cut = long[:long.index(stop)]
    for stream in (False, True):
        r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=48, temperature=0, stop=[stop, "@@@"],
                                      stream=stream, extra_body={"ignore_eos": True})
        r = list(r) if stream else r
        text = "".join(ch.choices[0].text for ch in r if ch.choices) if stream else r.choices[0].text
        reason = [ch.choices[0].finish_reason for ch in r if ch.choices][-1] if stream else r.choices[0].finish_reason
        assert (text, reason) == (cut, "stop")

    # Chat: the tokenizer's chat template, exactly as the runtime applies it.
    msgs = [{"role": "user", "content": QUESTIONS[1]}]
    want = ref.generate(QUESTIONS[1], SamplingParams(max_tokens=32), chat=True)[0]
    c = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=32, temperature=0)
    assert c.choices[0].message.content == want.text and c.choices[0].message.role == "assistant"
    assert c.usage.prompt_tokens == len(want.prompt_token_ids)
    chunks = list(client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=32, temperature=0,
                                                 stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text

    # Seeded sampling is reproducible through the server.
    a, b = (client.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0.9, seed=11)
            .choices[0].text for _ in range(2))
    assert a == b


def test_greedy_equals_runtime_token_for_token_while_other_streams_run(server, ref):
    tok = ref.tokenizer
    prompts = [tok.encode(SYSTEM + q, add_special_tokens=False) for q in QUESTIONS]
    lens = [24, 9, 31, 17, 40, 12]
    want = [ref.generate([p], SamplingParams(max_tokens=n))[0] for p, n in zip(prompts, lens)]
    stop = threading.Event()

    def background(i: int) -> int:  # sampled streams that keep the batch busy meanwhile
        n = 0
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                with c.stream("POST", server.url + "/v1/completions",
                              json={"prompt": QUESTIONS[i], "max_tokens": 40, "temperature": 1.0, "seed": i,
                                    "ignore_eos": True, "stream": True}) as r:
                    assert r.status_code == 200
                    n += sum(1 for _ in r.iter_lines())
        return n

    client = _client(server)

    def greedy(i: int):
        return client.completions.create(model="smollm2", prompt=prompts[i], max_tokens=lens[i], temperature=0,
                                         logprobs=0)

    with ThreadPoolExecutor(12) as pool:
        bg = [pool.submit(background, i) for i in range(4)]
        got = list(pool.map(greedy, range(len(prompts))))
        stop.set()
        assert all(f.result() > 0 for f in bg)
    for g, w in zip(got, want):
        ch = g.choices[0]
        assert ch.logprobs.tokens == [tok.decode([t]) for t in w.output_token_ids]  # token for token
        assert ch.text == w.text and ch.finish_reason == w.finish_reason
        assert g.usage.completion_tokens == len(w.output_token_ids)


async def _load(server, prompts, lens, cancel_every: int | None):
    """LOAD_CLIENTS streaming clients, staggered 10 ms apart; some cancel after their first token."""
    results: dict[int, dict] = {}
    limits = httpx.Limits(max_connections=LOAD_CLIENTS, max_keepalive_connections=LOAD_CLIENTS)

    async def one(client, i: int):
        await asyncio.sleep(0.01 * i)
        cancel = cancel_every is not None and i % cancel_every == 0
        body = {"prompt": prompts[i % len(prompts)], "max_tokens": lens[i], "temperature": 0, "ignore_eos": True,
                "logprobs": 0, "stream": True, "stream_options": {"include_usage": True}}
        res = results[i] = {"tokens": [], "text": "", "finish": [], "usage": None, "done": 0, "ids": set()}
        async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                if line == "data: [DONE]":
                    res["done"] += 1
                    continue
                msg = json.loads(line[5:])
                res["ids"].add(msg["id"])
                if msg.get("usage"):
                    res["usage"] = msg["usage"]["completion_tokens"]
                for ch in msg["choices"]:
                    res["text"] += ch["text"]
                    res["tokens"] += (ch["logprobs"] or {}).get("tokens", [])
                    if ch["finish_reason"]:
                        res["finish"].append(ch["finish_reason"])
                if cancel and res["tokens"]:
                    res["cancelled"] = True
                    return  # leaving the block closes the connection mid-stream

    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=60), limits=limits) as client:
        await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(LOAD_CLIENTS))), timeout=600)
    return results


def _run_load(server, ref, cancel_every):
    tok = ref.tokenizer
    prompts = [tok.encode(SYSTEM + q, add_special_tokens=False) for q in QUESTIONS] + \
              [tok.encode(q, add_special_tokens=False) for q in QUESTIONS]
    full = [ref.generate([p], SamplingParams(max_tokens=16, ignore_eos=True))[0].output_token_ids for p in prompts]
    lens = [8 + i % 9 for i in range(LOAD_CLIENTS)]  # 8..16 tokens each
    expected = [[tok.decode([t]) for t in full[i % len(prompts)][:lens[i]]] for i in range(LOAD_CLIENTS)]
    before = server.metrics()
    results = asyncio.run(_load(server, prompts, lens, cancel_every))
    assert sorted(results) == list(range(LOAD_CLIENTS))
    ids = [next(iter(r["ids"])) for r in results.values()]
    assert len(set(ids)) == LOAD_CLIENTS and all(len(r["ids"]) == 1 for r in results.values())
    cancelled = [i for i, r in results.items() if r.get("cancelled")]
    for i, r in results.items():
        if i in cancelled:
            assert r["tokens"] == expected[i][:len(r["tokens"])]
            continue
        assert r["tokens"] == expected[i], i  # exactly its tokens: none lost, duplicated or mixed up
        assert (r["usage"], r["finish"], r["done"]) == (lens[i], ["length"], 1), (i, r)
    after = server.wait_idle(timeout=60)
    assert after[("llmc:kv_blocks_used", ())] == 0
    assert after[("llmc:num_requests_running", ())] == after[("llmc:num_requests_waiting", ())] == 0
    finished = {reason: after[k] - before.get(k, 0) for k in after if k[0] == "llmc:request_success_total"
                for reason in [dict(k[1])["finished_reason"]]}
    assert sum(finished.values()) == LOAD_CLIENTS, finished  # every request finished exactly once
    assert finished["length"] == LOAD_CLIENTS - finished["abort"]
    if cancel_every:
        assert 0 < finished["abort"] <= len(cancelled)
    else:
        assert finished["abort"] == 0
    return cancelled


def test_load_200_streaming_clients_then_a_third_cancelled(server, ref):
    rss_idle = server.rss()
    _run_load(server, ref, None)
    rss_loaded = server.rss()
    cancelled = _run_load(server, ref, 3)
    assert len(cancelled) == (LOAD_CLIENTS + 2) // 3
    rss_end = server.rss()
    mib = 2**20
    assert rss_end - rss_loaded < 128 * mib, f"RSS grew {(rss_end - rss_loaded) / mib:.0f} MiB in the second run"
    assert rss_end - rss_idle < 512 * mib, f"RSS grew {(rss_end - rss_idle) / mib:.0f} MiB under load"
