"""`llmc serve` on a tiny engine: auth, errors, admission, cancellation, metrics, drain, bench --url.

Each test talks to the real server process over loopback with raw HTTP (httpx) or the official
`openai` client; /metrics is read with prometheus-client's own parser.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serve_util import Server, sse_events
from test_runtime_e2e import _build

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoints, tmp_path_factory):
    return _build(tiny_checkpoints["llama"], tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(tiny_engine):
    s = Server(tiny_engine, "--model-name", "tiny", env={"LLMC_API_KEY": KEY})
    yield s
    code = s.stop(signal.SIGTERM)
    assert code == 0, s.output()


def _post(server, path: str, body, headers=AUTH, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json", **headers},
                      timeout=60, **kw)


def _assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_health_models_and_auth_on_every_v1_route(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    routes = [("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
              ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})]
    for method, path, body in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
            r = httpx.request(method, server.url + path, json=body, headers=headers)
            assert _assert_error(r, 401)["code"] == "invalid_api_key"
        r = httpx.request(method, server.url + path, json=body, headers=AUTH)
        assert r.status_code == 200, r.text
    models = httpx.get(server.url + "/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


BAD = [
    ("/v1/completions", b'{"prompt": "x", ', None),
    ("/v1/completions", b'[1, 2]', None),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": 5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": list(range(5, 205))}, "prompt"),  # 200 tokens > max_input_len 160
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": "yes"}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_answer_400_and_the_server_keeps_serving(server, path, body, param):
    err = _assert_error(_post(server, path, body), 400, param)
    assert err["type"] == "invalid_request_error"
    if body == {"prompt": list(range(5, 205))}:
        assert "160" in err["message"]
    ok = _post(server, "/v1/completions", {"prompt": "still here", "max_tokens": 3, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_unknown_model_is_404(server):
    err = _assert_error(_post(server, "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404, "model")
    assert err["code"] == "model_not_found"


def test_openai_client_shapes_usage_and_logprobs(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    ids = list(range(40, 60))
    c = client.completions.create(model="tiny", prompt=ids, max_tokens=7, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    assert c.choices[0].finish_reason == "length"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (20, 7, 27)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 7
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 2  # (tokens that decode alike share a key)
        assert chosen >= max(top.values()) - 1e-5  # greedy picks the most likely
    assert "".join(lp.tokens) == c.choices[0].text or "\ufffd" in "".join(lp.tokens)

    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    content = [t for c in chunks[:-1] if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 for t in content)
    for t in content:
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-6)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    full = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full.choices[0].message.content


def _abort_count(server) -> float:
    return server.metric("llmc:request_success_total", finished_reason="abort")


def _wait_for(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_client_disconnect_cancels_and_frees_kv_blocks(server):
    before = _abort_count(server)
    body = {"prompt": "a long story", "max_tokens": 170, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [line for _, line in zip(range(4), lines)]
            assert any(line.startswith("data:") for line in got)
    _wait_for(lambda: _abort_count(server) == before + 1)
    # A non-streamed request whose client gives up is cancelled too. (The client gives up after
    # 5 ms: 170 tiny-model tokens took ~50 ms, so a 50 ms read timeout could see the whole answer.)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=httpx.Timeout(30, read=0.005),
                   json={"prompt": "another", "max_tokens": 170, "ignore_eos": True})
    _wait_for(lambda: _abort_count(server) == before + 2)
    m = server.wait_idle()
    assert m[("llmc:kv_blocks_used", ())] == 0 and m[("llmc:num_requests_running", ())] == 0


def test_metrics_parse_with_prometheus_parser(server):
    _post(server, "/v1/completions", {"prompt": "count me", "max_tokens": 4, "ignore_eos": True})
    m = server.metrics()
    for gauge in ("llmc:num_requests_running", "llmc:num_requests_waiting", "llmc:kv_blocks_used",
                  "llmc:kv_blocks_total", "llmc:prefix_cache_hit_tokens_total", "llmc:num_preemptions_total",
                  "llmc:prompt_tokens_total", "llmc:generation_tokens_total", "llmc:kv_cache_usage_perc"):
        assert (gauge, ()) in m, gauge
    assert m[("llmc:kv_blocks_total", ())] > 0
    assert m[("llmc:request_success_total", (("finished_reason", "length"),))] >= 1
    for hist in ("llmc:time_to_first_token_seconds", "llmc:time_per_output_token_seconds",
                 "llmc:e2e_request_latency_seconds", "llmc:request_prompt_tokens", "llmc:request_generation_tokens"):
        assert m[(hist + "_count", ())] >= 1, hist
        assert m[(hist + "_bucket", (("le", "+Inf"),))] == m[(hist + "_count", ())]
    assert m[("llmc:generation_tokens_total", ())] >= m[("llmc:request_generation_tokens_sum", ())] > 0


def test_bench_url_drives_the_server(server, tiny_engine, tmp_path):
    from llmc import bench as b
    from llmc.tokenizer import load_tokenizer

    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "llmc.cli.app", "bench", str(tiny_engine), "--url", server.url,
                        "--num-requests", "6", "--input-len", "8:40", "--output-len", "4:12", "--concurrency", "3",
                        "--output", str(out)], capture_output=True, text=True, env={**__import__("os").environ,
                                                                                   "LLMC_API_KEY": KEY})
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())
    work = b.make_workload(b.corpus_tokens(load_tokenizer(tiny_engine), None), 6, (8, 40), (4, 12), 0, None)
    assert row["errors"] == 0 and row["requests"] == 6 and row["model"] == "tiny"
    assert row["output_tokens"] == sum(work.output_lens)
    assert row["output_tokens_per_s"] > 0 and set(row["ttft_s"]) == {"p50", "p90", "p99"}


def test_cli_errors_are_one_line(tiny_engine, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "llmc.cli.app", *args], capture_output=True, text=True)

    r = cli("serve", str(tmp_path / "nope"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("serve", str(tiny_engine), "--frontend", "grpc")
    assert r.returncode == 2 and "--frontend" in r.stderr
    import importlib.util

    if importlib.util.find_spec("llmc.serve.triton") is None:
        r = cli("serve", str(tiny_engine), "--frontend", "triton")
        assert r.returncode == 2 and "Triton frontend is not installed" in r.stderr, r.stderr
    r = cli("bench", "--url", "http://127.0.0.1:9", "--num-requests", "2", "--tokenizer", str(tiny_engine))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "cannot reach" in r.stderr, r.stderr


def test_queue_full_answers_503_then_sigint_drains_and_exits_0(tiny_engine):
    s = Server(tiny_engine, "--max-queue", "1")
    try:
        async def flood():
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"prompt": "flood", "max_tokens": 150, "ignore_eos": True}
                return await asyncio.gather(*(client.post(s.url + "/v1/completions", json=body) for _ in range(24)))

        rs = asyncio.run(flood())
        full = [r for r in rs if r.status_code == 503]
        ok = [r for r in rs if r.status_code == 200]
        assert full and ok and len(full) + len(ok) == 24
        for r in full:
            assert r.headers["retry-after"] and _assert_error(r, 503)["code"] == "queue_full"
        assert all(r.json()["usage"]["completion_tokens"] == 150 for r in ok)
        assert s.metric("llmc:http_requests_rejected_total", status="503") == len(full)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "after", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200  # admission control refused, it did not break anything

        # Drain: a stream in flight when SIGINT arrives still finishes, then the process exits 0.
        results: list = []
        started = threading.Event()

        def stream():
            with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                              json={"prompt": "drain", "max_tokens": 170, "ignore_eos": True, "stream": True,
                                    "stream_options": {"include_usage": True}}) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data:"))
                started.set()
                results.append(sse_events([first, *lines]))

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(30)
        s.proc.send_signal(signal.SIGINT)
        t.join(60)
        assert s.proc.wait(60) == 0, s.output()
        events = results[0]
        assert events[-1] is None  # [DONE]
        assert events[-2]["usage"]["completion_tokens"] == 170
        assert events[-3]["choices"][0]["finish_reason"] == "length"
        with pytest.raises(httpx.TransportError):  # nothing listens any more
            httpx.get(s.url + "/health", timeout=5)
    finally:
        s.kill()
