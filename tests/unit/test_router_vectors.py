"""Router: the shared routing vectors, revisions and the lease fallback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from atlas_sidecar_client import Route, Router, TrafficSplit, routing_bucket
from atlas_sidecar_client.pb import control_pb2

VECTORS = Path(__file__).resolve().parents[2] / "clients" / "testdata" / "routing_vectors.json"


def _split(doc: dict[str, Any], revision: int = 1) -> TrafficSplit:
    shadow = doc.get("shadow") or {}
    return TrafficSplit(
        revision=revision,
        routes=tuple(Route(r["version"], r["weight_bps"]) for r in doc["routes"]),
        stable_version=doc.get("stable_version", ""),
        shadow_version=shadow.get("version", ""),
        mirror_bps=shadow.get("mirror_bps", 0),
    )


def _vectors() -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads(VECTORS.read_text())["vectors"]
    return vectors


def test_router_passes_every_shared_vector() -> None:
    vectors = _vectors()
    assert len(vectors) == 240
    failures = []
    for i, v in enumerate(vectors):
        router = Router(_split(v["split"]))
        d = router.route(v["request_id"], session_id=v["session_id"], user_id=v["user_id"])
        assert routing_bucket(v["key"]) == v["bucket"]
        if (d.bucket, d.version, d.mirror) != (v["bucket"], v["expected_version"], v["mirror"]):
            failures.append((i, v["key"], d))
        if d.mirror:
            assert d.mirror_version == v["split"]["shadow"]["version"]
    assert failures == []


def test_router_vectors_through_the_wire_message() -> None:
    # The same vectors, with the split as the sidecar sends it.
    for v in _vectors()[:60]:
        msg = _split(v["split"]).to_proto()
        router = Router()
        assert router.apply(control_pb2.SetTrafficSplit.FromString(msg.SerializeToString()))
        d = router.route(v["request_id"], session_id=v["session_id"], user_id=v["user_id"])
        assert (d.version, d.mirror) == (v["expected_version"], v["mirror"])


def test_router_ignores_older_and_equal_revisions() -> None:
    router = Router()
    assert router.apply(TrafficSplit.single("v1", revision=3))
    assert not router.apply(TrafficSplit.single("v2", revision=2))
    assert not router.apply(TrafficSplit.single("v2", revision=3))
    assert router.route("r").version == "v1"
    assert router.apply(TrafficSplit.single("v2", revision=4))
    assert router.route("r").version == "v2"


def test_router_without_split_uses_the_default() -> None:
    assert Router(default_version="base").route("r").version == "base"


def test_router_sticky_key_keeps_a_session_on_its_version_as_the_canary_grows() -> None:
    keys = [f"session-{i}" for i in range(2000)]
    small = Router(TrafficSplit(1, (Route("v2", 500), Route("v1", 9500)), stable_version="v1"))
    large = Router(TrafficSplit(2, (Route("v2", 1000), Route("v1", 9000)), stable_version="v1"))
    on_canary = [k for k in keys if small.route(session_id=k).version == "v2"]
    assert on_canary
    assert all(large.route(session_id=k).version == "v2" for k in on_canary)


def test_router_falls_back_to_stable_after_the_lease() -> None:
    now = [100.0]
    router = Router(clock=lambda: now[0])
    router.apply(
        TrafficSplit(
            1,
            (Route("v1", 0), Route("v2", 10000)),
            stable_version="v1",
            shadow_version="v3",
            mirror_bps=10000,
            lease_seconds=30,
        )
    )
    assert router.route("r").version == "v2"
    router.sidecar_lost()
    now[0] += 29
    d = router.route("r")
    assert (d.version, d.mirror_version, d.fallback) == ("v2", "v3", False)
    now[0] += 2
    d = router.route("r")
    assert (d.version, d.mirror, d.fallback) == ("v1", False, True)
    assert router.fallbacks == 1
    router.sidecar_connected()
    assert router.route("r").version == "v2"


def test_router_without_lease_never_falls_back() -> None:
    now = [0.0]
    router = Router(
        TrafficSplit(1, (Route("v2", 10000),), stable_version="v1"), clock=lambda: now[0]
    )
    router.sidecar_lost()
    now[0] += 1e6
    assert router.route("r").version == "v2"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"routes": (Route("v1", -1),)}, "routes[0].weight_bps"),
        ({"routes": (), "mirror_bps": 10001}, "mirror_bps"),
        ({"routes": (), "lease_seconds": -1}, "lease_seconds"),
    ],
)
def test_router_split_names_the_bad_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        TrafficSplit(revision=1, **kwargs)
