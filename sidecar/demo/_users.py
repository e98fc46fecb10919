"""Simulated users with hidden preferences.

A user asks a question of some intent, reads the answer, and is satisfied
with the chance the world gives that answer (``World.quality``): only the
users know which answers are good. What they do shows it, noisily:

- satisfied: copy, share or engage (with a long dwell), or nothing at all;
- not satisfied: retry (ask again), dismiss, edit the answer into the one
  they wanted, or nothing at all;
- now and then an explicit rating (a 0 is a rating);
- some reactions are replaced by a random signal (noise), and a few users
  ("contrarians") rate the opposite of what they think.

Seeded: the same seed gives the same users and the same reactions to the same
answers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from atlas_sidecar_client import Signal

from sidecar.demo._world import Prompt, World

__all__ = ["Ask", "Reaction", "UserPopulation"]

_ALL_SIGNALS = (
    Signal.COPY,
    Signal.SHARE,
    Signal.RETRY,
    Signal.DISMISS,
    Signal.ENGAGE,
)


@dataclass(frozen=True)
class Ask:
    """One question from one user."""

    user_id: str
    session_id: str
    prompt: Prompt


@dataclass(frozen=True)
class Reaction:
    """What a user did with an answer. ``satisfied`` is hidden from the system."""

    satisfied: bool
    signal: int | None = None
    rating: float | None = None
    dwell_ms: int = 0
    correction: str = ""

    @property
    def retry(self) -> bool:
        return self.signal == Signal.RETRY


class UserPopulation:
    """A fixed set of users asking questions and reacting to answers.

    Rates are fractions of answers: ``rating_rate`` get an explicit rating,
    ``edit_rate`` of the unsatisfying ones get an edit, ``noise`` get a
    random signal instead of the honest one.
    """

    def __init__(
        self,
        world: World,
        *,
        seed: int = 11,
        users: int = 300,
        rating_rate: float = 0.15,
        edit_rate: float = 0.15,
        noise: float = 0.05,
        contrarian_fraction: float = 0.02,
        sessions_per_user: int = 3,
    ) -> None:
        self.world = world
        self.rng = random.Random(seed)
        self.user_ids = [f"user-{i:04d}" for i in range(users)]
        n_contrarians = round(users * contrarian_fraction)
        self.contrarians = frozenset(self.user_ids[:n_contrarians])
        self.rating_rate = rating_rate
        self.edit_rate = edit_rate
        self.noise = noise
        self.sessions_per_user = sessions_per_user

    def ask(self) -> Ask:
        user = self.rng.choice(self.user_ids)
        session = f"{user}-s{self.rng.randrange(self.sessions_per_user)}"
        return Ask(user, session, self.world.sample_prompt(self.rng))

    def react(self, ask: Ask, answer: str) -> Reaction:
        rng = self.rng
        intent = ask.prompt.intent
        satisfied = rng.random() < self.world.quality(intent, answer)
        r = rng.random()
        signal: int | None
        dwell = 0
        correction = ""
        if satisfied:
            if r < 0.45:
                signal = Signal.COPY
            elif r < 0.55:
                signal = Signal.SHARE
            elif r < 0.8:
                signal = Signal.ENGAGE
                dwell = rng.randrange(15_000, 90_000)
            else:
                signal = None
        elif r < 0.4:
            signal = Signal.RETRY
        elif r < 0.4 + self.edit_rate:
            signal = Signal.EDIT
            correction = self.world.best_answer(intent)
        elif r < 0.9:
            signal = Signal.DISMISS
        else:
            signal = None
        if signal is not None and signal != Signal.EDIT and rng.random() < self.noise:
            signal = rng.choice(_ALL_SIGNALS)
        rating = None
        if rng.random() < self.rating_rate:
            liked = satisfied != (ask.user_id in self.contrarians)
            rating = round(rng.uniform(0.7, 1.0) if liked else rng.uniform(0.0, 0.3), 2)
        return Reaction(satisfied, signal, rating, dwell, correction)
