"""FeedbackProcessor on a real LMDB store: join, scores, curation, pairs, quarantine."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from atlas_sidecar_client.pb import events_pb2

from sidecar.config import ScoringConfig, StoreConfig
from sidecar.scoring import (
    FeedbackProcessor,
    WeightTable,
    iter_export_rows,
    iter_pairs,
    iter_samples,
    quarantined_sources,
    read_counters,
    read_version_feedback,
    read_weight_versions,
    score_feedback,
)
from sidecar.store import ProcessorRunner, Store, StoreWriter, encode_log_value, encode_u64
from sidecar.training import ModelRegistry

S = events_pb2.Signal
WINDOW_MS = 10_000


@pytest.fixture
def store_config(tmp_path: Path) -> StoreConfig:
    return StoreConfig(data_dir=tmp_path / "data", sync=False)


def inf(rid: str, prompt: str = "p", response: str = "r", **kw: Any) -> events_pb2.Event:
    kw.setdefault("model_version", "v1")
    return events_pb2.Event(
        event_id=f"i-{rid}",
        inference=events_pb2.Inference(request_id=rid, prompt=prompt, response=response, **kw),
    )


_n = 0


def fb(rid: str, **kw: Any) -> events_pb2.Event:
    global _n
    _n += 1
    return events_pb2.Event(
        event_id=f"f-{rid}-{_n}", feedback=events_pb2.Feedback(request_id=rid, **kw)
    )


class Harness:
    def __init__(self, store: Store, config: ScoringConfig | None = None) -> None:
        self.store = store
        self.proc = FeedbackProcessor(
            store, config or ScoringConfig(reward_window_seconds=WINDOW_MS / 1000)
        )
        self.seq = 0

    def feed(self, *events: events_pb2.Event, at_ms: int = 1_000) -> None:
        with self.store.env.begin(write=True) as txn:
            for ev in events:
                self.seq += 1
                self.proc.process(txn, self.seq, at_ms, ev)
            self.proc.end_batch(txn)

    def close_all(self) -> None:
        with self.store.env.begin(write=True) as txn:
            self.proc._close_until(txn, 10**15)
            self.proc.end_batch(txn)

    def samples(self) -> dict[str, Any]:
        with self.store.read() as txn:
            return {s.request_id: s for s in iter_samples(txn, self.store)}

    def pairs(self) -> list[Any]:
        with self.store.read() as txn:
            return list(iter_pairs(txn, self.store))


def test_scores_order_as_a_user_expects() -> None:
    none = score_feedback([], None)
    zero = score_feedback([], 0.0)
    retry = score_feedback([S.RETRY], None)
    dismiss = score_feedback([S.DISMISS], None)
    copy = score_feedback([S.COPY], None)
    top = score_feedback([], 1.0)
    # the seed's bugs: a rating of 0 read as missing, negatives clamped to 0
    assert zero.has_feedback and zero.signed == -1.0
    assert zero.reward < none.reward
    assert retry.reward < none.reward and retry.signed < 0
    assert dismiss.reward < none.reward
    assert none.has_feedback is False and none.reward == WeightTable().default_reward
    assert none.reward < copy.reward < top.reward


def test_stored_rewards_are_rounded_exactly_as_round_does() -> None:
    import random
    import struct

    from sidecar.scoring._processor import _round6

    rnd = random.Random(3)
    values = [0.0, -0.0, 1e-7, -1e-7, 5e-7, -5e-7, 0.5, 1.0, -1.0, 0.1234565, 2.675, 1e300]
    values += [rnd.uniform(-1, 1) for _ in range(20_000)]
    values += [rnd.uniform(-40, 0) for _ in range(20_000)]
    # millionths and halves of millionths, where rounding ties live
    values += [
        rnd.randrange(-(10**6), 10**6) / 1e6 + h for h in (0, 5e-7, -5e-7) for _ in range(5_000)
    ]
    for x in values:
        assert struct.pack("<d", _round6(x)) == struct.pack("<d", round(x, 6)), x


def test_processor_keeps_the_order_end_to_end(store: Store) -> None:
    h = Harness(store)
    h.feed(
        inf("none"),
        inf("zero"),
        fb("zero", rating=0.0),
        inf("retry"),
        fb("retry", signal=S.RETRY),
        inf("good"),
        fb("good", rating=1.0),
    )
    h.close_all()
    s = h.samples()
    assert s["zero"].reward < s["none"].reward
    assert s["retry"].reward < s["none"].reward
    assert s["none"].reward < s["good"].reward
    assert s["zero"].has_feedback and not s["none"].has_feedback
    assert s["good"].qualifies and not s["none"].qualifies


def test_join_in_either_order_and_aggregates(store: Store) -> None:
    h = Harness(store)
    h.feed(fb("a", signal=S.COPY, user_id="u1"), fb("a", rating=0.2), at_ms=1_000)
    h.feed(inf("a", user_id="u1"), at_ms=2_000)
    h.feed(fb("a", rating=0.9), fb("a", dwell_ms=60_000), at_ms=3_000)
    h.close_all()
    a = h.samples()["a"]
    assert a.rating == pytest.approx(0.9)  # the latest rating wins
    assert set(a.signals) == {"COPY", "ENGAGE"}  # dwell above the threshold is ENGAGE
    assert a.sources == ("user:u1",)
    expected = score_feedback([S.COPY, S.ENGAGE], 0.9)
    assert a.reward == pytest.approx(expected.reward, abs=1e-6)


def test_window_late_feedback_orphans_and_roles(store: Store) -> None:
    h = Harness(store)
    h.feed(
        inf("a"),
        inf("s", role=events_pb2.SHADOW, model_version="cand"),
        inf("p", role=events_pb2.PROBE, model_version="cand"),
        fb("ghost", rating=1.0),
        at_ms=1_000,
    )
    # an event past the window closes it (log time, not wall time)
    h.feed(fb("a", rating=1.0), at_ms=1_000 + WINDOW_MS + 1)
    samples = h.samples()
    assert set(samples) == {"a"}
    assert samples["a"].has_feedback is False  # the rating came too late
    with store.read() as txn:
        c = read_counters(txn, store)
        assert c.late_feedback == 1
        assert c.orphans_dropped == 1
        assert c.non_primary == 2
        assert read_version_feedback(txn, store, "cand").requests == 0


def test_tick_closes_only_when_caught_up(store: Store) -> None:
    h = Harness(store)
    ev = inf("a")
    h.feed(ev, at_ms=1_000)
    with store.env.begin(write=True) as txn:
        # the event is in the log but the cursor never moved past it
        txn.put(
            encode_u64(1), encode_log_value(1_000, ev.SerializeToString()), db=store.db("events")
        )
        h.proc.tick(txn, 10**15)
    assert h.samples() == {}
    with store.env.begin(write=True) as txn:
        txn.put(b"cursor/scoring", encode_u64(2), db=store.db("meta"))
        h.proc.tick(txn, 10**15)
    assert set(h.samples()) == {"a"}


def _entries(store: Store, name: str) -> int:
    with store.read() as txn:
        return int(txn.stat(store.db(name))["entries"])


def test_closed_requests_are_forgotten_and_the_store_stays_bounded(store: Store) -> None:
    # 10 requests per second of log time, a 10 s window, closed requests
    # remembered for 30 s: about 400 records at any time, never the 3000 seen.
    cfg = ScoringConfig(reward_window_seconds=WINDOW_MS / 1000, closed_request_retention_seconds=30)
    h = Harness(store, cfg)
    t = 1_000
    peak = 0
    for i in range(3000):
        events = [inf(f"r{i}", prompt=f"q{i % 50}", response=f"a{i}")]
        if i % 3 == 0:
            events.append(fb(f"r{i}", rating=(i % 10) / 10))
        h.feed(*events, at_ms=t)
        t += 100
        if i % 100 == 99:
            peak = max(peak, _entries(store, "requests"))
            assert _entries(store, "closed") <= 301
    assert 300 < peak <= 401
    assert len(h.samples()) == 3000 - 100  # the last 10 s of answers are still open
    # the log goes quiet: ticks close and forget by the clock alone
    h.feed(fb("late", rating=1.0), at_ms=t)  # an orphan, dropped after a window
    with store.env.begin(write=True) as txn:
        txn.put(b"cursor/scoring", encode_u64(h.seq + 1), db=store.db("meta"))
        h.proc.tick(txn, t + 10 * WINDOW_MS)
    assert _entries(store, "requests") == 0
    assert _entries(store, "closed") == 0
    assert _entries(store, "windows") == 0
    assert len(h.samples()) == 3000


def test_feedback_and_retries_after_a_request_is_forgotten(store: Store) -> None:
    cfg = ScoringConfig(reward_window_seconds=WINDOW_MS / 1000, closed_request_retention_seconds=60)
    h = Harness(store, cfg)
    h.feed(*(inf(r, prompt="q" + r, response="first " + r) for r in "abc"))
    # closed but remembered: late feedback is late, a retry pairs with it
    h.feed(fb("a", rating=1.0), at_ms=1_000 + WINDOW_MS + 1)
    h.feed(inf("a2", prompt="qa", response="second", retry_of="a"), at_ms=30_000)
    # forgotten (closed at 11 s, remembered until 71 s): feedback waits as an
    # orphan and is dropped, a retry finds nothing to pair with, a resent
    # answer is scored again
    h.feed(fb("b", rating=1.0), inf("c2", prompt="qc", response="x", retry_of="c"), at_ms=80_000)
    h.feed(inf("c", prompt="qc", response="again"), at_ms=95_000)
    h.feed(inf("z"), at_ms=200_000)
    with store.read() as txn:
        c = read_counters(txn, store)
    assert c.late_feedback == 1
    assert c.orphans_dropped == 1
    assert c.duplicate_requests == 0
    kinds = [(p.kind, p.request_ids) for p in h.pairs()]
    assert kinds == [("retry", ("a2", "a"))]
    with store.read() as txn:
        scored = [s.request_id for s in iter_samples(txn, store)]
    assert scored.count("c") == 2 and scored.count("b") == 1
    assert not h.samples()["b"].has_feedback


def test_preference_pairs_from_retries_edits_and_scores(store: Store) -> None:
    h = Harness(store)
    h.feed(
        inf("a", prompt="q", response="first"),
        fb("a", signal=S.RETRY),
        inf("b", prompt="q", response="second", retry_of="a"),
        inf("c", prompt="x", response="draft"),
        fb("c", signal=S.EDIT, correction="fixed"),
        inf("d", prompt="z", response="great"),
        fb("d", rating=1.0),
        inf("e", prompt="z", response="poor"),
        fb("e", rating=0.1),
        inf("f", prompt="z", response="close"),
        fb("f", rating=0.95),
    )
    h.close_all()
    pairs = {(p.kind, p.chosen, p.rejected): p for p in h.pairs()}
    retry = pairs[("retry", "second", "first")]
    assert retry.prompt == "q" and retry.margin >= 0
    edit = pairs[("edit", "fixed", "draft")]
    assert edit.reward == 1.0 and edit.margin > 0
    assert ("score", "great", "poor") in pairs
    assert ("score", "close", "poor") in pairs
    # rewards within the margin make no pair
    assert not any({k[1], k[2]} == {"great", "close"} for k in pairs)
    samples = h.samples()
    for p in pairs.values():
        if p.kind != "edit":
            chosen, rejected = (samples[r] for r in p.request_ids)
            assert p.margin == pytest.approx(chosen.reward - rejected.reward, abs=1e-6)
            assert p.reward == chosen.reward


def test_quarantine_excludes_outlier_sources(store: Store) -> None:
    cfg = ScoringConfig(
        reward_window_seconds=WINDOW_MS / 1000, quarantine_min_history=3, quarantine_min_sources=5
    )
    h = Harness(store, cfg)
    events = []
    for u in range(6):
        for i in range(4):
            rid = f"u{u}-{i}"
            events += [inf(rid, prompt=f"p{u}{i}"), fb(rid, rating=0.9 + 0.01 * u, user_id=f"{u}")]
    for i in range(4):
        rid = f"bad-{i}"
        events += [inf(rid, prompt=f"b{i}"), fb(rid, rating=0.0, user_id="troll")]
    h.feed(*events)
    h.close_all()
    with store.read() as txn:
        q = quarantined_sources(txn, store, min_history=3, min_sources=5, z_threshold=3.5)
        assert set(q) == {"user:troll"}
        kto = [row for _, row in iter_export_rows(txn, store, "kto", quarantine=q)]
        listed = [
            row
            for _, row in iter_export_rows(
                txn, store, "kto", quarantine=q, include_quarantined=True
            )
        ]
    assert len(kto) == 24 and all(r["label"] is True for r in kto)
    flagged = [r for r in listed if r.get("quarantined")]
    assert len(flagged) == 4 and all(r["label"] is False for r in flagged)


def test_changed_weights_get_a_new_version(store: Store) -> None:
    h1 = Harness(store)
    with store.env.begin(write=True) as txn:
        assert h1.proc.bind(txn) == 1
        assert h1.proc.bind(txn) == 1
    weights = dict(ScoringConfig().signal_weights, COPY=0.1)
    h2 = Harness(store, ScoringConfig(signal_weights=weights))
    with store.env.begin(write=True) as txn:
        assert h2.proc.bind(txn) == 2
    with store.read() as txn:
        versions = read_weight_versions(txn, store)
    assert [v["version"] for v in versions] == [1, 2]
    assert versions[1]["signals"]["COPY"] == 0.1  # type: ignore[index]


def test_per_version_feedback_and_errors(store: Store) -> None:
    h = Harness(store)
    h.feed(inf("a"), fb("a", rating=1.0), inf("b", error=True, response=""), inf("c"))
    h.close_all()
    with store.read() as txn:
        v1 = read_version_feedback(txn, store, "v1", baseline_samples=1)
    assert v1.requests == 3 and v1.errors == 1
    assert v1.feedback_n == 1 and v1.mean_reward == pytest.approx(1.0)
    assert v1.baseline_reward == pytest.approx(1.0)
    assert "b" not in h.samples()  # an error is not a sample


async def test_bad_event_is_dead_lettered_and_the_rest_goes_on(store: Store) -> None:
    writer = StoreWriter(store, StoreConfig(data_dir=store.data_dir, sync=False))
    await writer.start()
    try:
        proc = FeedbackProcessor(store, ScoringConfig(reward_window_seconds=0.001))
        runner = ProcessorRunner(store, writer, [proc])
        bad = events_pb2.Event(event_id="bad", inference=events_pb2.Inference(request_id="x"))
        items = [(e.event_id.encode(), e.SerializeToString()) for e in (inf("a"), bad, inf("b"))]
        await asyncio.wrap_future(writer.submit_events(items))
        while await runner.run_once():
            pass
        await asyncio.sleep(0.01)
        await runner.tick_all()
        status = runner.status()
        assert status["dead_letters"] == 1
        with store.read() as txn:
            assert {s.request_id for s in iter_samples(txn, store)} == {"a", "b"}
    finally:
        await writer.shutdown()


def _views(store: Store) -> dict[str, list[tuple[bytes, bytes]]]:
    out: dict[str, list[tuple[bytes, bytes]]] = {}
    with store.read() as txn:
        for name in ("samples", "pairs", "requests", "windows", "prompts", "closed", "meta"):
            rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=store.db(name))]
            if name == "meta":
                rows = [(k, v) for k, v in rows if k.startswith(b"scoring/")]
            out[name] = rows
    return out


async def _run_log(tmp: Path, log: list[tuple[int, events_pb2.Event]], batch: int) -> Any:
    st = Store(StoreConfig(data_dir=tmp, sync=False))
    st.open()
    rows = [
        (encode_u64(i), encode_log_value(ms, ev.SerializeToString()))
        for i, (ms, ev) in enumerate(log, start=1)
    ]
    with st.env.begin(write=True) as txn, txn.cursor(db=st.db("events")) as cur:
        cur.putmulti(rows, append=True)
    writer = StoreWriter(st, StoreConfig(data_dir=tmp, sync=False))
    await writer.start()
    try:
        registry = ModelRegistry(st, writer)
        proc = FeedbackProcessor(
            st,
            # closed requests forgotten after 50 ms: a few are, mid-log
            ScoringConfig(reward_window_seconds=0.01, closed_request_retention_seconds=0.05),
            on_primary_version=registry.observe_primary_version,
        )
        runner = ProcessorRunner(st, writer, [proc], batch_events=batch)
        while await runner.run_once():
            pass
        assert registry.stable_version() == "v1"  # learnt from the first PRIMARY answer
        return runner.status(), _views(st)
    finally:
        await writer.shutdown()
        st.close()


async def test_a_failed_batch_retried_event_by_event_equals_one_event_batches(
    tmp_path: Path,
) -> None:
    # The bad event comes after windows it closes (samples, pairs, counters,
    # per-source statistics) were accumulated in memory for the batch: the
    # retry must drop that state and rebuild it, not write it twice or lose it.
    log: list[tuple[int, events_pb2.Event]] = []
    t = 1_000
    for i in range(12):
        rid = f"r{i}"
        log.append((t, inf(rid, prompt=f"p{i % 3}", response=f"a{i}", user_id="u1")))
        if i % 2:
            log.append((t + 1, fb(rid, rating=0.1 * i, user_id="u1")))
        else:
            log.append((t + 1, fb(rid, signal=S.EDIT, correction=f"better {i}")))
        if i == 6:
            log.append((t + 50, events_pb2.Event(event_id="no-payload")))
        t += 20
    log.append((t + 1_000, inf("last")))
    batched_status, batched = await _run_log(tmp_path / "batched", log, batch=1000)
    single_status, single = await _run_log(tmp_path / "single", log, batch=1)
    assert batched_status["dead_letters"] == single_status["dead_letters"] == 1
    assert batched["samples"] and batched["pairs"]
    # every closed request was forgotten by the time "last" came
    assert [k for k, _ in batched["requests"]] == [b"last"]
    assert batched == single


def _stored_request_records(store: Store) -> dict[str, dict[str, Any]]:
    import orjson

    with store.read() as txn, txn.cursor(db=store.db("requests")) as cur:
        return {bytes(k).decode(): orjson.loads(bytes(v)) for k, v in cur}


def test_every_stored_request_record_key_has_a_legend(store: Store) -> None:
    from sidecar.scoring._processor import REQUEST_RECORD_FIELDS

    h = Harness(store)
    h.feed(
        inf("open", session_id="s1", user_id="u1", token_logprobs=[-0.1, -0.5]),
        fb("open", signal=S.THUMBS_UP, rating=0.8, correction="better", user_id="u2"),
        fb("orphan", signal=S.THUMBS_DOWN, session_id="s2"),
        inf("empty", response=""),
    )
    open_records = _stored_request_records(store)
    # Past the window, before the closed records are forgotten.
    with store.env.begin(write=True) as txn:
        h.proc._close_until(txn, 1_000 + WINDOW_MS + 1)
        h.proc.end_batch(txn)
    closed_records = _stored_request_records(store)
    # The three shapes a record takes: open, orphan, closed.
    assert "o" in open_records["orphan"]
    assert "dl" in open_records["open"] and "c" not in open_records["open"]
    assert closed_records["open"]["c"] >= 1  # a sample was made
    assert closed_records["empty"]["c"] == 0  # an empty answer makes no sample
    seen = {k for recs in (open_records, closed_records) for r in recs.values() for k in r}
    assert seen <= set(REQUEST_RECORD_FIELDS), sorted(seen - set(REQUEST_RECORD_FIELDS))
    # And the legend lists nothing that is never written.
    assert set(REQUEST_RECORD_FIELDS) <= seen, sorted(set(REQUEST_RECORD_FIELDS) - seen)
