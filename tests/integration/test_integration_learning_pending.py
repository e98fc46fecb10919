"""A full learning batch leaves good samples pending for the next update.

A daemon (real gRPC, real LMDB) with ``selective.max_batch_samples`` 4 gets
eight valuable answers and eight plain ones. Consecutive manual triggers
export disjoint sets of new rows, highest value first: the eight valuable
answers over the first two snapshots (the second also ranks the answers that
arrived in between, and runs after a restart of the daemon), the plain ones
after them; nothing is exported twice, and the status's pending count says
what is left at every step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atlas_sidecar_client import EventStream

from sidecar.app import SidecarApp
from tests._helpers import MANUAL_LEARNING, sft_rows, trigger_learning, wait_until
from tests.conftest import target_of

CERTAIN = [-0.01] * 6
UNSURE = [-3.0] * 6

CONFIG: dict[str, dict[str, Any]] = {
    **MANUAL_LEARNING,
    "selective": {"value_threshold": 0.2, "max_batch_samples": 4},
}


async def _send(app: SidecarApp, names: list[str], *, valuable: bool) -> None:
    stream = EventStream(target_of(app))
    try:
        for name in names:
            stream.record_inference(
                f"req-{name}",
                "v1",
                prompt=f"question {name}: " + name * 5,
                response=f"answer {name}",
                token_logprobs=UNSURE if valuable else CERTAIN,
                user_id="u1",
                attributes={
                    "task_id": "help",
                    "expected_score": "1.0",
                    "priority": "critical" if valuable else "low",
                },
            )
            stream.record_feedback(f"req-{name}", rating=1.0)
        assert await stream.aflush(20)
    finally:
        await stream.aclose()


async def _trigger(app: SidecarApp) -> list[str]:
    """Fires an update and returns the request ids of its new SFT rows, in order."""
    rows = sft_rows(app, await trigger_learning(app, "pending"))
    prompts = [r["prompt"].split(":")[0].removeprefix("question ") for r in rows]
    return [p for p, r in zip(prompts, rows, strict=True) if r["source"] == "new"]


def _pending(app: SidecarApp) -> int:
    return int(app.training.status()["pending_samples"])


async def test_samples_a_full_batch_left_out_are_exported_by_the_next_updates(
    app_factory: Callable[..., Any],
) -> None:
    valuable = [f"top{i}" for i in range(8)]
    plain = [f"plain{i}" for i in range(8)]
    app: SidecarApp = await app_factory(**CONFIG)
    try:
        for part in (0, 4):  # arrival order is not value order
            await _send(app, plain[part : part + 4], valuable=False)
            await _send(app, valuable[part : part + 4], valuable=True)
        await wait_until(lambda: app.training.status()["samples"] == 16)
        assert _pending(app) == 16
        first = await _trigger(app)
        assert len(first) == 4 and set(first) <= set(valuable)
        # twelve good samples were left out only because the batch was full
        assert _pending(app) == 12
        assert app.selective.status()["pending"] == 12
    finally:
        await app.shutdown()

    # Pending samples are stored: a restarted daemon still has them.
    app = await app_factory(**CONFIG)
    try:
        assert _pending(app) == 12
        await _send(app, ["late0", "late1"], valuable=False)
        await wait_until(lambda: app.training.status()["samples"] == 18)
        assert _pending(app) == 14
        second = await _trigger(app)
        assert _pending(app) == 10
        third = await _trigger(app)
        assert _pending(app) == 6
    finally:
        await app.shutdown()

    # Disjoint, together the eight valuable answers, and nothing twice.
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(valuable)
    assert len(third) == 4 and set(third) <= {*plain, "late0", "late1"}
    exported = first + second + third
    assert len(exported) == len(set(exported))
    folder = Path(app.config.store.data_dir) / "datasets"
    manifests = sorted(folder.glob("*/manifest.json"))
    comp = json.loads(manifests[1].read_text())
    assert comp["carried_samples"] == 12
    assert comp["composition"]["carried"] == 12 and comp["composition"]["pending"] == 10
