"""The demo's little world: intents, the prompts users ask, the answers a model may give.

Each intent has a handful of candidate answers. The simulated users (not the
model) know which of them they like; the model has to find out from their
feedback. Everything here is deterministic for a given seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.demo._policy import Policy

__all__ = ["INTENTS", "Intent", "Prompt", "World"]


@dataclass(frozen=True)
class Intent:
    """One kind of question, the ways users phrase it, and the answers on offer."""

    name: str
    templates: tuple[str, ...]
    slots: tuple[str, ...]
    answers: tuple[str, ...]


INTENTS: tuple[Intent, ...] = (
    Intent(
        "weather",
        (
            "what is the weather in {s} today",
            "will it rain in {s} tomorrow",
            "weather forecast for {s} please",
            "do i need an umbrella in {s}",
        ),
        ("paris", "oslo", "lima", "tokyo", "cairo", "quito", "perth", "tunis"),
        (
            "the forecast shows light rain this afternoon , take an umbrella",
            "the forecast is available on many websites",
            "weather is the state of the atmosphere at a place and time",
            "i cannot predict the future",
        ),
    ),
    Intent(
        "recipe",
        (
            "how do i cook {s}",
            "give me a quick recipe with {s}",
            "what can i make for dinner with {s}",
            "easy {s} recipe for two",
        ),
        ("rice", "lentils", "salmon", "eggs", "tofu", "pasta", "spinach", "beans"),
        (
            "here is a recipe : rinse , simmer twenty minutes , season and serve",
            "many cookbooks cover this ingredient in detail",
            "cooking is the art of preparing food with heat",
            "please consult a professional chef",
        ),
    ),
    Intent(
        "math",
        (
            "what is {s} times seven",
            "how much is {s} plus twelve",
            "can you divide {s} by three",
            "compute the square of {s}",
        ),
        ("four", "nine", "twelve", "fifteen", "eighty", "thirty", "six", "eleven"),
        (
            "here is the working step by step , then the result",
            "a calculator can answer that quickly",
            "arithmetic is a branch of mathematics",
            "numbers are fascinating",
        ),
    ),
    Intent(
        "translate",
        (
            "translate {s} into french",
            "how do you say {s} in spanish",
            "what does {s} mean in german",
            "say {s} in italian",
        ),
        ("hello", "thank you", "good night", "where is the station", "cheers", "friend"),
        (
            "here is the translation with a short pronunciation hint",
            "a dictionary would have this word",
            "translation maps text between languages",
            "languages are hard",
        ),
    ),
    Intent(
        "code",
        (
            "how do i reverse a list in {s}",
            "write a {s} function that sorts numbers",
            "why does my {s} loop never end",
            "show me a {s} example of reading a file",
        ),
        ("python", "rust", "go", "java", "haskell", "kotlin", "ruby", "swift"),
        (
            "here is a short example with an explanation of each line",
            "the official documentation explains this",
            "programming is writing instructions for computers",
            "have you tried turning it off and on again",
        ),
    ),
    Intent(
        "travel",
        (
            "what should i see in {s}",
            "plan a weekend in {s}",
            "best time of year to visit {s}",
            "cheap places to stay in {s}",
        ),
        ("rome", "kyoto", "lisbon", "montreal", "nairobi", "hanoi", "bergen", "seville"),
        (
            "here is a two day plan with the main sights and where to eat",
            "travel guides list the main attractions",
            "tourism is travel for pleasure",
            "staying home is cheaper",
        ),
    ),
)


@dataclass(frozen=True)
class Prompt:
    text: str
    intent: int


@dataclass
class World:
    """The intents and a fixed way of sampling prompts from them.

    ``preferred[i]`` is the index (within intent ``i``) of the answer users
    like best, ``acceptable[i]`` one they half like; only the users see these.
    """

    intents: tuple[Intent, ...] = INTENTS
    preferred: list[int] = field(default_factory=list)
    acceptable: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Answers are written best first; the initial model is indifferent to
        # the order within an intent, so the order leaks nothing to it.
        if not self.preferred:
            self.preferred = [0 for _ in self.intents]
        if not self.acceptable:
            self.acceptable = [1 for _ in self.intents]

    @property
    def answers(self) -> list[str]:
        """Every candidate answer, intent by intent (the initial model's answer table)."""
        return [a for it in self.intents for a in it.answers]

    def quality(self, intent: int, answer: str) -> float:
        """The chance a user asking ``intent`` is satisfied by ``answer``."""
        it = self.intents[intent]
        if answer not in it.answers:
            return 0.02
        k = it.answers.index(answer)
        if k == self.preferred[intent]:
            return 0.97
        if k == self.acceptable[intent]:
            return 0.45
        return 0.08

    def best_answer(self, intent: int) -> str:
        return self.intents[intent].answers[self.preferred[intent]]

    def sample_prompt(self, rng: random.Random) -> Prompt:
        i = rng.randrange(len(self.intents))
        it = self.intents[i]
        text = rng.choice(it.templates).format(s=rng.choice(it.slots))
        return Prompt(text, i)

    def all_prompts(self) -> list[Prompt]:
        """Every prompt the world can produce (the evaluation set)."""
        return [
            Prompt(t.format(s=s), i)
            for i, it in enumerate(self.intents)
            for t in it.templates
            for s in it.slots
        ]

    def expected_satisfaction(
        self, policy: Policy, prompts: Sequence[Prompt] | None = None
    ) -> float:
        """The chance a user is satisfied by ``policy``'s answer, averaged over prompts.

        Exact (no sampling): the sum over answers of the policy's probability
        times the answer's quality. ``prompts`` defaults to every prompt.
        """
        prompts = self.all_prompts() if prompts is None else prompts
        total = 0.0
        for pr in prompts:
            p = policy.probabilities(pr.text)
            total += sum(
                float(p[k]) * self.quality(pr.intent, a) for k, a in enumerate(policy.answers)
            )
        return total / max(len(prompts), 1)

    def initial_policy(self, version: str = "v1") -> Policy:
        """The starting model: it knows which answers fit an intent, not which users like."""
        from sidecar.demo._policy import Policy

        prompts = self.all_prompts()
        return Policy.pretrained(
            version, [p.text for p in prompts], [self.intents[p.intent].answers for p in prompts]
        )
