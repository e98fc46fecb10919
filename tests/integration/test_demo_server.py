"""The reference inference server as a real process, driven by a real sidecar's control channel."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from atlas_sidecar_client.pb import events_pb2

from sidecar.app import SidecarApp
from sidecar.control import DesiredState, RouteSpec, ShadowSpec
from sidecar.demo._policy import Policy, SftRow
from sidecar.demo._world import World
from sidecar.store import decode_log_value

WAIT = 30.0


async def _until(pred: Callable[[], Any], what: str) -> Any:
    try:
        async with asyncio.timeout(WAIT):
            while True:
                value = pred()
                if asyncio.iscoroutine(value):
                    value = await value
                if value:
                    return value
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.fixture
def models(tmp_path: Path) -> Path:
    world = World()
    v1 = world.initial_policy("v1")
    v1.save(tmp_path / "models" / "v1")
    v2 = v1.copy("v2")
    rows = [SftRow(p.text, world.best_answer(p.intent)) for p in world.all_prompts()]
    v2.fit(rows, [], steps=100)
    v2.save(tmp_path / "models" / "v2")
    return tmp_path / "models"


@pytest.fixture
async def server(sidecar: SidecarApp, models: Path, tmp_path: Path) -> AsyncIterator[str]:
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115, ASYNC230 - closed below
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar.demo.server",
        "--sidecar",
        next(iter(sidecar.ports)),
        "--models-dir",
        str(models),
        "--initial-version",
        "v1",
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), WAIT)
    assert line, (tmp_path / "server.log").read_text()
    ready = json.loads(line)
    yield f"http://127.0.0.1:{ready['port']}"
    proc.terminate()
    assert await asyncio.wait_for(proc.wait(), WAIT) == 0
    log.close()


async def _state(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/v1/state") as resp:
        return dict(await resp.json())


def _events(app: SidecarApp) -> list[events_pb2.Event]:
    out = []
    with app.store.read() as txn:
        for _, raw in txn.cursor(db=app.store.db("events")):
            out.append(events_pb2.Event.FromString(decode_log_value(raw)[1]))
    return out


async def test_serves_reports_and_relays_feedback(sidecar: SidecarApp, server: str) -> None:
    async with aiohttp.ClientSession() as http:
        await _until(lambda: _connected(http, server), "the server's Hello")
        async with http.post(
            server + "/v1/answer",
            json={"prompt": "will it rain in oslo tomorrow", "user_id": "u1", "session_id": "s1"},
        ) as resp:
            answer = await resp.json()
        assert answer["version"] == "v1"
        assert answer["answer"] in World().answers
        assert all(lp <= 0 for lp in answer["token_logprobs"])
        assert len(answer["token_logprobs"]) == len(answer["answer"].split())
        async with http.post(
            server + "/v1/feedback",
            json={"request_id": answer["request_id"], "signal": "COPY", "rating": 0.0},
        ) as resp:
            assert resp.status == 200
        for bad, field in (
            ({"user_id": "u1"}, "prompt"),
            ({"request_id": "r", "signal": "LIKE"}, "signal"),
            ({"request_id": "r", "rating": 2}, "rating"),
        ):
            path = "/v1/answer" if field == "prompt" else "/v1/feedback"
            async with http.post(server + path, json=bad) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"].startswith(field)

    def stored() -> list[events_pb2.Event]:
        evs = _events(sidecar)
        return evs if len(evs) >= 2 else []

    evs = await _until(stored, "both events stored")
    inf = next(e.inference for e in evs if e.WhichOneof("payload") == "inference")
    fb = next(e.feedback for e in evs if e.WhichOneof("payload") == "feedback")
    assert inf.request_id == answer["request_id"] and inf.model_version == "v1"
    assert inf.role == events_pb2.PRIMARY and inf.session_id == "s1"
    assert list(inf.token_logprobs) == pytest.approx(answer["token_logprobs"], abs=1e-5)
    assert fb.request_id == answer["request_id"] and fb.signal == events_pb2.COPY
    assert fb.HasField("rating") and fb.rating == 0.0


async def _connected(http: aiohttp.ClientSession, url: str) -> bool:
    return bool((await _state(http, url))["connected"])


async def test_loads_splits_mirrors_probes_and_rolls_back(
    sidecar: SidecarApp, server: str, models: Path
) -> None:
    world = World()
    async with aiohttp.ClientSession() as http:
        await _until(lambda: _connected(http, server), "the server's Hello")
        await sidecar.control.apply(
            DesiredState(
                revision=1,
                loaded=frozenset({"v1", "v2"}),
                routes=(RouteSpec("v1", 7500), RouteSpec("v2", 2500)),
                stable_version="v1",
                shadow=ShadowSpec("v2", 5000),
                lease_seconds=30,
                artifacts={"v2": (models / "v2").as_uri()},
            )
        )

        async def split_applied() -> bool:
            st = await _state(http, server)
            return bool(st["split"]["revision"] == 1 and "v2" in st["loaded"])

        await _until(split_applied, "v2 loaded and the split applied")
        prompts = world.all_prompts()
        by_session: dict[str, set[str]] = {}
        served: Counter[str] = Counter()
        for i in range(400):
            session = f"s{i % 80}"
            async with http.post(
                server + "/v1/answer",
                json={"prompt": prompts[i % len(prompts)].text, "session_id": session},
            ) as resp:
                doc = await resp.json()
            by_session.setdefault(session, set()).add(doc["version"])
            served[doc["version"]] += 1
        # sticky per session, and roughly the split's shares
        assert all(len(v) == 1 for v in by_session.values())
        assert 0.1 < served["v2"] / 400 < 0.45
        st = await _state(http, server)
        assert 0 < st["mirrored"].get("v2", 0) < 400

        probe_id = await sidecar.control.run_probe("v2", [p.text for p in world.all_prompts()[:6]])
        await _until(
            lambda: (p := sidecar.control.probe(probe_id)) is not None and p.state == "done",
            "probe answered",
        )
        await sidecar.control.apply(
            DesiredState(
                revision=2,
                loaded=frozenset({"v1"}),
                routes=(RouteSpec("v1", 10000),),
                stable_version="v1",
            )
        )

        async def rolled_back() -> bool:
            st = await _state(http, server)
            return bool(st["split"]["revision"] == 2 and st["loaded"] == ["v1"])

        await _until(rolled_back, "rollback applied and v2 unloaded")
        st = await _state(http, server)
        assert [s["routes"] for s in st["splits"]] == [
            [["v1", 7500], ["v2", 2500]],
            [["v1", 10000]],
        ]

    evs = [e.inference for e in _events(sidecar) if e.WhichOneof("payload") == "inference"]
    shadows = [e for e in evs if e.role == events_pb2.SHADOW]
    assert shadows and all(e.model_version == "v2" for e in shadows)
    primary = {e.request_id for e in evs if e.role == events_pb2.PRIMARY}
    assert all(e.attributes["mirror_of"] in primary for e in shadows)
    probes = sorted(
        (e for e in evs if e.role == events_pb2.PROBE),
        key=lambda e: int(e.attributes["probe_index"]),
    )
    assert len(probes) == 6
    v2 = Policy.load(models / "v2")
    for e in probes:
        assert e.model_version == "v2"
        assert e.response == v2.greedy(e.prompt).answer
