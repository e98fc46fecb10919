"""What happens when the scoring processor curates a sample: the holdout decision.

:class:`HoldoutAtCuration` is a ``FeedbackProcessor`` sample listener (its
``on_document`` takes the stored sample document, so no ``Sample`` is built
per scored answer on the processing path). It runs
on the writer thread inside the transaction that stores the sample, so a
good sample's holdout decision is made exactly when the sample first exists
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

from collections.abc import Mapping
from typing import Any

import lmdb

from sidecar.config import SidecarConfig
from sidecar.learning._holdout import HoldoutSet
from sidecar.learning._keys import task_of

__all__ = ["HoldoutAtCuration", "curation_options", "sample_task"]


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


def sample_task(sample: Any, task_attribute: str, default_task: str) -> str:
    """A curated sample's task: its kept task attribute, else its ``task_id``, else the default."""
    attribute = getattr(sample, "attribute", None)
    named = attribute(task_attribute) if attribute is not None else ""
    return named or task_of({"task_id": sample.task_id}, "task_id", default_task)


class HoldoutAtCuration:
    """Sample listener: sets a good sample aside for the holdout (or not), once.

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

    def __call__(self, txn: lmdb.Transaction, sample: Any) -> None:
        """A ``SampleListener``: takes a :class:`~sidecar.scoring.Sample`."""
        if not sample.qualifies:
            return
        task = sample_task(sample, self._task_attribute, self._default_task)
        self._assign(
            txn,
            sample.request_id,
            task,
            sample.prompt,
            sample.completion,
            sample.reward,
            sample.closed_ms,
        )

    def on_document(self, txn: lmdb.Transaction, doc: Mapping[str, Any]) -> None:
        """A ``SampleDocumentListener``: the same decision from the stored sample
        document, without building a ``Sample`` for every scored answer."""
        if not doc["qualifies"]:
            return
        name = self._task_attribute
        task = ""
        for key, value in doc["attributes"]:
            if key == name:
                task = value
                break
        task = task or doc["task_id"] or self._default_task
        self._assign(
            txn,
            doc["request_id"],
            task,
            doc["prompt"],
            doc["completion"],
            doc["reward"],
            doc["closed_ms"],
        )

    def _assign(
        self,
        txn: lmdb.Transaction,
        request_id: str,
        task: str,
        prompt: str,
        completion: str,
        reward: float,
        closed_ms: int,
    ) -> None:
        held = self._holdout.assign(
            txn, request_id, task, prompt, completion, reward, now_ms=closed_ms
        )
        self.assigned += 1
        self.held += int(held)
