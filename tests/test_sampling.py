"""Sampler and StopChecker tests."""

from __future__ import annotations

import numpy as np
import pytest

from llmc.errors import LlmcError
from llmc.runtime.sampling import Sampler, SamplingParams, StopChecker, filtered_probs


def draws(params: SamplingParams, logits: np.ndarray, n: int, rid="r") -> np.ndarray:
    """n tokens drawn one step at a time for one request; logits is [1, vocab]."""
    sampler = Sampler()
    return np.array([sampler.sample(logits, [params], [rid])[0] for _ in range(n)])


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(6, 100)).astype(np.float32)
    out = Sampler().sample(logits, [SamplingParams()] * 6, list(range(6)))
    assert out.dtype == np.int64 and list(out) == list(np.argmax(logits, axis=-1))


def test_top_k_1_is_greedy_at_any_temperature():
    logits = np.random.default_rng(1).normal(size=(5, 64))
    params = [SamplingParams(temperature=t, top_k=1, seed=3) for t in (0.5, 1.0, 2.0, 10.0, 100.0)]
    assert list(Sampler().sample(logits, params, list("abcde"))) == list(np.argmax(logits, axis=-1))


def test_seed_reproducible_and_per_request():
    logits = np.random.default_rng(2).normal(size=(1, 50))
    p = SamplingParams(temperature=1.0, seed=1234)
    a, b = draws(p, logits, 200), draws(p, logits, 200)
    assert (a == b).all()
    assert not (a == draws(SamplingParams(temperature=1.0, seed=4321), logits, 200)).all()
    # A request's stream does not depend on what else shares the batch.
    s = Sampler()
    mixed = [
        s.sample(np.concatenate([logits, logits]), [SamplingParams(temperature=1.0, seed=9), p], ["x", "r"])[1]
        for _ in range(200)
    ]
    assert (np.array(mixed) == a).all()


def test_top_p_restricts_support():
    probs = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
    logits = np.log(probs)[None]
    out = draws(SamplingParams(temperature=1.0, top_p=0.75, seed=0), logits, 4000)
    assert set(out.tolist()) == {0, 1}  # smallest set reaching 0.75 is {0.5, 0.3}
    assert abs((out == 0).mean() - 0.5 / 0.8) < 0.03  # renormalized within the nucleus
    tiny = draws(SamplingParams(temperature=1.0, top_p=1e-6, seed=0), logits, 200)
    assert set(tiny.tolist()) == {0}  # keeps at least the most likely token
    full = draws(SamplingParams(temperature=1.0, top_p=1.0, seed=0), logits, 4000)
    assert set(full.tolist()) == {0, 1, 2, 3, 4}


def test_top_k_restricts_support_and_temperature_matches_softmax():
    logits = np.array([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    out = draws(SamplingParams(temperature=1.0, top_k=3, seed=5), logits, 3000)
    assert set(out.tolist()) == {0, 1, 5}
    p = filtered_probs(logits[0], SamplingParams(temperature=2.0))
    expected = np.exp(logits[0] / 2) / np.exp(logits[0] / 2).sum()
    assert np.allclose(p, expected)
    out = draws(SamplingParams(temperature=2.0, seed=6), logits, 6000)
    freq = np.bincount(out, minlength=6) / len(out)
    assert np.abs(freq - expected).max() < 0.03


def test_masked_logits_are_never_sampled():
    logits = np.array([[0.0, -np.inf, 0.0, -np.inf]])
    out = draws(SamplingParams(temperature=1.0, seed=7), logits, 500)
    assert set(out.tolist()) == {0, 2}


def test_sampling_params_validation():
    for bad in (
        dict(temperature=-1.0),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(max_new_tokens=0),
        dict(stop=[""]),
    ):
        with pytest.raises(LlmcError):
            SamplingParams(**bad)
    assert SamplingParams(stop="###").stop == ["###"]
    with pytest.raises(ValueError):
        Sampler().sample(np.zeros((2, 4)), [SamplingParams()], ["a"])


def test_stop_checker_incremental():
    sc = StopChecker(["world", "\n\n"])
    assert sc.check("Hello") is None
    assert sc.check("Hello wor") is None  # stop string split across increments
    assert sc.check("Hello world, bye") == "Hello "
    assert sc.stopped


def test_stop_checker_earliest_wins_and_no_stop():
    assert StopChecker(["bb", "a"]).check("xxbba") == "xx"
    assert StopChecker([]).check("anything") is None
    sc = StopChecker(["STOP"])
    text = ""
    for piece in ["lorem ", "ipsum ", "ST", "O", "P trailing"]:
        text += piece
        res = sc.check(text)
    assert res == "lorem ipsum "


def test_stop_checker_safe_len_holds_back_partial_stop():
    sc = StopChecker(["</s>", "END"])
    assert sc.safe_len("abc</") == 3
    assert sc.safe_len("abcEN") == 3
    assert sc.safe_len("abc") == 3
    assert sc.safe_len("") == 0
