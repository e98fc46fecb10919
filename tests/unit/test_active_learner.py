"""ActiveLearner: meets its target ask rate, never exceeds a user's budget, counts answers."""

from __future__ import annotations

import math
import random
from collections import defaultdict

from sidecar.config import ActiveLearningConfig
from sidecar.learning import ActiveLearner


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _logprobs(rng: random.Random, u: float, n: int = 16) -> list[float]:
    # a generation whose normalized uncertainty is u: mean log-prob ln(1 - u)
    mean = math.log(max(1e-6, 1.0 - u))
    return [mean] * n


def test_active_ask_rate_tracks_the_target_on_a_synthetic_stream() -> None:
    cfg = ActiveLearningConfig(
        target_ask_rate=0.1, baseline_random_rate=0.02, max_asks_per_user_per_hour=0
    )
    learner = ActiveLearner(cfg, rng=random.Random(1), clock=_Clock())
    rng = random.Random(2)
    asks = 0
    n = 20_000
    for i in range(n):
        u = rng.betavariate(2, 5)  # mostly confident, a long uncertain tail
        d = learner.decide(f"r{i}", f"user{i}", _logprobs(rng, u))
        asks += d.ask
    rate = asks / n
    assert abs(rate - 0.1) <= 0.02, rate  # within 20% of the target
    st = learner.status()
    assert st["asks_random"] > 0 and st["asks_uncertainty"] > st["asks_random"]
    assert abs(st["ask_rate"] - rate) < 1e-12


def test_active_threshold_adapts_when_the_model_drifts() -> None:
    cfg = ActiveLearningConfig(
        target_ask_rate=0.05, baseline_random_rate=0.01, max_asks_per_user_per_hour=0
    )
    learner = ActiveLearner(cfg, rng=random.Random(3), clock=_Clock())
    rng = random.Random(4)
    phases = [(0.1, 0.05), (0.6, 0.1)]  # a confident model, then a much less certain one
    fixed = 0.0
    decisions: list[bool] = []
    for phase, (mu, sigma) in enumerate(phases):
        decisions = []
        for i in range(12_000):
            u = min(0.99, max(0.0, rng.gauss(mu, sigma)))
            decisions.append(learner.decide(f"p{phase}-{i}", f"u{i}", _logprobs(rng, u)).ask)
        if phase == 0:
            fixed = learner.threshold
        # once the window has turned over, the rate is back on target
        settled = decisions[cfg.quantile_window :]
        assert abs(sum(settled) / len(settled) - 0.05) <= 0.01, (phase, sum(settled))
    # the threshold tuned for the first phase would have asked almost always in the second
    assert fixed < 0.3 and learner.threshold > 0.6
    assert sum(decisions) / len(decisions) < 0.15


def test_active_never_exceeds_a_users_hourly_budget() -> None:
    cfg = ActiveLearningConfig(
        target_ask_rate=0.5, baseline_random_rate=0.1, max_asks_per_user_per_hour=3
    )
    clock = _Clock()
    learner = ActiveLearner(cfg, rng=random.Random(5), clock=clock)
    rng = random.Random(6)
    asked_at: dict[str, list[float]] = defaultdict(list)
    exhausted = 0
    for i in range(6000):
        clock.now += rng.uniform(0, 20)  # about 33 hours in all
        user = f"user{rng.randrange(5)}"
        d = learner.decide(f"r{i}", user, _logprobs(rng, rng.random()))
        if d.ask:
            asked_at[user].append(clock.now)
        exhausted += d.reason == "budget_exhausted"
    assert exhausted > 0
    for user, times in asked_at.items():
        for j in range(len(times)):
            in_hour = [t for t in times[j:] if t - times[j] < 3600.0]
            assert len(in_hour) <= 3, user
    # anonymous requests have no budget
    anon = sum(learner.decide(f"a{i}", "", _logprobs(rng, 0.999)).ask for i in range(50))
    assert anon > 3


def test_active_budget_holds_when_too_many_users_are_tracked() -> None:
    cfg = ActiveLearningConfig(
        target_ask_rate=1.0,
        baseline_random_rate=1.0,
        max_asks_per_user_per_hour=1,
        max_tracked_users=10,
    )
    clock = _Clock()
    learner = ActiveLearner(cfg, rng=random.Random(0), clock=clock)
    first = [learner.decide(f"r{i}", f"u{i}", []).ask for i in range(20)]
    assert first == [True] * 10 + [False] * 10  # refuses rather than forget a budget
    assert [learner.decide(f"s{i}", f"u{i}", []).ask for i in range(10)] == [False] * 10
    clock.now += 3601
    assert learner.decide("late", "u15", []).ask


def test_active_counts_answers_once_and_only_for_asked_requests() -> None:
    cfg = ActiveLearningConfig(
        target_ask_rate=1.0,
        baseline_random_rate=1.0,
        answer_window_seconds=60,
        max_asks_per_user_per_hour=0,
    )
    clock = _Clock()
    learner = ActiveLearner(cfg, rng=random.Random(0), clock=clock)
    for i in range(4):
        assert learner.decide(f"r{i}", "", []).ask
    assert learner.record_answer("r0")
    assert not learner.record_answer("r0")  # a second feedback is not a second answer
    assert not learner.record_answer("never-asked")
    clock.now += 61
    assert not learner.record_answer("r1")  # too late
    st = learner.status()
    assert st["answers"] == 1 and st["asks"] == 4
    assert st["answer_rate"] == 0.25


def test_active_validation_names_the_field() -> None:
    from atlas_sidecar_client.pb import active_learning_pb2

    learner = ActiveLearner(ActiveLearningConfig())
    req = active_learning_pb2.ShouldRequestFeedbackRequest
    assert learner.validate(req()) == "request_id: required"
    assert "token_logprobs[1]" in (
        learner.validate(req(request_id="x", token_logprobs=[-1, 0.5])) or ""
    )
    assert "token_logprobs[0]" in (
        learner.validate(req(request_id="x", token_logprobs=[math.nan])) or ""
    )
    long_bad = [-0.1] * 100 + [-math.inf]
    assert "token_logprobs[100]" in (
        learner.validate(req(request_id="x", token_logprobs=long_bad)) or ""
    )
    assert learner.validate(req(request_id="x", token_logprobs=[-0.1, 0.0])) is None
    assert "request_id" in (learner.validate(req(request_id="x" * 300)) or "")
