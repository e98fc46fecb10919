"""Dataset snapshots: ``<data_dir>/datasets/<update_id>/``.

Files: ``sft.jsonl``, ``preferences.jsonl`` (DPO), ``kto.jsonl`` and
``manifest.json``. A snapshot is written into a temporary folder and renamed
into place, so a folder under ``datasets/`` is always complete. The manifest
records the trigger, the row counts, the base version and each file's
sha256, so a trainer (or an auditor) can check what it read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar._private import make_private_dir, open_private
from sidecar.names import inside, require_name
from sidecar.scoring import dpo_row, encode_row, kto_row, sft_row
from sidecar.training._composer import LearningBatch

__all__ = ["DATASET_FILES", "Snapshot", "write_snapshot"]

DATASET_FILES = {"sft": "sft.jsonl", "dpo": "preferences.jsonl", "kto": "kto.jsonl"}
MANIFEST = "manifest.json"


@dataclass(frozen=True, slots=True)
class Snapshot:
    update_id: str
    path: Path
    manifest: dict[str, Any]

    @property
    def rows(self) -> int:
        return int(sum(self.manifest["counts"][k] for k in DATASET_FILES))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> tuple[str, int]:
    digest = hashlib.sha256()
    with open_private(path, "wb") as f:
        for row in rows:
            line = (encode_row(row) + "\n").encode()
            digest.update(line)
            f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest(), path.stat().st_size


def write_snapshot(
    root: Path,
    update_id: str,
    batch: LearningBatch,
    *,
    trigger: str,
    reason: str,
    base_version: str,
    created_ms: int,
    extra: dict[str, Any] | None = None,
) -> Snapshot:
    """Writes the snapshot (blocking file I/O: call it off the event loop).

    An existing complete snapshot of the same id is kept and returned as is.

    Raises:
        InvalidNameError: ``update_id`` is not a valid name, or its folder
            would not be inside ``root``.
    """
    require_name("update_id", update_id)
    inside(root, update_id)
    final = root / update_id
    if (final / MANIFEST).exists():
        return Snapshot(update_id, final, json.loads((final / MANIFEST).read_text()))
    inside(root, f".tmp-{update_id}")
    tmp = root / f".tmp-{update_id}"
    if tmp.exists():
        shutil.rmtree(tmp)
    make_private_dir(root)
    make_private_dir(tmp)
    rows: dict[str, list[dict[str, Any]]] = {"sft": [], "dpo": [], "kto": []}
    for s in batch.samples:
        if s.qualifies:
            rows["sft"].append(sft_row(s))
        k = kto_row(s)
        if k is not None:
            rows["kto"].append(k)
    rows["dpo"] = [dpo_row(p) for p in batch.pairs]
    files: dict[str, Any] = {}
    for kind, name in DATASET_FILES.items():
        sha, size = _write_jsonl(tmp / name, rows[kind])
        files[name] = {"kind": kind, "rows": len(rows[kind]), "bytes": size, "sha256": sha}
    sources: dict[str, int] = {}
    for src in [s.source for s in batch.samples] + [p.source for p in batch.pairs]:
        sources[src] = sources.get(src, 0) + 1
    manifest: dict[str, Any] = {
        "update_id": update_id,
        "created_ms": created_ms,
        "trigger": {"name": trigger, "reason": reason},
        "base_version": base_version,
        "counts": {kind: len(rows[kind]) for kind in DATASET_FILES} | {"by_source": sources},
        "files": files,
        "formats": {
            "sft": "TRL SFTTrainer: prompt, completion (+ reward, source)",
            "dpo": "TRL DPOTrainer: prompt, chosen, rejected (+ margin, reward, source)",
            "kto": "TRL KTOTrainer: prompt, completion, label (+ reward, source)",
        },
        **(extra or {}),
    }
    with open_private(tmp / MANIFEST, "w", encoding="utf-8") as mf:
        mf.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return Snapshot(update_id, final, manifest)
