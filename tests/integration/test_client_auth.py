"""The Python clients with auth on: a refused client says so once, keeps its events, and
delivers them once its token is listed, without a restart."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from atlas_sidecar_client import ControlLoop, EventStream

from sidecar.app import SidecarApp
from sidecar.auth import new_token
from tests._auth import write_tokens
from tests._helpers import wait_until
from tests.conftest import make_config, target_of


@pytest.fixture
async def secured(tmp_path: Path) -> SidecarApp:
    tokens_file = tmp_path / "tokens.yaml"
    write_tokens(tokens_file, {"ops": (["read"], [])})
    app = SidecarApp(
        make_config(
            tmp_path / "data",
            auth={"tokens_file": str(tokens_file), "reload_interval_seconds": 0.05},
        )
    )
    await app.start()
    yield app  # type: ignore[misc]
    await app.shutdown()


def _list(tokens_file: Path, name: str, token: str, roles: list[str], ids: list[str]) -> None:
    import yaml

    from sidecar.auth import hash_token

    doc = yaml.safe_load(tokens_file.read_text())
    doc["tokens"].append(
        {"name": name, "sha256": hash_token(token), "roles": roles, "server_ids": ids}
        if ids
        else {"name": name, "sha256": hash_token(token), "roles": roles}
    )
    tmp = tokens_file.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(tokens_file)


async def test_a_refused_event_stream_keeps_its_events_and_logs_once(
    secured: SidecarApp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = secured
    token = new_token()  # not listed yet
    stream = EventStream(target_of(app), token=token, backoff_initial=0.01, backoff_max=0.1)
    try:
        with caplog.at_level(logging.ERROR, logger="atlas_sidecar_client._events"):
            for i in range(50):
                stream.record_inference(f"r{i}", "v1", prompt="p", response="a")
            await wait_until(lambda: stream.stats.reconnects >= 5, what="several refusals")
        refusals = [r for r in caplog.records if "refused this client" in r.getMessage()]
        assert len(refusals) == 1  # said once, not at every retry
        assert "UNAUTHENTICATED" in stream.stats.last_error
        assert stream.stats.dropped == 0 and stream.stats.accepted == 0
        assert app.status_dict()["events"]["accepted"] == 0
        assert token not in caplog.text
        # The operator lists the token: the queued events arrive, no restart.
        _list(tmp_path / "tokens.yaml", "pod-0", token, ["ingest"], [])
        assert await stream.aflush(30)
        assert stream.stats.accepted == 50
        assert app.status_dict()["events"]["accepted"] == 50
    finally:
        await stream.aclose()


async def test_a_control_loop_with_a_token_connects_for_the_ids_it_may_claim(
    secured: SidecarApp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = secured
    token = new_token()
    _list(tmp_path / "tokens.yaml", "pod-0", token, ["server"], ["pod-0"])
    await wait_until(lambda: app.auth.reloads >= 1, what="the token listed")
    impostor = ControlLoop(
        target_of(app), "pod-1", token=token, backoff_initial=0.01, backoff_max=0.05
    )
    loop = ControlLoop(target_of(app), "pod-0", token=token)
    with caplog.at_level(logging.ERROR, logger="atlas_sidecar_client._control"):
        await impostor.start()
        await loop.start()
        try:
            async with asyncio.timeout(20):
                await loop.wait_connected()
            await wait_until(lambda: impostor.stats.reconnects >= 3, what="refused again")
            assert not impostor.connected
            assert "PERMISSION_DENIED" in impostor.stats.last_error
            assert app.control.connected_servers() == 1
        finally:
            await impostor.stop()
            await loop.stop()
    assert sum("refused control stream of pod-1" in r.getMessage() for r in caplog.records) == 1
