"""The telemetry stage's lifecycle and the learning report's definitions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.app import SidecarApp
from sidecar.config import load_config
from sidecar.errors import ConfigError
from sidecar.store import Store, StoreWriter, append_history
from sidecar.telemetry import LearningMonitor, Telemetry
from sidecar.telemetry._report import DAY_MS, improvement_of


def _config(tmp_path: Path, **telemetry: Any) -> Any:
    return load_config(
        environ={},
        overrides={
            "store": {"data_dir": str(tmp_path / "data")},
            "server": {"listen": ["127.0.0.1:0"], "http_listen": "127.0.0.1:0"},
            "telemetry": telemetry,
        },
    )


async def test_telemetry_lifecycle_shutdown_before_start_and_twice(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    store = Store(cfg.store)
    writer = StoreWriter(store, cfg.store)
    t = Telemetry(cfg.telemetry, store=store, writer=writer, environ={})
    await t.shutdown()
    store.open()
    await writer.start()
    try:
        await t.start()
        await t.start()
        assert b"atlas_ingest_queue_depth" in t.metrics_text()
        await t.shutdown()
        await t.shutdown()
    finally:
        await writer.shutdown()
        store.close()


def test_telemetry_refuses_an_otlp_protocol_it_cannot_speak(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    store = Store(cfg.store)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        Telemetry(cfg.telemetry, store=store, writer=StoreWriter(store, cfg.store), environ=env)


async def test_telemetry_disabled_turns_metrics_off_but_keeps_the_report(tmp_path: Path) -> None:
    app = SidecarApp(_config(tmp_path, enabled=False), telemetry_options={"environ": {}})
    await app.start()
    try:
        base = f"http://127.0.0.1:{app.ports['http']}"
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/metrics") as r:
                assert r.status == 404
            async with s.get(base + "/api/report") as r:
                assert r.status == 200
                assert (await r.json())["total_updates"] == 0
            async with s.get(base + "/dashboard") as r:
                assert r.status == 200
                assert "uPlot.iife.min.js" in await r.text()
            async with s.get(base + "/static/vendor/uplot/uPlot.iife.min.js") as r:
                assert r.status == 200
    finally:
        await app.shutdown()


@pytest.mark.parametrize(
    "doc",
    [
        {"improvement": 0.1},
        {"candidate_feedback_score": 0.7, "stable_feedback_score": 0.6},
        {"evidence": {"feedback_score": {"candidate": 0.7, "stable": 0.6}}},
        {"evidence": '{"candidate": {"reward": 0.7}, "stable": {"reward": 0.6}}'},
    ],
)
def test_telemetry_improvement_is_read_from_every_documented_shape(doc: dict[str, Any]) -> None:
    assert improvement_of(doc) == pytest.approx(0.1)


def test_telemetry_improvement_missing_or_not_finite_is_none() -> None:
    assert improvement_of({"evidence": {"samples": 3}}) is None
    assert improvement_of({"improvement": float("nan")}) is None


async def test_telemetry_report_figures_follow_their_definitions(tmp_path: Path) -> None:
    cfg = _config(tmp_path, velocity_window_days=7, recent_updates=2)
    store = Store(cfg.store)
    writer = StoreWriter(store, cfg.store)
    store.open()
    await writer.start()
    now = 100 * DAY_MS + 12 * 3_600_000  # noon
    entries: list[tuple[str, int, dict[str, Any]]] = [
        ("promoted", now - 10 * DAY_MS, {"version": "v2", "improvement": 0.10}),  # previous window
        ("rollback", now - 5 * DAY_MS, {"version": "v3", "reason": "error rate"}),
        (
            "rollout_transition",
            now - 2 * DAY_MS,
            {
                "rollout_id": "r4",
                "to_state": "CANARY",
                "evidence": {"feedback_score": {"candidate": 0.8, "stable": 0.6}},
            },
        ),
        ("promoted", now - 2 * DAY_MS, {"version": "v4", "rollout_id": "r4"}),  # from transition
        ("training_failed", now - DAY_MS, {"reason": "exit 1"}),
        ("promoted", now - 3_600_000, {"version": "v5", "improvement": -0.05}),
    ]
    try:
        for kind, at, data in entries:
            await writer.run(
                lambda txn, k=kind, t=at, d=data: append_history(txn, store, k, time_ms=t, **d)
            )
        r = LearningMonitor(store, cfg.telemetry).report_dict(now_ms=now)
    finally:
        await writer.shutdown()
        store.close()
    assert r["total_updates"] == 3
    assert r["updates_today"] == 1
    assert r["avg_improvement"] == pytest.approx((0.10 + 0.20 - 0.05) / 3)
    assert r["recent_improvement"] == pytest.approx((0.20 - 0.05) / 2)
    assert r["learning_velocity"] == pytest.approx((0.20 - 0.05) / 7)
    assert r["learning_velocity_previous"] == pytest.approx(0.10 / 7)
    # outcomes: v2 ok, rollback, v4 ok, failed run, v5 harmful -> 2 of 5
    assert r["stability_score"] == pytest.approx(2 / 5)
    assert r["stable_version"] == "v5"
    assert [u["version"] for u in r["updates"]] == ["v2", "v4", "v5"]
    assert r["events"][0]["summary"] == "v5 promoted (-0.050)"
