"""Random batches through the real gRPC stack never crash the server or corrupt the store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from atlas_sidecar_client.pb import events_pb2, ingest_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.app import SidecarApp
from sidecar.store import decode_log_value
from tests.conftest import make_config, target_of

text = st.text(max_size=40)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
attrs = st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4)

inference = st.builds(
    events_pb2.Inference,
    request_id=text,
    model_version=text,
    role=st.integers(0, 6),
    prompt=text,
    response=text,
    latency_ms=st.floats(allow_nan=True, allow_infinity=True),
    error=st.booleans(),
    error_code=text,
    token_logprobs=st.lists(floats, max_size=5),
    session_id=text,
    user_id=text,
    retry_of=text,
    attributes=attrs,
)
feedback = st.builds(
    events_pb2.Feedback,
    request_id=text,
    rating=st.one_of(st.none(), floats),
    signal=st.integers(0, 12),
    dwell_ms=st.integers(0, 2**32 - 1),
    correction=text,
    attributes=attrs,
    user_id=text,
)
event = st.one_of(
    st.builds(
        events_pb2.Event,
        event_id=st.sampled_from(["", "a", "b", "c", "d"]) | text,
        inference=inference,
    ),
    st.builds(
        events_pb2.Event, event_id=st.sampled_from(["a", "b", "e"]) | text, feedback=feedback
    ),
    st.builds(events_pb2.Event, event_id=text),
)
batches = st.lists(st.lists(event, max_size=12), min_size=1, max_size=6)


def test_random_batches(tmp_path: Path) -> None:
    counter = {"n": 0}

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(batches)
    def check(batch_list: list[list[events_pb2.Event]]) -> None:
        counter["n"] += 1
        asyncio.run(run(tmp_path / f"d{counter['n']}", batch_list))

    check()


async def run(data_dir: Path, batch_list: list[list[events_pb2.Event]]) -> None:
    app = SidecarApp(make_config(data_dir))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(target_of(app)) as ch:
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            seen: set[str] = set()
            expected_stored: list[str] = []
            totals = [0, 0, 0]

            async def gen():  # type: ignore[no-untyped-def]
                for events in batch_list:
                    yield events_pb2.EventBatch(events=events)

            acks = [a async for a in stub.StreamEvents(gen())]
            assert len(acks) == len(batch_list)
            for events, ack in zip(batch_list, acks, strict=True):
                rejected = {r.index for r in ack.rejected}
                assert ack.accepted + ack.duplicates + len(rejected) == len(events)
                dups = 0
                for i, ev in enumerate(events):
                    if i in rejected:
                        assert ev.event_id == "" or ack.rejected  # a reason was given
                        continue
                    if ev.event_id in seen:
                        dups += 1
                    else:
                        seen.add(ev.event_id)
                        expected_stored.append(ev.event_id)
                assert (ack.accepted, ack.duplicates) == (len(events) - len(rejected) - dups, dups)
                totals[0] += ack.accepted
                totals[1] += ack.duplicates
                totals[2] += len(rejected)
            for r in (r for a in acks for r in a.rejected):
                assert r.reason and ":" in r.reason
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        stored = []
        with app.store.read() as txn:
            for _k, v in txn.cursor(db=app.store.db("events")):
                ev = events_pb2.Event()
                ev.ParseFromString(decode_log_value(v)[1])  # every stored value parses
                stored.append(ev.event_id)
        assert stored == expected_stored
        assert app.status_dict()["events"] == dict(
            zip(["accepted", "duplicates", "rejected"], totals, strict=True)
        )
    finally:
        await app.shutdown()
