"""/dashboard in a real headless Chromium during a run that promoted an update.

The daemon runs in-process (real gRPC, real LMDB, real HTTP). Traffic goes in
through IngestService; the learning history is written through the store's
writer, the way the learning and rollout stages write it. Chromium is driven
over the DevTools protocol (aiohttp's websocket client; no extra package).
The screenshot is saved to test-artifacts/dashboard.png.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from atlas_sidecar_client import ChannelSecurity, open_aio_channel
from atlas_sidecar_client.pb import events_pb2, ingest_pb2_grpc

from sidecar.app import SidecarApp
from sidecar.config import load_config
from sidecar.store import append_history
from sidecar.testing import free_port, write_test_tokens

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


class DevTools:
    """Just enough of the Chrome DevTools protocol: one page, flat sessions."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self.session: str | None = None

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        await self._ws.send_str(json.dumps(msg))
        while True:
            reply = json.loads((await self._ws.receive(timeout=30)).data)
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        res = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(path).exists(), "chromium is not installed: `make test` installs it (apt)"
    return path


async def _launch(profile: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        _chromium(),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while loop.time() < deadline:
        raw = await asyncio.wait_for(proc.stderr.readline(), timeout=60)
        line = raw.decode(errors="replace")
        if not line:
            break
        found = re.search(r"DevTools listening on (ws://\S+)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise RuntimeError("chromium did not start")


def _inference(eid: str, version: str, latency: float, error: bool = False) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=eid,
        inference=events_pb2.Inference(
            request_id=eid, model_version=version, latency_ms=latency, error=error
        ),
    )


async def _round(
    stub: Any, rng: random.Random, tag: str, versions: dict[str, float], n: int = 80
) -> None:
    """n requests split by ``versions`` (version -> share); feedback whose
    quality rises with the version."""
    quality = {"v1": 0.55, "v2": 0.72, "v3": 0.78}
    events = []
    names = list(versions)
    weights = [versions[v] for v in names]
    for i in range(n):
        version = rng.choices(names, weights)[0]
        eid = f"{tag}-{i}"
        events.append(_inference(eid, version, rng.uniform(40, 160), error=rng.random() < 0.02))
        if rng.random() < 0.8:
            good = rng.random() < quality[version]
            signal = rng.choice(
                [events_pb2.COPY, events_pb2.SHARE, events_pb2.ENGAGE, events_pb2.THUMBS_UP]
                if good
                else [events_pb2.RETRY, events_pb2.DISMISS, events_pb2.THUMBS_DOWN]
            )
            fb = events_pb2.Feedback(request_id=eid, signal=signal)
            if rng.random() < 0.3:
                fb.rating = rng.uniform(0.6, 1.0) if good else rng.uniform(0.0, 0.4)
            events.append(events_pb2.Event(event_id=f"{eid}-fb", feedback=fb))
    ack = await stub.RecordEvents(events_pb2.EventBatch(events=events))
    assert ack.accepted == len(events)


async def _history(app: SidecarApp, kind: str, **data: Any) -> None:
    await app.writer.run(lambda txn: append_history(txn, app.store, kind, **data))


@pytest.mark.timeout(120)
async def test_dashboard_renders_every_panel_in_chromium(tmp_path: Path) -> None:
    http_port = free_port()
    # Auth on: the browser is sent to /login and signs in with a read token.
    tokens = write_test_tokens(tmp_path / "tokens.yaml")
    cfg = load_config(
        environ={},
        overrides={
            "store": {"data_dir": str(tmp_path / "data")},
            "server": {"listen": ["127.0.0.1:0"], "http_listen": f"127.0.0.1:{http_port}"},
            "auth": {"tokens_file": str(tmp_path / "tokens.yaml")},
            "telemetry": {"report_bucket_seconds": 1, "dashboard_refresh_seconds": 1},
        },
    )
    app = SidecarApp(cfg, telemetry_options={"environ": {}})
    await app.start()
    rng = random.Random(7)
    try:
        target = f"127.0.0.1:{next(p for a, p in app.ports.items() if a != 'http')}"
        async with open_aio_channel(target, ChannelSecurity(token=tokens["all"])) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            for r in range(3):
                await _round(stub, rng, f"a{r}", {"v1": 1.0})
                await asyncio.sleep(1.05)
            await _history(app, "trigger", reason="count: 120 new samples >= 100")
            await _history(app, "dataset", update_id="u-0001", samples=120, pairs=18)
            await _history(app, "training_started", update_id="u-0001")
            await _history(app, "training_succeeded", update_id="u-0001", version="v2")
            await _history(app, "candidate_registered", version="v2", update_id="u-0001")
            for frm, to, stage, w in (
                ("PENDING", "VALIDATING", 0, 0),
                ("VALIDATING", "SHADOW", 0, 0),
                ("SHADOW", "CANARY", 0, 100),
                ("CANARY", "CANARY", 3, 2500),
            ):
                await _history(  # the rollout engine's field names
                    app,
                    "rollout_transition",
                    rollout_id="ro-1",
                    candidate="v2",
                    stable="v1",
                    strategy="canary",
                    **{"from": frm, "to": to},
                    stage_index=stage,
                    weight_bps=w,
                    reason="guardrails passed",
                    evidence={"candidate_score": 0.71, "stable_score": 0.58},
                )
            await _history(
                app,
                "promoted",
                rollout_id="ro-1",
                candidate="v2",
                stable="v1",
                update_id="u-0001",
                candidate_score=0.71,
                stable_score=0.58,
                improvement=0.13,
            )
            for r in range(3):
                await _round(stub, rng, f"b{r}", {"v2": 1.0})
                await asyncio.sleep(1.05)
            await _history(app, "candidate_registered", version="v3", update_id="u-0002")
            await _history(
                app,
                "rollout_transition",
                rollout_id="ro-2",
                candidate_version="v3",
                stable_version="v2",
                from_state="SHADOW",
                to_state="CANARY",
                stage_index=1,
                candidate_weight_bps=500,
                reason="stage 1: dwell 300 s, 240 samples",
                evidence={
                    "feedback_score": {"candidate": 0.76, "stable": 0.71},
                    "error_rate": {"candidate": 0.01, "stable": 0.02},
                    "latency_p99_ms": {"candidate": 151.0, "stable": 149.0},
                    "e_value": 2.4,
                },
            )
            for r in range(2):
                await _round(stub, rng, f"c{r}", {"v2": 0.95, "v3": 0.05})
        assert app.telemetry.traffic is not None
        await app.telemetry.traffic.wait_idle()

        ARTIFACTS.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
            proc, ws_url = await _launch(profile)
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.ws_connect(ws_url, max_msg_size=64 << 20) as ws,
                ):
                    cdp = DevTools(ws)
                    target_id = (await cdp.send("Target.createTarget", url="about:blank"))[
                        "targetId"
                    ]
                    cdp.session = (
                        await cdp.send("Target.attachToTarget", targetId=target_id, flatten=True)
                    )["sessionId"]
                    await cdp.send(
                        "Emulation.setDeviceMetricsOverride",
                        width=1440,
                        height=1180,
                        deviceScaleFactor=1,
                        mobile=False,
                    )
                    await cdp.send("Page.enable")
                    await cdp.send("Page.navigate", url=f"http://127.0.0.1:{http_port}/dashboard")
                    login: Any = None
                    for _ in range(100):
                        login = await cdp.evaluate(
                            "document.querySelector('form[action=\"/login\"]') ? location.pathname"
                            " : null"
                        )
                        if login:
                            break
                        await asyncio.sleep(0.1)
                    assert login == "/login"  # an unsigned browser is sent to sign in
                    await cdp.evaluate(
                        "document.querySelector('input[name=token]').value = "
                        + json.dumps(tokens["read"])
                        + "; document.querySelector('form').submit(); true"
                    )
                    state: dict[str, Any] = {}
                    for _ in range(200):
                        state = await cdp.evaluate(
                            "({loaded: document.body && document.body.dataset.loaded === 'true',"
                            " panels: Array.from(document.querySelectorAll('[data-panel]'))"
                            ".map(p => [p.dataset.panel, p.dataset.filled]),"
                            " canvases: document.querySelectorAll('.uplot canvas').length})"
                        )
                        if state and state["loaded"]:
                            break
                        await asyncio.sleep(0.1)
                    texts = await cdp.evaluate(
                        "Object.fromEntries(['total-updates','avg-improvement','learning-velocity',"
                        "'stability','rollout-state','events','traffic-body','feedback-total',"
                        "'stable-version'].map(id => [id, document.getElementById(id).innerText]))"
                    )
                    await asyncio.sleep(0.3)  # let the canvases paint
                    shot = await cdp.send("Page.captureScreenshot", format="png")
                    (ARTIFACTS / "dashboard.png").write_bytes(base64.b64decode(shot["data"]))
            finally:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), timeout=10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
    finally:
        await app.shutdown()

    assert state["loaded"], state
    assert app.auth.denied[("http", "missing_token")] >= 1
    panels = dict(state["panels"])
    assert set(panels) == {"cards", "performance", "rollout", "traffic", "feedback", "events"}
    assert all(v == "true" for v in panels.values()), panels
    assert state["canvases"] >= 2  # the two charts drew
    assert texts["total-updates"] == "1"
    assert texts["avg-improvement"] == "+0.130"
    assert texts["rollout-state"].startswith("CANARY")
    assert "v2 promoted" in texts["events"]
    assert "v3" in texts["traffic-body"] and "v2" in texts["traffic-body"]
    assert texts["stable-version"] == "stable: v2"
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
