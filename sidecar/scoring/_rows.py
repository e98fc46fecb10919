"""Dataset rows in the shapes TRL's trainers read, and their one encoding.

- SFT: ``{"prompt", "completion", "reward", "source"}`` for samples whose
  reward reaches the quality threshold.
- DPO: ``{"prompt", "chosen", "rejected", "margin", "reward", "source"}``
  for preference pairs; ``reward`` is the reward of the chosen completion
  (1.0 for a user's correction), ``margin`` chosen minus rejected.
- KTO: ``{"prompt", "completion", "label", "reward", "source"}`` for samples
  with feedback: ``label`` true when the reward reaches the quality
  threshold, false when the feedback was negative (signed score below 0).
  Samples in between are not clear enough either way and are left out.

``source`` is ``new`` for freshly scored data and ``replay`` for rows mixed in
from memory. Exports add ``"quarantined": true`` to rows of quarantined
sources when asked to list them. Every file and every export encodes rows
with :func:`encode_row`, so the same views give the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lmdb

from sidecar.scoring._views import Pair, Sample, iter_pairs, iter_samples
from sidecar.store import Store

__all__ = [
    "EXPORT_KINDS",
    "RowExclusion",
    "dpo_row",
    "encode_row",
    "iter_export_rows",
    "kto_label",
    "kto_row",
    "sft_row",
]

EXPORT_KINDS = ("sft", "dpo", "kto")

#: ``exclude(txn, request_ids, prompt)``: True keeps a row out of an export
#: (the holdout's ``HoldoutSet.excludes``).
RowExclusion = Callable[[lmdb.Transaction, Sequence[str], str], bool]


def encode_row(row: dict[str, Any]) -> str:
    """One JSONL line (without the newline): UTF-8 text, no spaces, key order kept."""
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def sft_row(s: Sample) -> dict[str, Any]:
    return {"prompt": s.prompt, "completion": s.completion, "reward": s.reward, "source": s.source}


def dpo_row(p: Pair) -> dict[str, Any]:
    return {
        "prompt": p.prompt,
        "chosen": p.chosen,
        "rejected": p.rejected,
        "margin": p.margin,
        "reward": p.reward,
        "source": p.source,
    }


def kto_label(s: Sample) -> bool | None:
    """True (desirable), False (undesirable) or None (left out of KTO)."""
    if not s.has_feedback:
        return None
    if s.qualifies:
        return True
    if s.signed < 0:
        return False
    return None


def kto_row(s: Sample) -> dict[str, Any] | None:
    label = kto_label(s)
    if label is None:
        return None
    return {
        "prompt": s.prompt,
        "completion": s.completion,
        "label": label,
        "reward": s.reward,
        "source": s.source,
    }


def _sample_quarantined(s: Sample | Pair, quarantine: dict[str, float] | frozenset[str]) -> bool:
    return any(src in quarantine for src in s.sources)


def iter_export_rows(
    txn: lmdb.Transaction,
    store: Store,
    kind: str,
    *,
    quarantine: dict[str, float] | frozenset[str],
    since_ms: int = 0,
    after_no: int = 0,
    include_quarantined: bool = False,
    exclude: RowExclusion | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(sample or pair number, row) for the current views, in stored order.

    Rows of quarantined sources are skipped, or listed with
    ``"quarantined": true`` when ``include_quarantined``. Rows that
    ``exclude`` rejects (held-out requests and prompts) are never listed.
    """
    if kind not in EXPORT_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(EXPORT_KINDS)}, got {kind!r}")
    if kind == "dpo":
        for p in iter_pairs(txn, store, after_no=after_no):
            if p.closed_ms < since_ms:
                continue
            if exclude is not None and exclude(txn, p.request_ids, p.prompt):
                continue
            row = dpo_row(p)
            if _sample_quarantined(p, quarantine):
                if not include_quarantined:
                    continue
                row["quarantined"] = True
            yield p.no, row
        return
    for s in iter_samples(txn, store, after_no=after_no):
        if s.closed_ms < since_ms:
            continue
        if kind == "sft":
            if not s.qualifies:
                continue
            srow: dict[str, Any] | None = sft_row(s)
        else:
            srow = kto_row(s)
        if srow is None:
            continue
        if exclude is not None and exclude(txn, (s.request_id,), s.prompt):
            continue
        if _sample_quarantined(s, quarantine):
            if not include_quarantined:
                continue
            srow["quarantined"] = True
        yield s.no, srow
