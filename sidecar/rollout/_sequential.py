"""Anytime-valid sequential tests: e-processes that may be checked after every batch.

Each test keeps a nonnegative process that is a supermartingale (expected
value at most 1) while its null hypothesis holds. By Ville's inequality the
chance that it *ever* reaches ``1 / alpha`` under the null is at most
``alpha``, however often it is looked at and whenever the rollout stops. That
is what keeps the canary from flapping on noisy metrics: peeking is free.

- :class:`RateRatioTest` compares how often something happens (an error, a
  latency above the stable model's p99) to the candidate and to the stable
  model, conditioning on the events: under "the candidate is no worse", an
  event falls on the candidate with probability at most its share of
  requests. It is the beta-binomial e-value of the field notes written as a
  mixture over the rate ratio, so the canary's share may change between
  stages.
- :class:`MeanDifferenceTest` compares bounded scores (feedback rewards in
  [0, 1]) by betting on paired differences (testing by betting; a mixture
  over a grid of fixed bets keeps it a supermartingale without tuning).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["MeanDifferenceTest", "RateRatioTest"]

#: Rate ratios (relative to the null's) mixed over by RateRatioTest, equal weights.
DEFAULT_RATIOS: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
#: Fixed bet sizes mixed over by MeanDifferenceTest, equal weights.
DEFAULT_BETS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.35, 0.5)


def _logmeanexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.mean(np.exp(x - m))))


class RateRatioTest:
    """Is the candidate's event rate more than ``null_ratio`` times the stable one's?

    ``update(x_c, x_s, share)``: ``x_c`` events on the candidate and ``x_s``
    on the stable model among requests of which the candidate served the
    fraction ``share``. ``harm_e`` grows when the candidate's rate exceeds
    ``null_ratio`` times the stable rate; under ``ratio <= null_ratio`` it
    stays a supermartingale (likelihood ratios of the binomial are monotone).

    ``safe_e`` is the mirror test: it grows when the ratio is below
    ``safe_ratio``; under ``ratio >= safe_ratio`` it is a supermartingale.
    """

    def __init__(
        self,
        null_ratio: float = 1.0,
        safe_ratio: float = 2.0,
        ratios: Sequence[float] = DEFAULT_RATIOS,
    ) -> None:
        if null_ratio <= 0 or safe_ratio <= 0:
            raise ValueError("ratios must be positive")
        self.null_ratio = null_ratio
        self.safe_ratio = safe_ratio
        self._alts = np.asarray([null_ratio * r for r in ratios], dtype=float)
        # alternatives for the safety test: below safe_ratio
        self._safe_alts = np.asarray([safe_ratio / r for r in ratios], dtype=float)
        self._log_harm = np.zeros(len(self._alts))
        self._log_safe = np.zeros(len(self._safe_alts))
        self.events_candidate = 0
        self.events_stable = 0

    @staticmethod
    def _q(ratio: np.ndarray | float, share: float) -> Any:
        return ratio * share / (ratio * share + 1.0 - share)

    def update(self, x_c: int, x_s: int, share: float) -> None:
        if x_c + x_s == 0 or not 0.0 < share < 1.0:
            return
        self.events_candidate += x_c
        self.events_stable += x_s
        for alts, log, null in (
            (self._alts, self._log_harm, self.null_ratio),
            (self._safe_alts, self._log_safe, self.safe_ratio),
        ):
            q0 = self._q(null, share)
            q = self._q(alts, share)
            log += x_c * np.log(q / q0) + x_s * np.log((1.0 - q) / (1.0 - q0))

    @property
    def harm_e(self) -> float:
        return math.exp(min(700.0, _logmeanexp(self._log_harm)))

    @property
    def safe_e(self) -> float:
        return math.exp(min(700.0, _logmeanexp(self._log_safe)))

    def state(self) -> dict[str, Any]:
        return {
            "log_harm": self._log_harm.tolist(),
            "log_safe": self._log_safe.tolist(),
            "events_candidate": self.events_candidate,
            "events_stable": self.events_stable,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self._log_harm = np.asarray(state["log_harm"], dtype=float)
        self._log_safe = np.asarray(state["log_safe"], dtype=float)
        self.events_candidate = int(state["events_candidate"])
        self.events_stable = int(state["events_stable"])


class MeanDifferenceTest:
    """Is the candidate's mean score lower than the stable one's by more than ``margin``?

    Scores are in [0, 1]. ``update(candidate, stable)`` queues scores; each
    candidate score is paired, in arrival order, with the mean of a block of
    later-unused stable scores (the pairing depends on counts only, never on
    values), giving differences ``d`` in [-1, 1]. ``harm_e`` is the mixture
    over bets ``lam`` of ``prod(1 - lam * (d + margin))``: a supermartingale
    while ``E[d] >= -margin``. ``safe_e`` is ``prod(1 + lam * (d + safe_margin))``:
    a supermartingale while ``E[d] <= -safe_margin`` (the candidate is worse
    by at least ``safe_margin``); when it is large, the candidate is shown to
    be no worse than that.
    """

    def __init__(
        self,
        margin: float = 0.02,
        safe_margin: float = 0.05,
        bets: Sequence[float] = DEFAULT_BETS,
        block: int = 8,
        max_queue: int = 20_000,
    ) -> None:
        if not 0 <= margin < 1 or not 0 < safe_margin < 1:
            raise ValueError("margins must be in [0, 1)")
        self.margin = margin
        self.safe_margin = safe_margin
        lam = np.asarray(bets, dtype=float)
        self._harm_bets = np.minimum(lam, 0.99 / (1.0 + margin))
        self._safe_bets = np.minimum(lam, 0.99 / (1.0 - safe_margin))
        self._log_harm = np.zeros(len(lam))
        self._log_safe = np.zeros(len(lam))
        self._block = max(1, block)
        self._max_queue = max_queue
        self._cand: list[float] = []
        self._stab: list[float] = []
        self.pairs = 0
        self.sum_candidate = 0.0
        self.n_candidate = 0
        self.sum_stable = 0.0
        self.n_stable = 0

    def update(
        self, candidate: Sequence[float] | np.ndarray, stable: Sequence[float] | np.ndarray
    ) -> None:
        c = np.asarray(candidate, dtype=float)
        s = np.asarray(stable, dtype=float)
        self.sum_candidate += float(c.sum())
        self.n_candidate += len(c)
        self.sum_stable += float(s.sum())
        self.n_stable += len(s)
        self._cand.extend(c.tolist())
        self._stab.extend(s.tolist())
        m, n = len(self._cand), len(self._stab)
        if m == 0 or n == 0:
            self._trim()
            return
        k = max(1, min(self._block, n // m))
        used = min(m, n // k)
        if used:
            cs = np.asarray(self._cand[:used])
            ss = np.asarray(self._stab[: used * k]).reshape(used, k).mean(axis=1)
            d = cs - ss
            self._log_harm += np.log1p(-np.outer(self._harm_bets, d + self.margin)).sum(axis=1)
            self._log_safe += np.log1p(np.outer(self._safe_bets, d + self.safe_margin)).sum(axis=1)
            self.pairs += used
            del self._cand[:used]
            del self._stab[: used * k]
        self._trim()

    def _trim(self) -> None:
        # Old unpaired scores are dropped by count, never by value.
        if len(self._stab) > self._max_queue:
            del self._stab[: len(self._stab) - self._max_queue]
        if len(self._cand) > self._max_queue:
            del self._cand[: len(self._cand) - self._max_queue]

    @property
    def harm_e(self) -> float:
        return math.exp(min(700.0, _logmeanexp(self._log_harm)))

    @property
    def safe_e(self) -> float:
        return math.exp(min(700.0, _logmeanexp(self._log_safe)))

    def means(self) -> tuple[float | None, float | None]:
        c = self.sum_candidate / self.n_candidate if self.n_candidate else None
        s = self.sum_stable / self.n_stable if self.n_stable else None
        return c, s

    def state(self) -> dict[str, Any]:
        return {
            "log_harm": self._log_harm.tolist(),
            "log_safe": self._log_safe.tolist(),
            "cand": np.round(np.asarray(self._cand[-2000:], dtype=float), 4).tolist(),
            "stab": np.round(np.asarray(self._stab[-2000:], dtype=float), 4).tolist(),
            "pairs": self.pairs,
            "sums": [self.sum_candidate, self.n_candidate, self.sum_stable, self.n_stable],
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self._log_harm = np.asarray(state["log_harm"], dtype=float)
        self._log_safe = np.asarray(state["log_safe"], dtype=float)
        self._cand = list(state["cand"])
        self._stab = list(state["stab"])
        self.pairs = int(state["pairs"])
        sc, nc, ss, ns = state["sums"]
        self.sum_candidate, self.n_candidate = float(sc), int(nc)
        self.sum_stable, self.n_stable = float(ss), int(ns)
