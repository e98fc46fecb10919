"""fold_versions and VersionLabels: bounded entries, pinned versions kept, nothing lost."""

from __future__ import annotations

from sidecar.telemetry._cardinality import OTHER, VersionLabels, fold_versions


def test_fold_keeps_the_pinned_and_the_most_used_and_sums_the_rest() -> None:
    entries = {f"v{i}": {"requests": i, "errors": 1, "error_rate": 0.5} for i in range(10)}
    out = fold_versions(entries, 4, pinned={"v0"})
    assert set(out) == {"v0", "v9", "v8", "v7", OTHER}
    assert out[OTHER] == {"versions": 6, "requests": 1 + 2 + 3 + 4 + 5 + 6, "errors": 6}
    assert sum(e["requests"] for e in out.values()) == sum(range(10))


def test_fold_under_the_cap_changes_nothing() -> None:
    entries = {"a": {"requests": 1}, "b": {"requests": 2}}
    assert fold_versions(entries, 2) == entries


def test_a_version_named_other_absorbs_the_fold() -> None:
    entries = {OTHER: {"requests": 5}, "a": {"requests": 9}, "b": {"requests": 1}}
    out = fold_versions(entries, 1, pinned={OTHER})
    assert out == {OTHER: {"requests": 15, "versions": 2}}


def test_labels_are_sticky_and_bounded_except_for_pinned_versions() -> None:
    pinned: set[str] = set()
    labels = VersionLabels(3, lambda: pinned)
    labels.refresh()
    assert [labels.label(v) for v in ("a", "b", "c", "d")] == ["a", "b", "c", OTHER]
    pinned.add("e")
    assert labels.label("e") == OTHER  # pinned versions are re-read once per batch
    labels.refresh()
    assert labels.label("e") == "e"
    pinned.clear()
    labels.refresh()
    assert labels.label("e") == "e" and labels.label("a") == "a"
    assert labels.label("f") == OTHER
    assert labels.labelled == 4
