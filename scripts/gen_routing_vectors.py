"""Writes clients/testdata/routing_vectors.json from the routing rule itself.

The rule (DESIGN.md section 3), written here independently of any client:
  key    = session_id or user_id or request_id (first non-empty)
  bucket = uint64_be(sha256(utf8(key))[0:8]) % 10000
  route  = first route whose running sum of weight_bps exceeds bucket;
           none (weights sum below the bucket): the split's stable_version,
           or the first route when stable_version is empty
  mirror = shadow.mirror_bps > 0 and bucket < shadow.mirror_bps
Every client library must reproduce every vector.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "clients" / "testdata" / "routing_vectors.json"


def bucket(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 10000


def route(b: int, split: dict) -> str:
    total = 0
    for r in split["routes"]:
        total += r["weight_bps"]
        if total > b:
            return str(r["version"])
    if split.get("stable_version"):
        return str(split["stable_version"])
    return str(split["routes"][0]["version"]) if split["routes"] else ""


def main() -> None:
    rng = random.Random(20261126)
    splits = [
        {"routes": [{"version": "v1", "weight_bps": 10000}], "stable_version": "v1"},
        {
            "routes": [{"version": "v1", "weight_bps": 9900}, {"version": "v2", "weight_bps": 100}],
            "stable_version": "v1",
        },
        {
            "routes": [{"version": "v1", "weight_bps": 9500}, {"version": "v2", "weight_bps": 500}],
            "stable_version": "v1",
        },
        {
            "routes": [
                {"version": "v1", "weight_bps": 5000},
                {"version": "v2", "weight_bps": 5000},
            ],
            "stable_version": "v1",
        },
        {
            "routes": [
                {"version": "v2", "weight_bps": 2500},
                {"version": "v1", "weight_bps": 7500},
            ],
            "stable_version": "v1",
        },
        {
            "routes": [
                {"version": "a", "weight_bps": 3333},
                {"version": "b", "weight_bps": 3333},
                {"version": "c", "weight_bps": 3334},
            ],
            "stable_version": "a",
        },
        {
            "routes": [{"version": "v1", "weight_bps": 0}, {"version": "v2", "weight_bps": 10000}],
            "stable_version": "v1",
        },
        {"routes": [{"version": "v1", "weight_bps": 6000}], "stable_version": "v0"},
        {"routes": [{"version": "v1", "weight_bps": 4000}], "stable_version": ""},
    ]
    shadows = [
        None,
        {"version": "v9", "mirror_bps": 0},
        {"version": "v9", "mirror_bps": 1000},
        {"version": "v9", "mirror_bps": 5000},
        {"version": "v9", "mirror_bps": 10000},
    ]
    fixed_keys = [
        "",
        "a",
        "req-1",
        "session-42",
        "user-7",
        "ünïcødé-ключ-键",
        "🙂",
        "x" * 300,
        "00000000-0000-7000-8000-000000000000",
    ]
    vectors = []
    n = 0
    while len(vectors) < 240:
        request_id = (
            fixed_keys[n]
            if n < len(fixed_keys) and fixed_keys[n]
            else f"req-{rng.getrandbits(40):x}"
        )
        form = n % 4
        session_id = f"sess-{rng.getrandbits(32):x}" if form == 1 else ""
        user_id = f"user-{rng.getrandbits(24)}" if form in (1, 2) else ""
        if form == 3 and n < len(fixed_keys):
            session_id = fixed_keys[n]
        key = session_id or user_id or request_id
        if not key:
            n += 1
            continue
        split = dict(splits[n % len(splits)])
        shadow = shadows[(n // len(splits)) % len(shadows)]
        if shadow is not None:
            split["shadow"] = shadow
        b = bucket(key)
        mirror = bool(shadow) and shadow["mirror_bps"] > 0 and b < shadow["mirror_bps"]
        vectors.append(
            {
                "request_id": request_id,
                "session_id": session_id,
                "user_id": user_id,
                "key": key,
                "bucket": b,
                "split": split,
                "expected_version": route(b, split),
                "mirror": mirror,
            }
        )
        n += 1
    doc = {
        "rule": __doc__.strip().splitlines()[2:9],
        "vectors": vectors,
    }
    OUT.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(vectors)} vectors to {OUT}")


if __name__ == "__main__":
    main()
