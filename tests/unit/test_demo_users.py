"""Simulated users: reproducible, and their reactions follow their hidden preferences."""

from __future__ import annotations

from collections import Counter

from atlas_sidecar_client import Signal

from sidecar.demo._users import Reaction, UserPopulation
from sidecar.demo._world import World

POSITIVE = {Signal.COPY, Signal.SHARE, Signal.ENGAGE}
NEGATIVE = {Signal.RETRY, Signal.DISMISS, Signal.EDIT}


def run(seed: int, answer_rank: int, n: int = 3000) -> list[tuple[int, Reaction]]:
    world = World()
    users = UserPopulation(world, seed=seed)
    out = []
    for _ in range(n):
        ask = users.ask()
        answer = world.intents[ask.prompt.intent].answers[answer_rank]
        out.append((ask.prompt.intent, users.react(ask, answer)))
    return out


def test_same_seed_same_users() -> None:
    assert run(4, 0, 500) == run(4, 0, 500)
    assert run(4, 0, 500) != run(5, 0, 500)


def test_good_answers_get_good_signals_and_bad_answers_bad_ones() -> None:
    good = Counter(r.signal for _, r in run(1, 0))
    bad = Counter(r.signal for _, r in run(1, 3))
    assert sum(good[s] for s in POSITIVE) > 5 * sum(good[s] for s in NEGATIVE)
    assert sum(bad[s] for s in NEGATIVE) > 5 * sum(bad[s] for s in POSITIVE)
    assert bad[Signal.RETRY] > 0 and bad[Signal.EDIT] > 0 and bad[Signal.DISMISS] > 0


def test_satisfaction_follows_hidden_quality() -> None:
    rates = [sum(r.satisfied for _, r in run(2, k)) / 3000 for k in range(4)]
    assert rates[0] > 0.9
    assert rates[1] > rates[2] + 0.2
    assert rates[3] < 0.15


def test_edits_carry_the_answer_users_wanted() -> None:
    world = World()
    for intent, r in run(3, 2):
        if r.signal == Signal.EDIT:
            assert r.correction == world.best_answer(intent)


def test_ratings_are_occasional_noisy_and_include_zero_side() -> None:
    reactions = [r for _, r in run(6, 3)]
    rated = [r.rating for r in reactions if r.rating is not None]
    assert 0.08 < len(rated) / len(reactions) < 0.25
    assert min(rated) <= 0.05
    # contrarians rate bad answers highly now and then
    assert any(v >= 0.7 for v in rated)
    assert sum(v >= 0.7 for v in rated) < 0.15 * len(rated)


def test_noise_sometimes_contradicts_satisfaction() -> None:
    reactions = [r for _, r in run(8, 0)]
    contradicted = [r for r in reactions if r.satisfied and r.signal in NEGATIVE]
    assert 0 < len(contradicted) < 0.05 * len(reactions)
