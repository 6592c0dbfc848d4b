"""Stop strings end to end, the LLM API conveniences, and the serving engine loop.

The tiny engine's output is unpredictable text, so stop strings are chosen from what it generates
without one: the run with the stop string must then end exactly where the string first appears.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from llmc.build import BuildOptions, build_engine
from llmc.errors import LlmcError
from llmc.runtime.llm import LLM
from llmc.runtime.sampling import SamplingParams, token_logprobs
from llmc.serve.engine_loop import EngineLoop, QueueFull, ShuttingDown, TokenEvent

PROMPTS = ["Once upon a time", "The quick brown fox", "hello", "abc abc abc"]
CANDIDATES = ["hello", "abc", "xyz", "The end", "one two", "Q:", "data", "hi there", "ok"]


@pytest.fixture(scope="module")
def engine(tiny_checkpoints, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loop") / "tiny"
    build_engine(tiny_checkpoints["llama"], out, BuildOptions(max_batch_size=4, max_input_len=96, max_seq_len=128,
                                                              tokens_per_block=16))
    return out


def _free(n: int = 32) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def _stop_for(text: str) -> tuple[str, str] | None:
    """A stop string taken from the middle of `text`, and the text expected before it."""
    for start in range(len(text) // 3, len(text) - 3):
        stop = text[start:start + 3]
        if stop.strip() and "\ufffd" not in stop:
            return stop, text[:text.index(stop)]
    return None


def _pick(llm: LLM, max_tokens: int = 32) -> tuple[str, str, str]:
    """(prompt, stop, expected text): a prompt whose free output (random bytes from the tiny
    model, often not UTF-8) has a clean 3-character stop string in its middle."""
    for prompt in CANDIDATES:
        found = _stop_for(llm.generate(prompt, _free(max_tokens))[0].text)
        if found:
            return (prompt, *found)
    raise AssertionError("no candidate prompt gives printable output")


def test_generate_takes_one_string_as_one_prompt(engine):
    llm = LLM(engine, num_blocks=32)
    outs = llm.generate("hello there", SamplingParams(max_tokens=3))
    assert len(outs) == 1 and outs[0].prompt == "hello there"
    assert SamplingParams(max_new_tokens=7).max_tokens == 7 == SamplingParams(max_tokens=7).max_new_tokens


def test_stop_string_ends_the_only_request(engine):
    """The old LLM.step returned before handing back a request a stop string had finished when it
    was the last one running (KeyError: 0 in generate, a hang in stream)."""
    llm = LLM(engine, num_blocks=32)
    prompt, stop, expected = _pick(llm)
    out = llm.generate(prompt, SamplingParams(max_tokens=32, ignore_eos=True, stop=[stop]))[0]
    assert (out.text, out.finish_reason) == (expected, "stop")
    pieces = list(llm.stream(prompt, SamplingParams(max_tokens=32, ignore_eos=True, stop=stop)))
    assert "".join(pieces) == expected
    assert not llm.has_unfinished() and llm.block_manager.num_used_blocks == 0


def test_stop_string_mixed_with_other_requests(engine):
    llm = LLM(engine, num_blocks=32)
    prompt, stop, expected = _pick(llm)
    prompts = [PROMPTS[0], prompt, PROMPTS[2], PROMPTS[3]]
    alone = [o.output_token_ids for o in llm.generate(prompts, _free())]
    params = [_free(), SamplingParams(max_tokens=32, ignore_eos=True, stop=stop), _free(), _free()]
    streamed: dict[int, list[str]] = {}
    outs = llm.generate(prompts, params, on_token=lambda rid, tok, text: streamed.setdefault(rid, []).append(text))
    assert outs[1].text == expected and outs[1].finish_reason == "stop"
    for i in (0, 2, 3):  # the others are untouched by it
        assert outs[i].output_token_ids == alone[i] and outs[i].finish_reason == "length"
    for i, out in enumerate(outs):
        assert "".join(streamed[out.request_id]) == out.text


def test_cli_run_with_stop_string_and_stream(engine):
    prompt, stop, expected = _pick(LLM(engine, num_blocks=32), 24)
    for extra in ([], ["--stream"]):
        r = subprocess.run([sys.executable, "-m", "llmc.cli.app", "run", str(engine), "-p", prompt,
                            "--max-new-tokens", "24", "--stop", stop, "--kv-cache-mb", "4", *extra],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr and expected in r.stdout and stop not in r.stdout.split(expected, 1)[1]


def test_prompts_too_long_for_every_request_do_not_crash(engine):
    llm = LLM(engine, num_blocks=32)
    outs = llm.generate([list(range(3, 200)), list(range(3, 150))], SamplingParams(max_tokens=4))
    assert [o.finish_reason for o in outs] == ["error", "error"]
    assert not llm.has_unfinished()


def test_sampling_params_reject_bad_values():
    for bad in (dict(seed=-1), dict(max_tokens=0), dict(temperature=float("nan")), dict(top_p=0),
                dict(logprobs=-1), dict(logprobs=100), dict(stop=[""]), dict(max_tokens="3"),
                dict(max_tokens=3, max_new_tokens=4)):
        with pytest.raises(LlmcError):
            SamplingParams(**bad)


def test_token_logprobs_match_an_independent_log_softmax():
    from scipy.special import log_softmax

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, 1000).astype(np.float32)
    ref = log_softmax(logits.astype(np.float64))
    got = token_logprobs(logits, 17, 5)
    assert got["logprob"] == pytest.approx(ref[17], abs=1e-9)
    assert [t for t, _ in got["top"]] == list(np.argsort(-ref)[:5])
    assert [lp for _, lp in got["top"]] == pytest.approx(list(np.sort(ref)[::-1][:5]), abs=1e-9)


# ---- the engine loop ---------------------------------------------------------------------------
class Collector:
    """A sink that records events and signals when the request finished."""

    def __init__(self):
        self.events: list[TokenEvent] = []
        self.done = threading.Event()

    def __call__(self, ev: TokenEvent) -> None:
        self.events.append(ev)
        if ev.finished:
            self.done.set()

    @property
    def output(self):
        return self.events[-1].output

    @property
    def tokens(self) -> list[int]:
        return [t for ev in self.events for t in ev.token_ids]

    @property
    def text(self) -> str:
        return "".join(ev.text for ev in self.events)


def test_loop_serves_concurrent_submitters_like_generate(engine):
    expected = [o.output_token_ids for o in LLM(engine, num_blocks=32).generate(PROMPTS * 3, _free(12))]
    loop = EngineLoop(LLM(engine, num_blocks=32)).start()
    assert loop.ready
    sinks = [Collector() for _ in range(len(PROMPTS) * 3)]

    def client(i):
        time.sleep(0.002 * i)  # staggered: requests join a running batch
        loop.submit((PROMPTS * 3)[i], _free(12), sinks[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(sinks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in sinks:
        assert s.done.wait(60)
    assert [s.tokens for s in sinks] == expected
    for s in sinks:
        assert s.output.finish_reason == "length" and s.text == s.output.text
        assert s.output.output_token_ids == s.tokens
    st = loop.stats()
    assert st["kv_blocks_used"] == 0 and st["requests_finished"] == {"length": len(sinks)}
    assert st["generation_tokens_total"] == 12 * len(sinks)
    assert loop.shutdown(timeout=10)
    with pytest.raises(ShuttingDown):
        loop.submit("late", _free(), Collector())


def test_loop_abort_frees_blocks_and_others_finish(engine):
    loop = EngineLoop(LLM(engine, num_blocks=32)).start()
    keep, cancel = Collector(), Collector()
    loop.submit(PROMPTS[0], _free(60), keep)
    rid = loop.submit(PROMPTS[1], _free(100), cancel)
    deadline = time.time() + 30
    while not cancel.tokens and time.time() < deadline:
        time.sleep(0.005)
    loop.abort(rid)
    assert cancel.done.wait(30) and keep.done.wait(60)
    assert cancel.output.finish_reason == "abort" and len(cancel.tokens) < 100
    assert len(keep.tokens) == 60 and keep.output.finish_reason == "length"
    assert loop.stats()["kv_blocks_used"] == 0
    loop.shutdown(timeout=10)


def test_loop_admission_errors_and_queue_limit(engine):
    llm = LLM(engine, num_blocks=32)
    loop = EngineLoop(llm, max_queue=0)  # not started: nothing leaves the queue
    with pytest.raises(QueueFull):
        loop.submit("x", _free(), Collector())
    loop = EngineLoop(llm, max_queue=4)
    with pytest.raises(LlmcError, match="at most 96"):
        loop.submit(list(range(3, 120)), _free(), Collector())
    with pytest.raises(LlmcError, match=r"\[0, 320\)"):
        loop.submit([5, 999], _free(), Collector())


def test_loop_logprobs_and_drain_on_shutdown(engine):
    loop = EngineLoop(LLM(engine, num_blocks=32)).start()
    sinks = [Collector() for _ in range(3)]
    for s in sinks:
        loop.submit(PROMPTS[3], SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2), s)
    assert loop.shutdown(drain=True, timeout=60)  # drains: every request completes
    for s in sinks:
        assert s.output.finish_reason == "length" and len(s.tokens) == 8
        lps = [lp for ev in s.events for lp in (ev.logprobs or [])]
        assert [lp["token_id"] for lp in lps] == s.tokens
        for lp in lps:  # greedy: the sampled token is the most likely one
            assert lp["top"][0][0] == lp["token_id"] and lp["logprob"] == pytest.approx(lp["top"][0][1])
            assert lp["top"][0][1] >= lp["top"][1][1]


def test_loop_shutdown_without_drain_aborts(engine):
    loop = EngineLoop(LLM(engine, num_blocks=32)).start()
    sinks = [Collector() for _ in range(3)]
    for s in sinks:
        loop.submit(PROMPTS[0], _free(100), s)
    assert loop.shutdown(drain=False, timeout=30)
    for s in sinks:
        assert s.done.is_set() and s.output.finish_reason in ("abort", "length")
    assert loop.llm.block_manager.num_used_blocks == 0


@pytest.mark.slow
def test_smollm2_count_stops_at_six(smollm2_engine):
    """The reported case: SmolLM2 counting, stopped by " 6" (it ended the last running request)."""
    r = subprocess.run([sys.executable, "-m", "llmc.cli.app", "run", str(smollm2_engine), "-p",
                        "Count: 1, 2, 3,", "--stop", " 6", "--max-new-tokens", "24"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    llm = LLM(smollm2_engine)
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(max_tokens=24, stop=" 6"))[0]
    assert out.finish_reason == "stop" and out.text.endswith("5,") and " 6" not in out.text, out.text
    assert "".join(llm.stream("Count: 1, 2, 3,", SamplingParams(max_tokens=24, stop=" 6"))) == out.text
