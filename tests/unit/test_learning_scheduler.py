"""LearningScheduler on a real LMDB store: triggers, suppression, rate limits, state."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import LearningConfig, StoreConfig
from sidecar.learning import LearningScheduler
from sidecar.scoring import ScoringCounters, VersionFeedback
from sidecar.scoring._views import COUNTERS_KEY, PERF_PREFIX
from sidecar.store import Store, read_history

MIN = 60_000


@pytest.fixture
def store_config(tmp_path: Path) -> StoreConfig:
    return StoreConfig(data_dir=tmp_path / "data", sync=False)


def set_counters(store: Store, sft: int, pairs: int = 0) -> None:
    with store.env.begin(write=True) as txn:
        c = ScoringCounters(samples=sft + 5, sft=sft, pairs=pairs)
        txn.put(COUNTERS_KEY, c.pack(), db=store.db("meta"))


def set_perf(store: Store, version: str, perf: VersionFeedback) -> None:
    with store.env.begin(write=True) as txn:
        txn.put(PERF_PREFIX + version.encode(), perf.pack(), db=store.db("meta"))


def evaluate(sched: LearningScheduler, store: Store, now: int, manual: str | None = None):  # type: ignore[no-untyped-def]
    with store.env.begin(write=True) as txn:
        return sched.evaluate(txn, now, manual_reason=manual)


def history(store: Store) -> list[dict[str, object]]:
    with store.read() as txn:
        return list(read_history(txn, store))


def make(store: Store, **kw: object) -> LearningScheduler:
    cfg = LearningConfig(**{"min_interval_seconds": 300, **kw})  # type: ignore[arg-type]
    return LearningScheduler(store, cfg, stable_version=lambda txn: "v1")


def test_count_trigger_fires_once_and_resets(store: Store) -> None:
    sched = make(store, sample_count=100)
    set_counters(store, 60, pairs=30)
    assert evaluate(sched, store, 1_000) is None
    set_counters(store, 70, pairs=30)
    d = evaluate(sched, store, 2_000)
    assert d is not None and d.fired and d.trigger == "sample_count"
    assert d.update_id == "upd-000001" and d.pending == 100
    assert d.sample_range == (0, 75) and d.pair_range == (0, 30)
    with store.env.begin(write=True) as txn:
        sched.finish(txn, d.update_id, ok=True, outcome="succeeded")
    # the count restarts from the markers: nothing new, no decision
    assert evaluate(sched, store, 10 * 60 * MIN) is None
    kinds = [h["kind"] for h in history(store)]
    assert kinds == ["trigger"]


def test_suppressions_are_recorded_once_per_cause(store: Store) -> None:
    active = [True]
    sched = make(store, sample_count=10)
    sched.rollout_active = lambda: active[0]
    set_counters(store, 20)
    for t in range(5):
        d = evaluate(sched, store, 1_000 + t)
        assert d is not None and not d.fired and "rollout" in d.reason
    active[0] = False
    d = evaluate(sched, store, 2_000)
    assert d is not None and d.fired
    # training in flight, then the rate limit
    set_counters(store, 40)
    d = evaluate(sched, store, 3_000)
    assert d is not None and not d.fired and "still running" in d.reason
    with store.env.begin(write=True) as txn:
        sched.finish(txn, "upd-000001", ok=True, outcome="succeeded")
    d = evaluate(sched, store, 4_000)
    assert d is not None and not d.fired and "allowed in" in d.reason
    d = evaluate(sched, store, 2_000 + 5 * MIN + 1)
    assert d is not None and d.fired
    hist = history(store)
    causes = [h.get("suppressed_by") for h in hist if h["kind"] == "trigger_suppressed"]
    assert causes == ["rollout_active", "training_in_progress", "rate_limit_interval"]
    assert [h["kind"] for h in hist].count("trigger") == 2


def test_failed_runs_back_off_instead_of_storming(store: Store) -> None:
    sched = make(store, sample_count=1, min_interval_seconds=0, failure_backoff_seconds=60)
    now = 1_000
    fired = 0
    for i in range(1, 200):
        set_counters(store, i)
        now += 5_000
        d = evaluate(sched, store, now)
        if d is not None and d.fired:
            fired += 1
            with store.env.begin(write=True) as txn:
                sched.finish(txn, d.update_id, ok=False, outcome="failed: crash")
    # 995 s of evaluations: fires at 0, +60, +120 (cum 180), +240 (420), +480 (900)
    assert fired == 5
    with store.read() as txn:
        assert sched.state(txn).failures == 5


def test_daily_cap(store: Store) -> None:
    sched = make(store, sample_count=1, min_interval_seconds=0, max_updates_per_day=2)
    results = []
    for i in range(1, 5):
        set_counters(store, i)
        d = evaluate(sched, store, i * MIN)
        assert d is not None
        results.append(d.fired)
        if d.fired:
            with store.env.begin(write=True) as txn:
                sched.finish(txn, d.update_id, ok=True, outcome="ok")
    assert results == [True, True, False, False]


def test_time_trigger_needs_min_samples(store: Store) -> None:
    sched = make(store, time_interval_seconds=3600, time_min_samples=10)
    set_counters(store, 5)
    assert evaluate(sched, store, 1) is None  # creates the state clock
    assert evaluate(sched, store, 2 * 3600_000) is None  # too few samples
    set_counters(store, 10)
    d = evaluate(sched, store, 2 * 3600_000 + 1)
    assert d is not None and d.fired and d.trigger == "time_interval"


def test_performance_drop_and_error_triggers(store: Store) -> None:
    sched = make(store, baseline_samples=10, recent_samples=10, performance_drop=0.1)
    set_counters(store, 1)
    set_perf(
        store,
        "v1",
        VersionFeedback(
            requests=100, feedback_n=20, reward_recent=0.65, baseline_n=10, baseline_sum=8.0
        ),
    )
    d = evaluate(sched, store, 1_000)
    assert d is not None and d.fired and d.trigger == "performance_drop"
    assert "0.150 below" in d.reason and d.base_version == "v1"

    sched2 = make(store, min_requests=50, error_threshold=0.05)
    with store.env.begin(write=True) as txn:
        sched2.finish(txn, "upd-000001", ok=True, outcome="ok")
    set_counters(store, 2)
    set_perf(store, "v1", VersionFeedback(requests=60, errors=6, error_recent=0.08))
    d = evaluate(sched2, store, 1_000 + 6 * MIN)
    assert d is not None and d.fired and d.trigger == "error_threshold"


def test_manual_trigger_and_persisted_state(store: Store) -> None:
    sched = make(store)
    d = evaluate(sched, store, 1_000, manual="operator asked")
    assert d is not None and not d.fired and "no new qualifying samples" in d.reason
    set_counters(store, 1)
    d = evaluate(sched, store, 2_000, manual="operator asked")
    assert d is not None and d.fired and d.trigger == "manual" and d.reason == "operator asked"
    # a new scheduler (a restart) sees the in-flight update and the markers
    again = make(store)
    d = evaluate(again, store, 3_000, manual="again")
    assert d is not None and not d.fired and "upd-000001" in d.reason
