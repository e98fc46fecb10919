"""LearningScheduler: decides when the model should learn.

Triggers (the seed's four, plus a manual one):

- ``sample_count``: new qualifying samples (SFT samples and preference
  pairs) since the last update reach ``sample_count``;
- ``time_interval``: ``time_interval_seconds`` since the last update, with at
  least ``time_min_samples`` new qualifying samples;
- ``performance_drop``: the stable version's recent mean reward is
  ``performance_drop`` below its baseline;
- ``error_threshold``: the stable version's recent error rate reached
  ``error_threshold``;
- ``manual``: ``TriggerLearning``.

Samples that an earlier batch left out because it was full (selective
learning keeps them pending, ``selective.max_batch_samples``) count as
pending too: ``carried(txn)`` gives their number, and the count and time
triggers, the status and a manual trigger see them beside the new ones.

Automatic triggers need at least one pending qualifying sample. A trigger is
suppressed while a rollout is active, while a training run is in flight, and
by the rate limit (``min_interval_seconds`` and ``max_updates_per_day``), and
after a failed run by a backoff (``failure_backoff_seconds``, doubled per
consecutive failure, up to a day). Every firing and every
suppression is recorded in the learning history (a suppression once per
distinct cause, not once per evaluation), and the state (last update,
markers, failures) is persisted in ``meta`` key ``learning/state`` in the
same transaction, so a restart neither forgets nor repeats a decision.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lmdb

from sidecar import instruments as ins
from sidecar.config import LearningConfig
from sidecar.scoring import read_counters, read_version_feedback
from sidecar.store import Store, append_history

__all__ = ["Decision", "LearningScheduler", "SchedulerState"]

STATE_KEY = b"learning/state"
_DAY_MS = 86_400_000


@dataclass(slots=True)
class SchedulerState:
    created_ms: int = 0
    last_update_ms: int = 0
    last_update_id: str = ""
    #: Counter values (qualifying samples, pairs) at the last firing.
    sft_marker: int = 0
    pairs_marker: int = 0
    #: Highest sample and pair numbers handed to an update.
    sample_no: int = 0
    pair_no: int = 0
    next_update: int = 1
    updates_ms: list[int] = field(default_factory=list)
    in_flight: str = ""
    failures: int = 0
    last_outcome: str = ""
    last_suppressed: str = ""

    @classmethod
    def load(cls, raw: bytes | memoryview | None) -> SchedulerState:
        return cls(**json.loads(bytes(raw))) if raw else cls()

    def dump(self) -> bytes:
        return json.dumps(
            {name: getattr(self, name) for name in self.__slots__}, sort_keys=True
        ).encode()


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one evaluation that found a reason to learn."""

    fired: bool
    trigger: str
    reason: str
    update_id: str = ""
    base_version: str = ""
    pending: int = 0
    #: Sample and pair numbers of the new data for this update: (after, upto].
    sample_range: tuple[int, int] = (0, 0)
    pair_range: tuple[int, int] = (0, 0)
    #: W3C traceparent of the trigger's span: the update continues its trace.
    traceparent: str = ""


class LearningScheduler:
    """Evaluates the triggers inside a writer transaction (:meth:`evaluate`).

    ``rollout_active`` is asked on each evaluation; the rollout engine
    replaces it (``scheduler.rollout_active = engine.is_active``).
    ``stable_version(txn)`` names the stable model (the registry provides it).
    ``carried(txn)`` counts the samples left pending by earlier batches
    (selective learning provides it; none by default).
    """

    def __init__(
        self,
        store: Store,
        config: LearningConfig,
        *,
        stable_version: Callable[[lmdb.Transaction], str | None] = lambda txn: None,
        rollout_active: Callable[[], bool] = lambda: False,
        carried: Callable[[lmdb.Transaction], int] = lambda txn: 0,
    ) -> None:
        self._store = store
        self.config = config
        self._stable = stable_version
        self.rollout_active = rollout_active
        self.carried = carried
        self.fired = 0
        self.suppressed = 0

    # -- state -------------------------------------------------------------------

    def state(self, txn: lmdb.Transaction) -> SchedulerState:
        return SchedulerState.load(txn.get(STATE_KEY, db=self._store.db("meta")))

    def _save(self, txn: lmdb.Transaction, st: SchedulerState) -> None:
        txn.put(STATE_KEY, st.dump(), db=self._store.db("meta"))

    def mark_all_seen(self, txn: lmdb.Transaction) -> None:
        """Counts every stored sample and pair as already offered to an update.

        After ``reprocess`` rebuilt the views, nothing rescored is new: the
        sample-count trigger waits for samples that arrive from now on.
        """
        st = self.state(txn)
        c = read_counters(txn, self._store)
        st.sft_marker, st.pairs_marker = c.sft, c.pairs
        st.sample_no, st.pair_no = c.samples, c.pairs
        self._save(txn, st)

    def pending(self, txn: lmdb.Transaction, st: SchedulerState | None = None) -> int:
        st = st or self.state(txn)
        c = read_counters(txn, self._store)
        return self._pending(txn, st, c.sft, c.pairs)

    def _pending(self, txn: lmdb.Transaction, st: SchedulerState, sft: int, pairs: int) -> int:
        """New qualifying samples and pairs since the last update, plus the
        samples earlier batches left pending."""
        new = max(0, sft - st.sft_marker) + max(0, pairs - st.pairs_marker)
        return new + self.carried(txn)

    # -- evaluation ----------------------------------------------------------------

    def evaluate(
        self, txn: lmdb.Transaction, now_ms: int, *, manual_reason: str | None = None
    ) -> Decision | None:
        """Decides, records and persists; writer thread only.

        Returns None when no trigger condition holds (nothing is recorded),
        otherwise the decision, fired or suppressed.
        """
        st = self.state(txn)
        if not st.created_ms:
            st.created_ms = now_ms
            self._save(txn, st)
        counters = read_counters(txn, self._store)
        pending = self._pending(txn, st, counters.sft, counters.pairs)
        stable = self._stable(txn) or ""
        trigger, reason = self._condition(txn, st, now_ms, pending, stable, manual_reason)
        if not trigger:
            if st.last_suppressed:
                st.last_suppressed = ""
                self._save(txn, st)
            return None
        why_not = self._suppression(st, now_ms, pending, manual=manual_reason is not None)
        if why_not is not None:
            code, text = why_not
            self.suppressed += 1
            key = f"{trigger}/{code}"
            if manual_reason is not None or st.last_suppressed != key:
                st.last_suppressed = key
                self._save(txn, st)
                append_history(
                    txn,
                    self._store,
                    "trigger_suppressed",
                    time_ms=now_ms,
                    trigger=trigger,
                    reason=text,
                    suppressed_by=code,
                    condition=reason,
                    pending=pending,
                )
            return Decision(False, trigger, f"suppressed ({text}): {reason}", pending=pending)
        update_id = f"upd-{st.next_update:06d}"
        sample_range = (st.sample_no, counters.samples)
        pair_range = (st.pair_no, counters.pairs)
        st.next_update += 1
        st.last_update_ms = now_ms
        st.last_update_id = update_id
        st.sft_marker = counters.sft
        st.pairs_marker = counters.pairs
        st.sample_no = counters.samples
        st.pair_no = counters.pairs
        st.updates_ms = [t for t in st.updates_ms if t > now_ms - _DAY_MS] + [now_ms]
        st.in_flight = update_id
        st.last_suppressed = ""
        self._save(txn, st)
        # The trigger continues the trace of the newest ingest batch (the data
        # that made it fire); training and the rollout continue from here.
        with ins.span(
            "learning.trigger",
            parent=ins.latest_ingest_context(),
            trigger=trigger,
            reason=reason,
            update_id=update_id,
            pending=pending,
        ):
            traceparent = ins.trace_fields()
            append_history(
                txn,
                self._store,
                "trigger",
                time_ms=now_ms,
                trigger=trigger,
                reason=reason,
                update_id=update_id,
                pending=pending,
                base_version=stable,
                **traceparent,
            )
        self.fired += 1
        return Decision(
            True,
            trigger,
            reason,
            update_id=update_id,
            base_version=stable,
            pending=pending,
            sample_range=sample_range,
            traceparent=traceparent.get("traceparent", ""),
            pair_range=pair_range,
        )

    def _condition(
        self,
        txn: lmdb.Transaction,
        st: SchedulerState,
        now_ms: int,
        pending: int,
        stable: str,
        manual_reason: str | None,
    ) -> tuple[str, str]:
        cfg = self.config
        if manual_reason is not None:
            return "manual", manual_reason or "manual trigger"
        if pending < 1:
            return "", ""
        if stable:
            perf = read_version_feedback(
                txn, self._store, stable, baseline_samples=cfg.baseline_samples
            )
            baseline = perf.baseline_reward
            if (
                baseline is not None
                and perf.feedback_n >= cfg.baseline_samples + cfg.recent_samples
                and baseline - perf.reward_recent >= cfg.performance_drop
            ):
                return "performance_drop", (
                    f"stable {stable} recent reward {perf.reward_recent:.3f} is "
                    f"{baseline - perf.reward_recent:.3f} below its baseline {baseline:.3f} "
                    f"(threshold {cfg.performance_drop})"
                )
            if perf.requests >= cfg.min_requests and perf.error_recent >= cfg.error_threshold:
                return "error_threshold", (
                    f"stable {stable} recent error rate {perf.error_recent:.3f} "
                    f">= {cfg.error_threshold} over {perf.requests} requests"
                )
        if pending >= cfg.sample_count:
            return "sample_count", f"{pending} new qualifying samples >= {cfg.sample_count}"
        since = st.last_update_ms or st.created_ms
        if now_ms - since >= cfg.time_interval_seconds * 1000 and pending >= cfg.time_min_samples:
            return "time_interval", (
                f"{(now_ms - since) / 1000:.0f} s since the last update >= "
                f"{cfg.time_interval_seconds:.0f} s with {pending} new qualifying samples"
            )
        return "", ""

    def _suppression(
        self, st: SchedulerState, now_ms: int, pending: int, *, manual: bool
    ) -> tuple[str, str] | None:
        cfg = self.config
        if self.rollout_active():
            return "rollout_active", "a rollout is in progress"
        if st.in_flight:
            return "training_in_progress", f"update {st.in_flight} is still running"
        if manual and pending < 1:
            return (
                "no_new_samples",
                "no new qualifying samples (and none pending) since the last update",
            )
        if st.last_update_ms:
            interval = cfg.min_interval_seconds * 1000
            if st.failures:
                backoff = cfg.failure_backoff_seconds * 1000 * 2 ** min(st.failures - 1, 16)
                interval = max(interval, min(backoff, _DAY_MS))
            wait = st.last_update_ms + interval - now_ms
            if wait > 0:
                code = "failure_backoff" if st.failures else "rate_limit_interval"
                text = f"next update allowed in {wait / 1000:.0f} s"
                if st.failures:
                    text += f" (backing off after {st.failures} failed run(s))"
                return code, text
        recent = [t for t in st.updates_ms if t > now_ms - _DAY_MS]
        if len(recent) >= cfg.max_updates_per_day:
            return "rate_limit_daily", (
                f"{len(recent)} updates in the last 24 h (max_updates_per_day "
                f"{cfg.max_updates_per_day})"
            )
        return None

    # -- outcomes --------------------------------------------------------------------

    def finish(self, txn: lmdb.Transaction, update_id: str, *, ok: bool, outcome: str) -> None:
        """Records the end of an update's training run in the state (writer thread)."""
        st = self.state(txn)
        if st.in_flight == update_id:
            st.in_flight = ""
        st.failures = 0 if ok else st.failures + 1
        st.last_outcome = outcome
        self._save(txn, st)

    def status(self, txn: lmdb.Transaction, now_ms: int) -> dict[str, Any]:
        st = self.state(txn)
        return {
            "pending_samples": self.pending(txn, st),
            "last_update_id": st.last_update_id,
            "last_update_ms": st.last_update_ms,
            "last_outcome": st.last_outcome,
            "in_flight": st.in_flight,
            "consecutive_failures": st.failures,
            "updates_last_24h": len([t for t in st.updates_ms if t > now_ms - _DAY_MS]),
            "rollout_active": bool(self.rollout_active()),
        }
