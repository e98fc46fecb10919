"""Turning raw feedback into a score.

The raw signals are stored as they came; the score is computed from a
versioned weight table. Two rules fix the seed's bugs:

- an explicit rating of 0 is a rating (the worst one), not a missing one;
- a negative signal stays distinguishable from no signal: the score is kept
  signed in [-1, 1] together with a ``has_feedback`` flag, and the [0, 1]
  training reward is derived from both (no feedback gets the configured
  default reward, which sits between the negative and positive ones).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from atlas_sidecar_client.pb import events_pb2

__all__ = ["DEFAULT_SIGNAL_WEIGHTS", "Score", "WeightTable", "score_feedback"]

S = events_pb2.Signal

#: The seed's defaults; thumbs and edits added for the contract's signals.
DEFAULT_SIGNAL_WEIGHTS: Mapping[str, float] = {
    "COPY": 0.8,
    "SHARE": 0.9,
    "RETRY": -0.3,
    "DISMISS": -0.5,
    "ENGAGE": 0.6,
    "THUMBS_UP": 1.0,
    "THUMBS_DOWN": -1.0,
    "EDIT": -0.2,
}


@dataclass(frozen=True)
class WeightTable:
    """Weights of each implicit signal, and of explicit vs implicit feedback."""

    signals: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SIGNAL_WEIGHTS))
    explicit_weight: float = 0.5
    implicit_weight: float = 0.5
    #: Reward of a request that got no feedback within the reward window.
    default_reward: float = 0.5

    def weight(self, signal: int) -> float:
        if signal not in S.values():
            return 0.0
        return float(self.signals.get(S.Name(signal), 0.0))  # type: ignore[arg-type]

    def fingerprint(self) -> str:
        """A stable hash; a different table gets a different weight version."""
        doc = {
            "signals": dict(sorted(self.signals.items())),
            "explicit_weight": self.explicit_weight,
            "implicit_weight": self.implicit_weight,
            "default_reward": self.default_reward,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Score:
    #: Signed score in [-1, 1]; 0 when there is no feedback.
    signed: float
    #: Whether any signal or rating was received.
    has_feedback: bool
    #: Training reward in [0, 1] derived from the two above.
    reward: float


def _clamp(x: float, lo: float = -1.0, hi: float = 1.0) -> float:
    return lo if x < lo else hi if x > hi else x


def score_feedback(
    signals: Iterable[int], rating: float | None, table: WeightTable | None = None
) -> Score:
    """Scores one request's aggregated feedback.

    ``signals``: every implicit signal received (repeats count once each);
    ``rating``: the latest explicit rating in [0, 1], or None.
    """
    t = table or WeightTable()
    sigs = [s for s in signals if s != S.SIGNAL_UNSPECIFIED]
    implicit = _clamp(sum(t.weight(s) for s in set(sigs))) if sigs else None
    explicit = 2.0 * rating - 1.0 if rating is not None else None
    if implicit is None and explicit is None:
        return Score(0.0, False, t.default_reward)
    if implicit is not None and explicit is not None:
        total = t.explicit_weight + t.implicit_weight
        signed = (t.explicit_weight * explicit + t.implicit_weight * implicit) / total
    else:
        signed = explicit if explicit is not None else implicit  # type: ignore[assignment]
    signed = _clamp(signed)
    return Score(signed, True, (signed + 1.0) / 2.0)
