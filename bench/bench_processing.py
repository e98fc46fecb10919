"""Processing rate: join + score + curate + trigger evaluation over a pre-filled log.

Fills a fresh store with PRIMARY answers and their feedback (ratings,
signals, retries, edits, repeated prompts), spread over log time so reward
windows close while the log is read, then runs every processor the daemon
registers (scoring, active-learning answers, rollout observer) through the
daemon's own ProcessorRunner (batches in writer transactions, fsync off) and
evaluates the learning scheduler after every batch. Prints events/s (wall
clock, and per CPU-second of the process), then where the time went: each
processor's own microseconds per event, and the rate at which the runner
reads and parses the same log for a processor that does nothing (the floor
every processor shares).
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

from atlas_sidecar_client.pb import events_pb2

from sidecar.app import SidecarApp
from sidecar.config import LearningConfig, ScoringConfig, SidecarConfig, StoreConfig
from sidecar.scoring import read_counters
from sidecar.store import ProcessorRunner, Store, encode_log_value, encode_u64

REQUESTS = int(sys.argv[1]) if len(sys.argv) > 1 else 30_000
S = events_pb2.Signal


class NoOp:
    """A processor that does nothing: what is left is the runner's own cost."""

    name = "bench_noop"

    def process(self, txn: object, seq: int, ingest_ms: int, event: object) -> None:
        pass

    def tick(self, txn: object, now_ms: int) -> None:
        pass


def fill(store: Store) -> int:
    rnd = random.Random(1)
    rows: list[tuple[bytes, bytes]] = []
    t = 1_700_000_000_000
    seq = 0
    for i in range(REQUESTS):
        t += 2  # 500 requests per second of log time
        inf = events_pb2.Inference(
            request_id=f"r{i}",
            model_version="v1",
            prompt=f"question {rnd.randrange(5000)} about something",
            response=f"an answer of moderate length number {i}",
            user_id=f"u{rnd.randrange(500)}",
            token_logprobs=[-rnd.random() for _ in range(8)],
            attributes={"task_id": f"t{i % 7}"},
        )
        if i and rnd.random() < 0.05:
            inf.retry_of = f"r{i - 1}"
        seq += 1
        ev = events_pb2.Event(event_id=f"i{i}", inference=inf)
        rows.append((encode_u64(seq), encode_log_value(t, ev.SerializeToString())))
        roll = rnd.random()
        if roll < 0.8:
            fb = events_pb2.Feedback(request_id=f"r{i}", user_id=inf.user_id)
            if roll < 0.5:
                fb.rating = rnd.random()
            elif roll < 0.75:
                fb.signal = rnd.choice([S.COPY, S.RETRY, S.DISMISS, S.ENGAGE])
            else:
                fb.signal = S.EDIT
                fb.correction = f"a corrected answer {i}"
            seq += 1
            ev = events_pb2.Event(event_id=f"f{i}", feedback=fb)
            rows.append((encode_u64(seq), encode_log_value(t + 1, ev.SerializeToString())))
    with store.env.begin(write=True) as txn, txn.cursor(db=store.db("events")) as cur:
        cur.putmulti(rows, append=True)
    return seq


async def run(data_dir: Path) -> float:
    # The daemon's own wiring (nothing started but the writer), so the bench
    # runs exactly the processors ``serve`` runs, in the same order.
    app = SidecarApp(
        SidecarConfig(
            store=StoreConfig(data_dir=data_dir, sync=False),
            scoring=ScoringConfig(reward_window_seconds=5),
            learning=LearningConfig(sample_count=500, min_interval_seconds=0),
        )
    )
    store, writer, runner, sched = app.store, app.writer, app.processors, app.scheduler
    store.open()
    total = fill(store)
    await writer.start()
    # as after a rollout engine start: the regression pool collects "v1"
    app.rollouts.observer.stable_version = "v1"
    await writer.run(app.scoring.bind)
    fired = 0
    started = time.perf_counter()
    cpu_started = time.process_time()
    while True:
        more = await runner.run_once()
        now = 1_700_000_000_000 + 10**9
        d = await writer.run(lambda txn, now=now: sched.evaluate(txn, now))
        if d is not None and d.fired:
            fired += 1
            await writer.run(lambda txn, d=d: sched.finish(txn, d.update_id, ok=True, outcome="ok"))
        if not more:
            break
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    with store.read() as txn:
        c = read_counters(txn, store)
    names = ", ".join(runner.stats)
    own = ", ".join(
        f"{name} {1e6 * st.busy_seconds / max(st.processed, 1):.1f}"
        for name, st in sorted(runner.stats.items(), key=lambda kv: -kv[1].busy_seconds)
    )
    # the floor: the same log read and parsed for a processor that does nothing
    floor_runner = ProcessorRunner(store, writer, [NoOp()])
    floor_started = time.perf_counter()
    while await floor_runner.run_once():
        pass
    floor = total / (time.perf_counter() - floor_started)
    await writer.shutdown()
    store.close()
    rate = total / elapsed
    # CPU seconds of this process too: on a shared machine wall time mostly
    # measures the neighbours.
    print(
        f"processing: {rate:,.0f} events/s ({total} events in {elapsed:.2f} s wall, "
        f"{total / cpu:,.0f} events per CPU-second; {c.samples} samples, {c.sft} sft, "
        f"{c.pairs} pairs, {fired} triggers fired; processors: {names})"
    )
    print(
        f"  microseconds per event in each processor: {own}; reading and parsing the log "
        f"for a processor that does nothing: {floor:,.0f} events/s ({1e6 / floor:.1f} us/event)"
    )
    return rate


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
