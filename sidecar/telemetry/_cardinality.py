"""Bounds how many model versions get their own metric series, status and report entry.

Version names come from clients: 30,000 distinct ``model_version`` values
once made ``/metrics`` 7.7 MB and ``GetStatus`` too large to send. Past
``telemetry.max_versions`` the rest are folded into one entry, ``other``.
The stable version and the versions a rollout is routing to (``pinned``)
always keep their own entry, whatever the cap: they are the ones an operator
is watching.

Two shapes, because a metric series cannot be taken back once exported:

- :class:`VersionLabels` (metrics, the traffic view's stored buckets): a
  version keeps the label it got first. The first ``max_versions`` versions
  seen since start, and every pinned version, get their own; later ones are
  ``other``. The number of labels then grows only with the pinned versions
  (one candidate per rollout), never with what clients send.
- :func:`fold_versions` (status, report): computed per call from the current
  figures, so it keeps the most-used versions and folds the least-used.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

__all__ = ["OTHER", "VersionLabels", "fold_versions"]

#: The entry that versions beyond the cap are folded into.
OTHER = "other"


class VersionLabels:
    """Maps a model version to the label it is counted under (itself or ``other``).

    ``refresh()`` re-reads the pinned versions (call it once per batch, not
    per event); ``label()`` is a dict lookup.
    """

    def __init__(
        self, max_versions: int, pinned: Callable[[], Iterable[str]] | None = None
    ) -> None:
        self._max = max_versions
        self._pinned_source = pinned
        self._pinned: frozenset[str] = frozenset()
        self._admitted: set[str] = set()

    def refresh(self) -> None:
        if self._pinned_source is None:
            return
        try:
            self._pinned = frozenset(v for v in self._pinned_source() if v)
        except Exception:  # a failing source must not stop the metrics
            return

    def label(self, version: str) -> str:
        if version in self._admitted:
            return version
        if len(self._admitted) < self._max or version in self._pinned:
            self._admitted.add(version)
            return version
        return OTHER

    @property
    def labelled(self) -> int:
        """Versions with a label of their own."""
        return len(self._admitted)


def fold_versions(
    entries: Mapping[str, Mapping[str, Any]],
    max_versions: int,
    pinned: Collection[str] = (),
    *,
    weight: str = "requests",
) -> dict[str, dict[str, Any]]:
    """At most ``max_versions`` entries (plus the pinned ones) and ``other``.

    The pinned versions are kept, then the heaviest by ``weight``; the rest
    are summed into ``other`` (``{"versions": n, <each integer field>: sum}``),
    present only when something was folded. Ties keep the version that sorts
    first, so the answer is stable between calls.
    """
    if len(entries) <= max_versions:
        return {k: dict(v) for k, v in entries.items()}
    keep = [v for v in entries if v in pinned]
    rest = sorted(
        (v for v in entries if v not in pinned),
        key=lambda v: (-_num(entries[v].get(weight)), v),
    )
    room = max(0, max_versions - len(keep))
    keep += rest[:room]
    out = {v: dict(entries[v]) for v in sorted(keep)}
    folded = rest[room:]
    other: dict[str, Any] = {"versions": len(folded)}
    for v in folded:
        for key, value in entries[v].items():
            if isinstance(value, int) and not isinstance(value, bool):
                other[key] = other.get(key, 0) + value
    if OTHER in out:
        # a real version named "other" absorbs the fold rather than losing it
        for key, value in other.items():
            if isinstance(out[OTHER].get(key, 0), int):
                out[OTHER][key] = out[OTHER].get(key, 0) + value
    else:
        out[OTHER] = other
    return out


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
