"""The learning report's section on selection, memory, holdout and feedback asks."""

from __future__ import annotations

from typing import Any

from sidecar.learning._active import ActiveLearner
from sidecar.learning._holdout import HoldoutSet
from sidecar.learning._memory import MemoryConsolidation

__all__ = ["learning_quality_report"]


def learning_quality_report(
    memory: MemoryConsolidation, holdout: HoldoutSet, active: ActiveLearner
) -> dict[str, Any]:
    """``{memory_size_per_task, memory_size, holdout_size, ask_rate, answer_rate, ...}``.

    For the report (``GetReport`` / ``/api/report``); the same figures are in
    status under ``memory``, ``holdout`` and ``active_learning``.
    """
    mem = memory.status()
    hold = holdout.status()
    act = active.status()
    return {
        "memory_size_per_task": mem["size_per_task"],
        "memory_size": mem["size"],
        "task_boundaries": mem["task_boundaries"],
        "holdout_size": hold["size"],
        "holdout_size_per_task": hold["size_per_task"],
        "ask_rate": act["ask_rate"],
        "answer_rate": act["answer_rate"],
        "asks": act["asks"],
        "answers": act["answers"],
    }
