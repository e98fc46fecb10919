"""A full disk under the real daemon: RESOURCE_EXHAUSTED, health NOT_SERVING, then back.

The data dir lives on a real 8 MiB tmpfs, part of it taken by a ballast
file that the test deletes to give the space back.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc, events_pb2, ingest_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.app import INGEST_SERVICE, SidecarApp
from tests.conftest import inference, make_config, target_of

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    rc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True
    )
    if rc.returncode != 0:
        pytest.skip(f"cannot mount an 8 MiB tmpfs (needs root): {rc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def health_of(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(resp.status)


async def wait_health(channel: grpc.aio.Channel, service: str, want: int) -> None:
    import asyncio
    import time

    deadline = time.monotonic() + 60
    while await health_of(channel, service) != want:
        assert time.monotonic() < deadline, f"{service} never became {want}"
        await asyncio.sleep(0.05)


def batch(n: int, prefix: str) -> events_pb2.EventBatch:
    return events_pb2.EventBatch(
        events=[
            inference(f"{prefix}-{i}", f"{prefix}-r{i}", prompt="p" * 300, response="a" * 300)
            for i in range(n)
        ]
    )


async def test_full_disk_is_resource_exhausted_and_ingest_health_follows_the_space(
    small_disk: Path,
) -> None:
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (4 << 20))
    app = SidecarApp(
        make_config(
            small_disk / "data",
            store={"sync": False, "min_free_bytes": 1 << 20, "full_recheck_seconds": 0.05},
        )
    )
    await app.start()
    try:
        async with grpc.aio.insecure_channel(target_of(app)) as channel:
            ingest = ingest_pb2_grpc.IngestServiceStub(channel)
            assert await health_of(channel, INGEST_SERVICE) == SERVING
            error: grpc.aio.AioRpcError | None = None
            for b in range(200):
                try:
                    await ingest.RecordEvents(batch(100, f"b{b}"), timeout=30)
                except grpc.aio.AioRpcError as exc:
                    error = exc
                    break
            assert error is not None, "the 8 MiB disk never filled"
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (
                error.code(),
                error.details(),
            )
            assert "disk full" in (error.details() or "")
            await wait_health(channel, INGEST_SERVICE, NOT_SERVING)
            # the rest of the daemon still answers
            assert await health_of(channel, "") == SERVING
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            status = await admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
            assert status.events.accepted > 0

            ballast.unlink()  # space returns; no restart
            await wait_health(channel, INGEST_SERVICE, SERVING)
            ack = await ingest.RecordEvents(batch(10, "after"), timeout=30)
            assert ack.accepted == 10
    finally:
        await app.shutdown()


async def test_pages_a_failed_commit_left_in_the_file_count_as_room(small_disk: Path) -> None:
    """The disk is freed, but the store's file took the space back (the pages of a
    commit that failed for want of room are allocated past the last used page):
    those pages are reusable, so ingest serves again."""
    import os

    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (4 << 20))
    app = SidecarApp(
        make_config(
            small_disk / "data",
            store={"sync": False, "min_free_bytes": 1 << 20, "full_recheck_seconds": 0.05},
        )
    )
    await app.start()
    try:
        async with grpc.aio.insecure_channel(target_of(app)) as channel:
            ingest = ingest_pb2_grpc.IngestServiceStub(channel)
            for b in range(200):
                try:
                    await ingest.RecordEvents(batch(100, f"b{b}"), timeout=30)
                except grpc.aio.AioRpcError:
                    break
            await wait_health(channel, INGEST_SERVICE, NOT_SERVING)
            info, psize = app.store.env.info(), app.store.env.stat()["psize"]
            used = (info["last_pgno"] + 1) * psize
            ballast.unlink()
            # What a failed commit leaves: pages written past the last used one
            # until the disk was full again.
            fd = os.open(app.store.data_file, os.O_WRONLY)
            try:
                offset = used + 64 * psize
                chunk = b"\0" * psize
                while True:
                    try:
                        os.pwrite(fd, chunk, offset)
                    except OSError:
                        break
                    offset += psize
            finally:
                os.close(fd)
            assert shutil.disk_usage(small_disk).free < 1 << 20  # the file system says full
            await wait_health(channel, INGEST_SERVICE, SERVING)
            ack = await ingest.RecordEvents(batch(10, "after"), timeout=30)
            assert ack.accepted == 10
    finally:
        await app.shutdown()
