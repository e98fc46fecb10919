"""Plain helpers for tests that drive an in-process daemon (its config, its learning loop)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc, events_pb2

from sidecar.app import SidecarApp
from sidecar.config import SidecarConfig, StoreConfig, load_config
from sidecar.store import Store, StoreWriter
from tests.conftest import target_of

#: The control section for a daemon whose replicas must reconnect within a test.
FAST_CONTROL_RETRY: dict[str, Any] = {"retry_initial_seconds": 0.05, "retry_max_seconds": 0.2}

#: Config sections for ``app_factory``: feedback settles in 0.2 s, learning
#: fires only on a manual trigger (the sample and time triggers are out of
#: reach) and is evaluated every 50 ms, and no sample is held out.
MANUAL_LEARNING: dict[str, dict[str, Any]] = {
    "scoring": {"reward_window_seconds": 0.2},
    "learning": {
        "sample_count": 1_000_000,
        "time_interval_seconds": 1_000_000,
        "evaluate_interval_seconds": 0.05,
        "min_interval_seconds": 0,
    },
    "holdout": {"fraction": 0.0},
}


def fixed_port_config(data_dir: Path, port: int, **sections: dict[str, Any]) -> SidecarConfig:
    """A daemon's config on a known loopback port, for tests that dial it across a restart.

    HTTP off, a 2 s shutdown grace, no fsync; ``sections`` add or override keys.
    """
    overrides: dict[str, Any] = {
        "server": {"listen": [f"127.0.0.1:{port}"], "http_listen": "", "grace_seconds": 2},
        "store": {"data_dir": str(data_dir), "sync": False},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_config(environ={}, overrides=overrides)


def control_app(data_dir: Path, port: int) -> SidecarApp:
    """A daemon, not yet started, on ``port`` whose control channel retries fast."""
    return SidecarApp(fixed_port_config(data_dir, port, control=FAST_CONTROL_RETRY))


async def wait_until(
    cond: Callable[[], bool], timeout: float = 30, *, what: str = "the condition"
) -> None:
    """Polls ``cond`` every 50 ms; fails the test if it is still false after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def trigger_learning(app: SidecarApp, reason: str) -> str:
    """Fires an update through AdminService and waits until training has finished it.

    Asserts that the trigger fired; returns the update id.
    """
    async with grpc.aio.insecure_channel(target_of(app)) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        resp = await admin.TriggerLearning(
            admin_pb2.TriggerLearningRequest(reason=reason), timeout=10
        )
    assert resp.fired, resp.reason
    uid = resp.update_id
    await wait_until(
        lambda: (
            (app.training.status()["last_update"] or {}).get("update_id") == uid
            and app.training.status()["in_flight"] == ""
        )
    )
    return uid


def dataset_dir(app: SidecarApp, update_id: str) -> Path:
    """The snapshot folder the update ``update_id`` exported."""
    return Path(app.config.store.data_dir) / "datasets" / update_id


def sft_rows(app: SidecarApp, update_id: str) -> list[dict[str, Any]]:
    """The SFT rows of the update's snapshot, in file order."""
    lines = (dataset_dir(app, update_id) / "sft.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@contextlib.asynccontextmanager
async def running_store(config: StoreConfig) -> AsyncIterator[tuple[Store, StoreWriter]]:
    """An open store with its writer started; both closed afterwards."""
    store = Store(config)
    store.open()
    writer = StoreWriter(store, config)
    await writer.start()
    try:
        yield store, writer
    finally:
        await writer.shutdown()
        store.close()


def logged(app: SidecarApp) -> list[events_pb2.Event]:
    """Every event in the daemon's log, in order, as the clients sent them."""
    from sidecar.store import decode_log_value

    out = []
    with app.store.read() as txn:
        for _k, v in txn.cursor(db=app.store.db("events")):
            ev = events_pb2.Event()
            ev.ParseFromString(decode_log_value(v)[1])
            out.append(ev)
    return out
