"""What scoring leaves in the store, and the readers other stages use.

- ``samples``: u64 sample number (close order) -> :class:`Sample` as JSON.
  Every scored PRIMARY answer is a sample; ``qualifies`` says whether it is
  good enough for SFT.
- ``pairs``: u64 pair number (creation order) -> :class:`Pair` as JSON.
- ``meta`` ``scoring/counters``: running totals (:class:`ScoringCounters`).
- ``meta`` ``scoring/perf/<version>``: per-version traffic and feedback of
  PRIMARY requests (:class:`VersionFeedback`).
- ``meta`` ``scoring/src/<source>``: per feedback source (``user:<id>`` or
  ``session:<id>``) the number and sum of its signed scores, for quarantine.

Sample and pair numbers follow the order in which reward windows close,
which is a function of the log alone (windows close in order of their end,
measured in log time), so replaying the same log yields the same numbering.
"""

from __future__ import annotations

import statistics
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lmdb
import orjson

from sidecar.store import Store, decode_u64, encode_u64

__all__ = [
    "Pair",
    "Sample",
    "ScoringCounters",
    "SourceStats",
    "VersionFeedback",
    "iter_pairs",
    "iter_samples",
    "quarantined_sources",
    "read_all_version_feedback",
    "read_counters",
    "read_source_stats",
    "read_version_feedback",
]

COUNTERS_KEY = b"scoring/counters"
PERF_PREFIX = b"scoring/perf/"
SOURCE_PREFIX = b"scoring/src/"

_COUNTERS = struct.Struct(">9Q")
#: requests, errors, error_ema, feedback_n, reward_sum, reward_ema,
#: baseline_n, baseline_sum, signed_sum
_PERF = struct.Struct(">QQdQddQdd")
_SOURCE = struct.Struct(">Qd")


@dataclass(frozen=True, slots=True)
class Sample:
    """One scored PRIMARY answer. ``source`` and ``quarantined`` are set when
    the sample is handed to a learning batch (stored values are defaults)."""

    no: int
    seq: int
    request_id: str
    prompt: str
    completion: str
    reward: float
    signed: float
    has_feedback: bool
    qualifies: bool
    model_version: str
    task_id: str = ""
    user_id: str = ""
    session_id: str = ""
    #: Feedback sources (``user:<id>``, ``session:<id>``) for quarantine.
    sources: tuple[str, ...] = ()
    signals: tuple[str, ...] = ()
    rating: float | None = None
    #: From the answer's token logprobs, when the server reported them.
    logprob_mean: float | None = None
    logprob_min: float | None = None
    n_tokens: int = 0
    #: End of the reward window (log time, ms); exports filter on it.
    closed_ms: int = 0
    ingest_ms: int = 0
    weight_version: int = 0
    source: str = "new"
    quarantined: bool = False
    #: The Inference's attributes that selective learning reads (task,
    #: user expertise, priority, expected score; see
    #: ``FeedbackProcessor(sample_attributes=...)``), as sorted pairs.
    attributes: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> bytes:
        # orjson serializes dataclasses natively; source and quarantined are
        # stored too (as their defaults) and overwritten when batched.
        return orjson.dumps(self)

    @classmethod
    def from_json(cls, raw: bytes | memoryview) -> Sample:
        doc = orjson.loads(raw)
        doc["sources"] = tuple(doc.get("sources", ()))
        doc["signals"] = tuple(doc.get("signals", ()))
        doc["attributes"] = tuple((str(k), str(v)) for k, v in doc.get("attributes", ()))
        return cls(**doc)

    def attribute(self, name: str) -> str:
        """One of the kept Inference attributes, ``""`` when absent."""
        for key, value in self.attributes:
            if key == name:
                return value
        return ""


@dataclass(frozen=True, slots=True)
class Pair:
    """A preference between two answers to one prompt.

    ``kind``: ``retry`` (the user regenerated), ``edit`` (the user corrected
    the answer; chosen is the correction) or ``score`` (two answers whose
    rewards differ by at least the pair margin). ``reward`` is the reward of
    the chosen completion (1.0 for a user's own correction); ``margin`` is
    the chosen reward minus the rejected one.
    """

    no: int
    kind: str
    prompt: str
    chosen: str
    rejected: str
    margin: float
    reward: float
    #: Log sequence numbers and request ids of (chosen, rejected); the chosen
    #: side of an edit pair is the corrected request itself.
    seqs: tuple[int, int] = (0, 0)
    request_ids: tuple[str, str] = ("", "")
    sources: tuple[str, ...] = ()
    task_id: str = ""
    closed_ms: int = 0
    weight_version: int = 0
    source: str = "new"
    quarantined: bool = False

    def to_json(self) -> bytes:
        # orjson serializes dataclasses natively; source and quarantined are
        # stored too (as their defaults) and overwritten when batched.
        return orjson.dumps(self)

    @classmethod
    def from_json(cls, raw: bytes | memoryview) -> Pair:
        doc = orjson.loads(raw)
        doc["seqs"] = tuple(doc["seqs"])
        doc["request_ids"] = tuple(doc["request_ids"])
        doc["sources"] = tuple(doc.get("sources", ()))
        return cls(**doc)


@dataclass(slots=True)
class ScoringCounters:
    samples: int = 0
    sft: int = 0
    pairs: int = 0
    feedback_samples: int = 0
    closed_other: int = 0
    late_feedback: int = 0
    orphans_dropped: int = 0
    non_primary: int = 0
    duplicate_requests: int = 0

    def pack(self) -> bytes:
        return _COUNTERS.pack(
            self.samples,
            self.sft,
            self.pairs,
            self.feedback_samples,
            self.closed_other,
            self.late_feedback,
            self.orphans_dropped,
            self.non_primary,
            self.duplicate_requests,
        )

    @classmethod
    def unpack(cls, raw: bytes | memoryview | None) -> ScoringCounters:
        return cls(*_COUNTERS.unpack(raw)) if raw else cls()


@dataclass(slots=True)
class VersionFeedback:
    """PRIMARY traffic of one model version, as scored.

    ``error_recent`` and ``reward_recent`` are exponential moving averages
    over about ``recent_samples`` requests / rewarded answers;
    ``baseline_reward`` is the mean reward of the version's first
    ``baseline_samples`` rewarded answers (None until there are that many).
    """

    requests: int = 0
    errors: int = 0
    error_recent: float = 0.0
    feedback_n: int = 0
    reward_sum: float = 0.0
    reward_recent: float = 0.0
    baseline_n: int = 0
    baseline_sum: float = 0.0
    signed_sum: float = 0.0
    baseline_target: int = field(default=0, compare=False)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def mean_reward(self) -> float | None:
        return self.reward_sum / self.feedback_n if self.feedback_n else None

    @property
    def mean_signed(self) -> float | None:
        return self.signed_sum / self.feedback_n if self.feedback_n else None

    @property
    def baseline_reward(self) -> float | None:
        if self.baseline_n and self.baseline_n >= self.baseline_target:
            return self.baseline_sum / self.baseline_n
        return None

    def pack(self) -> bytes:
        return _PERF.pack(
            self.requests,
            self.errors,
            self.error_recent,
            self.feedback_n,
            self.reward_sum,
            self.reward_recent,
            self.baseline_n,
            self.baseline_sum,
            self.signed_sum,
        )

    @classmethod
    def unpack(cls, raw: bytes | memoryview | None, baseline_target: int = 0) -> VersionFeedback:
        if not raw:
            return cls(baseline_target=baseline_target)
        (
            requests,
            errors,
            error_recent,
            feedback_n,
            reward_sum,
            reward_recent,
            baseline_n,
            baseline_sum,
            signed_sum,
        ) = _PERF.unpack(raw)
        return cls(
            requests,
            errors,
            error_recent,
            feedback_n,
            reward_sum,
            reward_recent,
            baseline_n,
            baseline_sum,
            signed_sum,
            baseline_target,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6),
            "error_recent": round(self.error_recent, 6),
            "feedback": self.feedback_n,
            "mean_reward": _r(self.mean_reward),
            "recent_reward": round(self.reward_recent, 6) if self.feedback_n else None,
            "baseline_reward": _r(self.baseline_reward),
            "mean_signed": _r(self.mean_signed),
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


@dataclass(frozen=True, slots=True)
class SourceStats:
    source: str
    n: int
    mean: float


def read_counters(txn: lmdb.Transaction, store: Store) -> ScoringCounters:
    return ScoringCounters.unpack(txn.get(COUNTERS_KEY, db=store.db("meta")))


def read_version_feedback(
    txn: lmdb.Transaction, store: Store, version: str, *, baseline_samples: int = 100
) -> VersionFeedback:
    """Feedback score of one version's PRIMARY traffic (zeros when unseen).

    ``baseline_samples`` must match the scoring processor's setting for
    ``baseline_reward`` to be reported.
    """
    raw = txn.get(PERF_PREFIX + version.encode(), db=store.db("meta"))
    return VersionFeedback.unpack(raw, baseline_samples)


def read_all_version_feedback(
    txn: lmdb.Transaction, store: Store, *, baseline_samples: int = 100
) -> dict[str, VersionFeedback]:
    out: dict[str, VersionFeedback] = {}
    with txn.cursor(db=store.db("meta")) as cur:
        if cur.set_range(PERF_PREFIX):
            for key, value in cur:
                k = bytes(key)
                if not k.startswith(PERF_PREFIX):
                    break
                out[k[len(PERF_PREFIX) :].decode()] = VersionFeedback.unpack(
                    bytes(value), baseline_samples
                )
    return out


def read_source_stats(txn: lmdb.Transaction, store: Store) -> list[SourceStats]:
    out: list[SourceStats] = []
    with txn.cursor(db=store.db("meta")) as cur:
        if cur.set_range(SOURCE_PREFIX):
            for key, value in cur:
                k = bytes(key)
                if not k.startswith(SOURCE_PREFIX):
                    break
                n, total = _SOURCE.unpack(bytes(value))
                out.append(SourceStats(k[len(SOURCE_PREFIX) :].decode(), n, total / n if n else 0))
    return out


def quarantined_sources(
    txn: lmdb.Transaction,
    store: Store,
    *,
    min_history: int,
    min_sources: int,
    z_threshold: float,
) -> dict[str, float]:
    """Sources whose mean signed score is an outlier, with their robust z.

    The robust z-score is ``0.6745 * (x - median) / MAD`` over the sources
    with at least ``min_history`` scored answers; when the MAD is zero (most
    sources agree exactly) the mean absolute deviation scaled by 1.2533
    stands in, as Iglewicz and Hoaglin recommend. Nothing is judged with
    fewer than ``min_sources`` such sources.
    """
    stats = [s for s in read_source_stats(txn, store) if s.n >= min_history]
    if len(stats) < min_sources:
        return {}
    means = [s.mean for s in stats]
    med = statistics.median(means)
    dev = [abs(m - med) for m in means]
    mad = statistics.median(dev)
    if mad > 0:
        scale = mad / 0.6745
    else:
        mean_ad = sum(dev) / len(dev)
        if mean_ad == 0:
            return {}
        scale = 1.253314 * mean_ad
    out: dict[str, float] = {}
    for s in stats:
        z = (s.mean - med) / scale
        if abs(z) > z_threshold:
            out[s.source] = round(z, 3)
    return out


def iter_samples(
    txn: lmdb.Transaction, store: Store, *, after_no: int = 0, upto_no: int | None = None
) -> Iterator[Sample]:
    """Samples with ``after_no < no <= upto_no``, in close order."""
    with txn.cursor(db=store.db("samples")) as cur:
        if not cur.set_range(encode_u64(after_no + 1)):
            return
        for key, value in cur:
            if upto_no is not None and decode_u64(key) > upto_no:
                break
            yield Sample.from_json(value)


def iter_pairs(
    txn: lmdb.Transaction, store: Store, *, after_no: int = 0, upto_no: int | None = None
) -> Iterator[Pair]:
    """Pairs with ``after_no < no <= upto_no``, in creation order."""
    with txn.cursor(db=store.db("pairs")) as cur:
        if not cur.set_range(encode_u64(after_no + 1)):
            return
        for key, value in cur:
            if upto_no is not None and decode_u64(key) > upto_no:
                break
            yield Pair.from_json(value)
