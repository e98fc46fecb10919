"""Value ordering end to end: Inference attributes and logprobs decide a snapshot's order.

Answers stream in through ``EventStream`` to a daemon (real gRPC, real
LMDB); the curated samples keep the task, user expertise, priority and
expected-score attributes and the logprobs; a manual trigger writes the
snapshot, whose new SFT rows come highest value first, cut at the value
threshold.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atlas_sidecar_client import EventStream

from sidecar.app import SidecarApp
from sidecar.scoring import iter_samples
from tests._helpers import MANUAL_LEARNING, dataset_dir, sft_rows, trigger_learning, wait_until
from tests.conftest import target_of

CERTAIN = [-0.01] * 6
UNSURE = [-3.0] * 6

#: (name, logprobs, attributes), sent in this order. With the expected score
#: given (no error signal) and memory empty (equal novelty), the value is
#: 0.3 u + 0.25 + 0.1 expertise + 0.15 priority (default weights):
#: unsure 0.615, critical 0.453, expert 0.383, plain 0.333.
ANSWERS = [
    ("plain", CERTAIN, {"priority": "low"}),
    ("expert", CERTAIN, {"priority": "low", "user_expertise": "expert"}),
    ("critical", CERTAIN, {"priority": "critical"}),
    ("unsure", UNSURE, {"priority": "low"}),
]


async def test_high_uncertainty_and_priority_rank_ahead(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    app: SidecarApp = await app_factory(
        **MANUAL_LEARNING, selective={"value_threshold": 0.35, "max_batch_samples": 0}
    )
    stream = EventStream(target_of(app))
    try:
        for name, logprobs, attrs in ANSWERS:
            stream.record_inference(
                f"req-{name}",
                "v1",
                prompt=f"how do I {name}?",
                response=f"like this: {name}",
                token_logprobs=logprobs,
                user_id="u1",
                attributes={"task_id": "help", "expected_score": "1.0", **attrs},
            )
            stream.record_feedback(f"req-{name}", rating=1.0)
        assert await stream.aflush(20)
        await wait_until(lambda: app.training.status()["samples"] == len(ANSWERS))

        # the curated samples carry what selective learning needs
        with app.store.read() as txn:
            samples = {s.request_id: s for s in iter_samples(txn, app.store)}
        critical = samples["req-critical"]
        assert critical.attribute("priority") == "critical"
        assert critical.attribute("task_id") == "help"
        assert critical.attribute("expected_score") == "1.0"
        assert samples["req-expert"].attribute("user_expertise") == "expert"
        assert samples["req-unsure"].logprob_mean == -3.0

        uid = await trigger_learning(app, "value order")
        # the report's quality section: memory consolidated from the 3 trained on
        quality = app.learning_quality()
        assert quality["memory_size_per_task"] == {"help": 3}
        assert quality["holdout_size"] == 0
        assert {"ask_rate", "answer_rate"} <= set(quality)
    finally:
        await stream.aclose()
        await app.shutdown()

    rows = sft_rows(app, uid)
    # highest value first, not arrival order; the plain answer is below the threshold
    assert [r["prompt"] for r in rows] == [
        "how do I unsure?",
        "how do I critical?",
        "how do I expert?",
    ]
    assert {r["source"] for r in rows} == {"new"}
    comp = json.loads((dataset_dir(app, uid) / "manifest.json").read_text())["composition"]
    assert comp["below_threshold"] == 1 and comp["new"] == 3
