"""The demo's model learns from feedback-shaped data, and its artifacts round-trip."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from sidecar.demo._policy import Policy, PreferenceRow, SftRow, artifact_path, featurize
from sidecar.demo._users import UserPopulation
from sidecar.demo._world import World
from sidecar.scoring import score_feedback


def collect(
    world: World, policy: Policy, users: UserPopulation, n: int, rng: random.Random
) -> tuple[list[SftRow], list[PreferenceRow]]:
    """What curation would make of ``n`` served requests: good samples and edit/retry pairs."""
    sft: list[SftRow] = []
    prefs: list[PreferenceRow] = []
    for _ in range(n):
        ask = users.ask()
        choice = policy.act(ask.prompt.text, rng)
        reaction = users.react(ask, choice.answer)
        score = score_feedback([reaction.signal] if reaction.signal else [], reaction.rating)
        if score.has_feedback and score.reward >= 0.7:
            sft.append(SftRow(ask.prompt.text, choice.answer, score.reward))
        if reaction.correction:
            prefs.append(PreferenceRow(ask.prompt.text, reaction.correction, choice.answer))
    return sft, prefs


def test_features_are_stable_and_normalized() -> None:
    a = featurize("what is the weather in oslo today")
    b = featurize("what is the weather in oslo today")
    assert np.array_equal(a, b)
    assert a[-1] == 1.0
    assert math.isclose(float(np.linalg.norm(a[:-1])), 1.0)
    assert not np.array_equal(a, featurize("translate hello into french"))


def test_initial_policy_knows_intents_but_not_preferences() -> None:
    world = World()
    policy = world.initial_policy()
    for prompt in world.all_prompts()[::17]:
        p = policy.probabilities(prompt.text)
        mass = {a: float(p[k]) for k, a in enumerate(policy.answers)}
        in_intent = [mass[a] for a in world.intents[prompt.intent].answers]
        assert sum(in_intent) > 0.85
        # indifferent among the intent's answers: none is singled out
        assert max(in_intent) < 2.5 * min(in_intent)
    assert world.expected_satisfaction(policy) < 0.45


def test_token_logprobs_sum_to_the_answer_logprob() -> None:
    world = World()
    policy = world.initial_policy()
    rng = random.Random(3)
    for prompt in world.all_prompts()[:40]:
        c = policy.act(prompt.text, rng)
        assert all(lp <= 0 for lp in c.token_logprobs)
        assert len(c.token_logprobs) == len(c.answer.split())
        assert math.isclose(sum(c.token_logprobs), c.logprob, abs_tol=1e-4)


def test_satisfaction_rises_over_rounds_of_feedback() -> None:
    world = World()
    users = UserPopulation(world, seed=5)
    rng = random.Random(5)
    policy = world.initial_policy()
    history = [world.expected_satisfaction(policy)]
    for r in range(3):
        sft, prefs = collect(world, policy, users, 250, rng)
        nxt = policy.copy(f"v{r + 2}")
        report = nxt.fit(sft, prefs)
        assert report.loss_after < report.loss_before
        assert report.sft_logprob_after > report.sft_logprob_before
        policy = nxt
        history.append(world.expected_satisfaction(policy))
    assert history[1] > history[0] + 0.15
    assert history[-1] >= 0.8
    assert history[-1] >= history[0] + 0.3


def test_preference_pairs_alone_move_the_policy() -> None:
    world = World()
    policy = world.initial_policy()
    prompts = [p for p in world.all_prompts() if p.intent == 0]
    bad = world.intents[0].answers[3]
    pairs = [PreferenceRow(p.text, world.best_answer(0), bad) for p in prompts]
    before = [policy.probabilities(p.text) for p in prompts]
    nxt = policy.copy("v2")
    report = nxt.fit([], pairs)
    assert report.preference_accuracy_after == 1.0
    ib, iw = nxt.answers.index(world.best_answer(0)), nxt.answers.index(bad)
    for p, b in zip(prompts, before, strict=True):
        after = nxt.probabilities(p.text)
        assert after[ib] > b[ib] and after[iw] < b[iw]


def test_unlearning_makes_a_worse_model() -> None:
    world = World()
    users = UserPopulation(world, seed=9)
    rng = random.Random(9)
    policy = world.initial_policy()
    for _ in range(2):
        sft, prefs = collect(world, policy, users, 250, rng)
        nxt = policy.copy("good")
        nxt.fit(sft, prefs)
        policy = nxt
    sft, prefs = collect(world, policy, users, 250, rng)
    sabotaged = policy.copy("bad")
    sabotaged.fit(sft, prefs, unlearn=True)
    assert world.expected_satisfaction(sabotaged) < world.expected_satisfaction(policy) - 0.25


def test_new_completions_extend_the_answer_table() -> None:
    world = World()
    policy = world.initial_policy().copy("v2")
    n = len(policy.answers)
    novel = "a brand new answer nobody wrote before"
    report = policy.fit([SftRow("what is the weather in oslo today", novel, 1.0)], [])
    assert report.new_answers == 1
    assert policy.answers[n] == novel
    assert policy.weights.shape == (n + 1, policy.dim + 1)


def test_artifact_round_trip_and_no_overwrite(tmp_path: Path) -> None:
    world = World()
    policy = world.initial_policy("v1")
    folder = policy.save(tmp_path / "v1")
    loaded = Policy.load(folder.as_uri())
    assert loaded.version == "v1"
    assert loaded.answers == policy.answers
    assert np.array_equal(loaded.weights, policy.weights)
    assert artifact_path(folder.as_uri()) == folder
    with pytest.raises(FileExistsError):
        policy.save(folder)


def test_tampered_artifact_is_refused(tmp_path: Path) -> None:
    folder = World().initial_policy("v1").save(tmp_path / "v1")
    raw = bytearray((folder / "policy.npz").read_bytes())
    raw[-20] ^= 0xFF
    (folder / "policy.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        Policy.load(folder)


def test_negatives_push_unwanted_answers_down() -> None:
    world = World()
    policy = world.initial_policy()
    prompts = [p for p in world.all_prompts() if p.intent == 1]
    bad = world.intents[1].answers[2]
    nxt = policy.copy("v2")
    nxt.fit([], [], negatives=[SftRow(p.text, bad, 1.0) for p in prompts])
    k = nxt.answers.index(bad)
    for p in prompts:
        assert nxt.probabilities(p.text)[k] < 0.5 * policy.probabilities(p.text)[k]
