"""Every stage of the daemon: shutdown is safe before start and twice; start then shutdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidecar.app import SidecarApp
from tests.conftest import make_config


def _stages(app: SidecarApp) -> dict[str, Any]:
    named = {f"stages[{i}] {type(s).__name__}": s for i, s in enumerate(app.stages)}
    for attr in (
        "writer",
        "retention",
        "page_release",
        "processors",
        "telemetry",
        "store_health",
        "auth",
    ):
        named[attr] = getattr(app, attr)
    return named


async def test_every_stage_shuts_down_before_start_and_twice(tmp_path: Path) -> None:
    app = SidecarApp(make_config(tmp_path / "data"))
    stages = _stages(app)
    assert len(stages) >= 10  # the whole graph, not a part of it
    for name, stage in stages.items():
        for _ in range(2):
            await stage.shutdown()  # never started: must not raise
        assert hasattr(stage, "start"), name
    await app.shutdown()  # the app too, before start


async def test_every_stage_starts_and_shuts_down_with_the_app(tmp_path: Path) -> None:
    app = SidecarApp(make_config(tmp_path / "data"))
    await app.start()
    await app.shutdown()
    await app.shutdown()  # twice
    for stage in _stages(app).values():
        await stage.shutdown()  # and each stage once more after the app
