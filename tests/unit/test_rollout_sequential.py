"""The anytime-valid tests: rare false alarms under the null, detection under harm."""

from __future__ import annotations

import numpy as np

from sidecar.rollout import (
    CharNgramCosine,
    MeanDifferenceTest,
    NormalizedExact,
    RateRatioTest,
    TokenJaccard,
    comparator_by_name,
)


def _rate_runs(ratio: float, runs: int, seed: int) -> float:
    """Share of runs whose harm e-value ever reached 100 (checked after every batch)."""
    rng = np.random.default_rng(seed)
    alarms = 0
    for _ in range(runs):
        t = RateRatioTest()
        hit = False
        for share in (0.01, 0.05, 0.1, 0.25, 0.5):
            for _ in range(30):
                n = rng.poisson(500)
                nc = rng.binomial(n, share)
                xc = rng.binomial(nc, min(1.0, 0.01 * ratio))
                xs = rng.binomial(n - nc, 0.01)
                t.update(int(xc), int(xs), nc / n if n else 0.0)
                hit = hit or t.harm_e >= 100
        alarms += hit
    return alarms / runs


def test_rollout_rate_test_rarely_alarms_when_equal() -> None:
    assert _rate_runs(1.0, 200, seed=1) <= 0.03


def test_rollout_rate_test_detects_four_times_the_errors() -> None:
    assert _rate_runs(4.0, 50, seed=2) >= 0.95


def test_rollout_rate_test_safety_side_grows_when_equal() -> None:
    t = RateRatioTest(safe_ratio=2.0)
    rng = np.random.default_rng(3)
    for _ in range(200):
        xc, xs = rng.binomial(500, 0.02), rng.binomial(500, 0.02)
        t.update(int(xc), int(xs), 0.5)
    assert t.safe_e > 100
    assert t.harm_e < 1


def _mean_runs(shift: float, runs: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    alarms = 0
    for _ in range(runs):
        t = MeanDifferenceTest(margin=0.02)
        hit = False
        for _ in range(60):
            c = rng.beta(6 * (0.6 + shift), 6 * (0.4 - shift), rng.poisson(10))
            s = rng.beta(3.6, 2.4, rng.poisson(100))
            t.update(c, s)
            hit = hit or t.harm_e >= 100
        alarms += hit
    return alarms / runs


def test_rollout_mean_test_rarely_alarms_when_equal() -> None:
    assert _mean_runs(0.0, 200, seed=4) <= 0.02


def test_rollout_mean_test_detects_a_lower_score() -> None:
    assert _mean_runs(-0.1, 50, seed=5) >= 0.95


def test_rollout_mean_test_state_round_trips() -> None:
    t = MeanDifferenceTest()
    t.update([0.1, 0.2, 0.3], [0.9] * 40)
    u = MeanDifferenceTest()
    u.restore(t.state())
    assert u.harm_e == t.harm_e
    assert u.means() == t.means()


def test_rollout_comparators() -> None:
    assert NormalizedExact().similarity("Hello,  World!", "hello world") == 1.0
    assert NormalizedExact().similarity("hello", "goodbye") == 0.0
    assert TokenJaccard().similarity("a b c", "a b d") == 0.5
    cos = CharNgramCosine()
    assert cos.similarity("the cat sat", "the cat sat") > 0.999
    assert cos.similarity("the cat sat", "the cat sits") > cos.similarity("the cat sat", "xyz")
    assert comparator_by_name("token_jaccard").name == "token_jaccard"
