"""What happens when the scoring processor curates a sample: the holdout decision.

:class:`HoldoutAtCuration.on_document` is a ``FeedbackProcessor`` sample
document listener (it takes the stored sample document, so no ``Sample`` is
built per scored answer on the processing path). It runs on the writer
thread inside the transaction that stores the sample, so a good sample's
holdout decision is made exactly when the sample first exists
and is as durable as the sample itself; a replay of the log (after a crash
or ``atlas-sidecar reprocess``) meets the stored decision and keeps it.

Valuing and memory consolidation are not done here but when a learning
batch is composed (:class:`SelectiveReplayStep`), on the samples actually
offered for training: novelty is measured against the memory as it is at
that moment, and memory keeps only samples that were trained on. Doing it
per sample on the processing path would vectorize and read a task's whole
memory for every curated sample.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lmdb

from sidecar.config import SidecarConfig
from sidecar.learning._holdout import HoldoutSet

__all__ = ["HoldoutAtCuration", "curation_options", "sample_task", "task_from"]


def curation_options(config: SidecarConfig) -> dict[str, Any]:
    """``FeedbackProcessor`` keyword options that make curated samples carry what
    selective learning values them by: the task attribute and the expertise,
    priority and expected-score attributes (the daemon and ``reprocess`` share it)."""
    sel = config.selective
    return {
        "task_attribute": config.memory.task_attribute,
        "sample_attributes": (
            sel.expertise_attribute,
            sel.priority_attribute,
            sel.expected_score_attribute,
        ),
    }


def task_from(
    attributes: Iterable[Sequence[str]], task_id: str, task_attribute: str, default_task: str
) -> str:
    """A curated sample's task: its kept task attribute (``attributes`` are
    (key, value) pairs), else its ``task_id``, else the default."""
    for key, value in attributes:
        if key == task_attribute:
            return value or task_id or default_task
    return task_id or default_task


def sample_task(sample: Any, task_attribute: str, default_task: str) -> str:
    """:func:`task_from` of a :class:`~sidecar.scoring.Sample` (or an object with
    its ``task_id`` and, maybe, ``attributes``)."""
    return task_from(
        getattr(sample, "attributes", ()), sample.task_id, task_attribute, default_task
    )


class HoldoutAtCuration:
    """Sample document listener (``on_document``): sets a good sample aside for
    the holdout (or not), once.

    ``HoldoutAtCuration.for_config(holdout, config)`` takes the task naming
    from the memory section, so holdout strata and memory tasks agree.
    """

    @classmethod
    def for_config(cls, holdout: HoldoutSet, config: SidecarConfig) -> HoldoutAtCuration:
        return cls(
            holdout,
            task_attribute=config.memory.task_attribute,
            default_task=config.memory.default_task,
        )

    def __init__(self, holdout: HoldoutSet, *, task_attribute: str, default_task: str) -> None:
        self._holdout = holdout
        self._task_attribute = task_attribute
        self._default_task = default_task
        self.assigned = 0
        self.held = 0

    def on_document(self, txn: lmdb.Transaction, doc: Mapping[str, Any]) -> None:
        """A ``SampleDocumentListener``: decides a good sample's holdout from the
        stored sample document."""
        if not doc["qualifies"]:
            return
        task = task_from(
            doc["attributes"], doc["task_id"], self._task_attribute, self._default_task
        )
        held = self._holdout.assign(
            txn,
            doc["request_id"],
            task,
            doc["prompt"],
            doc["completion"],
            doc["reward"],
            now_ms=doc["closed_ms"],
        )
        self.assigned += 1
        self.held += int(held)
