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

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import lmdb
from atlas_sidecar_client.pb import events_pb2

from sidecar.config import DEFAULT_SIGNAL_WEIGHTS
from sidecar.store import Store, decode_u64, encode_u64

__all__ = [
    "DEFAULT_SIGNAL_WEIGHTS",
    "Score",
    "WeightTable",
    "current_weight_version",
    "ensure_weight_version",
    "read_weight_versions",
    "score_feedback",
    "table_to_dict",
]

S = events_pb2.Signal
_SIGNAL_NAMES: dict[int, str] = {int(v): k for k, v in S.items()}


@dataclass(frozen=True)
class WeightTable:
    """Weights of each implicit signal, and of explicit vs implicit feedback."""

    signals: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SIGNAL_WEIGHTS))
    explicit_weight: float = 0.5
    implicit_weight: float = 0.5
    #: Reward of a request that got no feedback within the reward window.
    default_reward: float = 0.5

    def weight(self, signal: int) -> float:
        return self.weights_by_number.get(signal, 0.0)

    @functools.cached_property
    def weights_by_number(self) -> Mapping[int, float]:
        """Weight of each known signal by its enum number (scoring's hot path)."""
        return {n: float(self.signals.get(name, 0.0)) for n, name in _SIGNAL_NAMES.items()}

    def fingerprint(self) -> str:
        """A stable hash; a different table gets a different weight version."""
        return self._fingerprint

    @functools.cached_property
    def _fingerprint(self) -> str:
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


_DEFAULT_TABLE = WeightTable()


def _clamp(x: float, lo: float = -1.0, hi: float = 1.0) -> float:
    return lo if x < lo else hi if x > hi else x


def score_feedback(
    signals: Iterable[int], rating: float | None, table: WeightTable | None = None
) -> Score:
    """Scores one request's aggregated feedback.

    ``signals``: every implicit signal received (repeats count once each);
    ``rating``: the latest explicit rating in [0, 1], or None.
    """
    return Score(*score_parts(signals, rating, table or _DEFAULT_TABLE))


def score_parts(
    signals: Iterable[int], rating: float | None, t: WeightTable
) -> tuple[float, bool, float]:
    """``score_feedback`` as a plain (signed, has_feedback, reward) tuple, for
    the processors that score every request and keep only the numbers."""
    # SIGNAL_UNSPECIFIED is 0: not a signal
    sigs = {s for s in signals if s}
    if sigs:
        weights = t.weights_by_number
        implicit: float | None = _clamp(sum(weights.get(s, 0.0) for s in sigs))
    else:
        implicit = None
    explicit = 2.0 * rating - 1.0 if rating is not None else None
    if implicit is None and explicit is None:
        return 0.0, False, t.default_reward
    if implicit is not None and explicit is not None:
        total = t.explicit_weight + t.implicit_weight
        signed = (t.explicit_weight * explicit + t.implicit_weight * implicit) / total
    else:
        signed = explicit if explicit is not None else implicit  # type: ignore[assignment]
    signed = _clamp(signed)
    return signed, True, (signed + 1.0) / 2.0


# -- weight versions -----------------------------------------------------------

_WEIGHTS_CURRENT = b"scoring/weights/current"
_WEIGHTS_VERSION = b"scoring/weights/v/"


def table_to_dict(table: WeightTable) -> dict[str, object]:
    return {
        "signals": dict(sorted(table.signals.items())),
        "explicit_weight": table.explicit_weight,
        "implicit_weight": table.implicit_weight,
        "default_reward": table.default_reward,
        "fingerprint": table.fingerprint(),
    }


def ensure_weight_version(txn: lmdb.Transaction, store: Store, table: WeightTable) -> int:
    """The version number of ``table``, creating the next one when it differs
    from the current table (writer thread only). Versions start at 1 and
    are never reused, so every stored score names the table it came from."""
    meta = store.db("meta")
    raw = txn.get(_WEIGHTS_CURRENT, db=meta)
    current = decode_u64(raw) if raw else 0
    fp = table.fingerprint()
    if current:
        raw_doc = txn.get(_WEIGHTS_VERSION + encode_u64(current), db=meta)
        if raw_doc is not None and json.loads(bytes(raw_doc)).get("fingerprint") == fp:
            return current
    version = current + 1
    doc = {"version": version, **table_to_dict(table)}
    txn.put(_WEIGHTS_VERSION + encode_u64(version), json.dumps(doc).encode(), db=meta)
    txn.put(_WEIGHTS_CURRENT, encode_u64(version), db=meta)
    return version


def read_weight_versions(txn: lmdb.Transaction, store: Store) -> list[dict[str, object]]:
    """Every weight table ever used, oldest first (``version``, weights, fingerprint)."""
    meta = store.db("meta")
    out: list[dict[str, object]] = []
    with txn.cursor(db=meta) as cur:
        if not cur.set_range(_WEIGHTS_VERSION):
            return out
        for key, value in cur:
            if not bytes(key).startswith(_WEIGHTS_VERSION):
                break
            out.append(json.loads(bytes(value)))
    return out


def current_weight_version(txn: lmdb.Transaction, store: Store) -> int:
    raw = txn.get(_WEIGHTS_CURRENT, db=store.db("meta"))
    return decode_u64(raw) if raw else 0
