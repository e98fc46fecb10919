"""Integration-test fixtures: a real daemon in-process on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.app import SidecarApp
from sidecar.testing import free_port
from tests._helpers import control_app


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[SidecarApp]:
    """A started daemon on a free port whose control channel retries fast."""
    app = control_app(tmp_path / "data", free_port())
    await app.start()
    yield app
    await app.shutdown()
