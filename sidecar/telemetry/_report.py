"""The learning monitor: what the loop learned, how fast, and how safely.

Everything here is read from durable state, so the report survives restarts:
the learning history (``history`` database) for updates and events, and the
traffic view's buckets (``meta`` keys ``telemetry/...``) for performance over
time, the feedback distribution and the observed traffic split. The
definitions of every figure are in ``docs/telemetry.md``.

Other stages' records are read tolerantly: a missing field degrades a figure
to ``null``, it never fails the report.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from atlas_sidecar_client.pb import admin_pb2

from sidecar.config import TelemetryConfig
from sidecar.control import DesiredState
from sidecar.store import Store, read_history
from sidecar.telemetry._traffic import BINS, read_feedback, read_perf

__all__ = ["LearningMonitor", "improvement_of"]

DAY_MS = 86_400_000
TERMINAL = frozenset({"PROMOTED", "ROLLED_BACK", "ABORTED"})
#: History kinds shown as "recent learning events".
EVENT_KINDS = frozenset(
    {
        "trigger",
        "trigger_suppressed",
        "dataset",
        "training_started",
        "training_succeeded",
        "training_failed",
        "candidate_registered",
        "rollout_transition",
        "promoted",
        "rollback",
    }
)
_PAIR_KEYS = (
    ("candidate_feedback_score", "stable_feedback_score"),
    ("candidate_feedback", "stable_feedback"),
    ("candidate_score", "stable_score"),
    ("candidate_reward", "stable_reward"),
)
_NESTED_KEYS = ("feedback_score", "feedback", "score", "reward", "mean_reward")


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _pair(d: Mapping[str, Any]) -> float | None:
    """candidate minus stable feedback score, from one evidence mapping."""
    direct = _num(d.get("improvement"))
    if direct is not None:
        return direct
    for cand_key, stable_key in _PAIR_KEYS:
        c, s = _num(d.get(cand_key)), _num(d.get(stable_key))
        if c is not None and s is not None:
            return c - s
    for key in _NESTED_KEYS:
        inner = d.get(key)
        if isinstance(inner, Mapping):
            c, s = _num(inner.get("candidate")), _num(inner.get("stable"))
            if c is not None and s is not None:
                return c - s
    cand, stable = d.get("candidate"), d.get("stable")
    if isinstance(cand, Mapping) and isinstance(stable, Mapping):
        for key in _NESTED_KEYS:
            c, s = _num(cand.get(key)), _num(stable.get(key))
            if c is not None and s is not None:
                return c - s
    return None


def improvement_of(doc: Mapping[str, Any]) -> float | None:
    """The canary's measured improvement recorded in a history document:
    ``improvement``, or candidate minus stable feedback score, at the top
    level or under ``evidence`` (see docs/telemetry.md for the shapes read)."""
    found = _pair(doc)
    if found is not None:
        return found
    evidence = doc.get("evidence")
    if isinstance(evidence, str):
        try:
            evidence = json.loads(evidence)
        except ValueError:
            evidence = None
    if isinstance(evidence, Mapping):
        return _pair(evidence)
    return None


def _version(doc: Mapping[str, Any]) -> str:
    for key in ("version", "candidate_version", "candidate", "model_version"):
        value = doc.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def _state(doc: Mapping[str, Any], *keys: str) -> str:
    for key in keys:
        value = doc.get(key)
        if isinstance(value, str) and value:
            return value.removeprefix("ROLLOUT_STATE_").upper()
    return ""


def _summary(doc: Mapping[str, Any]) -> str:
    kind = doc.get("kind", "")
    reason = doc.get("reason") or ""
    version = _version(doc)
    if kind == "trigger":
        return f"learning triggered: {reason}".strip(": ")
    if kind == "trigger_suppressed":
        return f"trigger held back: {reason}".strip(": ")
    if kind == "dataset":
        n = doc.get("samples") or doc.get("sft") or doc.get("rows")
        return f"dataset {doc.get('update_id', '')} snapshotted" + (f" ({n} samples)" if n else "")
    if kind == "training_started":
        return f"training started for {doc.get('update_id', '')}".strip()
    if kind == "training_succeeded":
        return f"training succeeded: {version or doc.get('update_id', '')}".strip(": ")
    if kind == "training_failed":
        return f"training failed: {reason or doc.get('error', '')}".strip(": ")
    if kind == "candidate_registered":
        return f"candidate {version} registered"
    if kind == "rollout_transition":
        frm, to = _state(doc, "from_state", "from"), _state(doc, "to_state", "to")
        stage = doc.get("stage_index")
        where = f" stage {stage}" if isinstance(stage, int) and to == "CANARY" else ""
        return f"rollout {frm or '?'} → {to}{where}" + (f": {reason}" if reason else "")
    if kind == "promoted":
        imp = improvement_of(doc)
        return f"{version} promoted" + (f" ({imp:+.3f})" if imp is not None else "")
    if kind == "rollback":
        return f"{version} rolled back" + (f": {reason}" if reason else "")
    return str(kind)


class LearningMonitor:
    """Builds the learning report and the live rollout view from the store.

    ``traffic_source`` (set by the control stage when it is present) gives the
    desired traffic split; without it the split is derived from the latest
    rollout record.
    """

    def __init__(
        self,
        store: Store,
        config: TelemetryConfig,
        *,
        traffic_source: Callable[[], DesiredState | None] | None = None,
    ) -> None:
        self._store = store
        self._config = config
        self.traffic_source = traffic_source
        #: Extra sections other stages add to the report: name -> JSON-ready
        #: mapping (a failing section reports its error, never fails the report).
        self.sections: dict[str, Callable[[], Mapping[str, Any]]] = {}

    # -- AdminService.GetReport ----------------------------------------------

    async def report(self) -> admin_pb2.Report:
        doc = self.report_dict()
        return admin_pb2.Report(
            total_updates=doc["total_updates"],
            updates_today=doc["updates_today"],
            avg_improvement=doc["avg_improvement"] or 0.0,
            recent_improvement=doc["recent_improvement"] or 0.0,
            learning_velocity=doc["learning_velocity"],
            stability_score=doc["stability_score"],
            json=json.dumps(doc, sort_keys=True, default=str),
        )

    # -- /api/report -----------------------------------------------------------

    def report_dict(self, now_ms: int | None = None) -> dict[str, Any]:
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        cfg = self._config
        with self._store.read() as txn:
            history = list(read_history(txn, self._store))
            perf = read_perf(txn, self._store)
            fb = read_feedback(txn, self._store)
        by_rollout: dict[str, list[dict[str, Any]]] = {}
        for doc in history:
            rid = doc.get("rollout_id")
            if isinstance(rid, str) and doc.get("kind") == "rollout_transition":
                by_rollout.setdefault(rid, []).append(doc)
        updates: list[dict[str, Any]] = []
        for doc in history:
            if doc.get("kind") != "promoted":
                continue
            imp = improvement_of(doc)
            if imp is None:
                # the evidence of the rollout's last transition that had some
                for tr in reversed(by_rollout.get(str(doc.get("rollout_id")), [])):
                    imp = improvement_of(tr)
                    if imp is not None:
                        break
            updates.append(
                {
                    "time_ms": int(doc.get("time_ms", 0)),
                    "version": _version(doc),
                    "rollout_id": doc.get("rollout_id"),
                    "update_id": doc.get("update_id"),
                    "improvement": imp,
                }
            )
        rollbacks = [d for d in history if d.get("kind") == "rollback"]
        today_start = now - now % DAY_MS
        improvements = [u["improvement"] for u in updates if u["improvement"] is not None]
        recent = improvements[-cfg.recent_updates :]
        window = int(cfg.velocity_window_days * DAY_MS)

        def velocity(lo: int, hi: int) -> float:
            gained: float = sum(
                u["improvement"]
                for u in updates
                if u["improvement"] is not None and lo < u["time_ms"] <= hi
            )
            return gained / cfg.velocity_window_days

        v_now = velocity(now - window, now)
        v_prev = velocity(now - 2 * window, now - window)
        avg = sum(improvements) / len(improvements) if improvements else None
        recent_avg = sum(recent) / len(recent) if recent else None
        extra: dict[str, Any] = {}
        for name, section in self.sections.items():
            try:
                extra[name] = dict(section())
            except Exception as exc:
                extra[name] = {"error": str(exc)}
        return {
            **extra,
            "generated_at_ms": now,
            "total_updates": len(updates),
            "updates_today": sum(1 for u in updates if u["time_ms"] >= today_start),
            "updates_last_24h": sum(1 for u in updates if u["time_ms"] > now - DAY_MS),
            "avg_improvement": avg,
            "recent_improvement": recent_avg,
            "learning_velocity": v_now,
            "learning_velocity_previous": v_prev,
            "stability_score": self._stability(history),
            "rollbacks": len(rollbacks),
            "deltas": {
                "total_updates": sum(1 for u in updates if u["time_ms"] > now - DAY_MS),
                "avg_improvement": (
                    recent_avg - avg if recent_avg is not None and avg is not None else None
                ),
                "learning_velocity": v_now - v_prev,
            },
            "stable_version": updates[-1]["version"] if updates else self._busiest(perf),
            "updates": updates,
            "rollback_markers": [
                {"time_ms": int(d.get("time_ms", 0)), "version": _version(d)} for d in rollbacks
            ],
            "performance": self._performance(perf),
            "feedback": {
                "bins": fb["bins"],
                "edges": [round(i / BINS, 2) for i in range(BINS + 1)],
                "signals": dict(sorted(fb["signals"].items())),
                "total": sum(fb["bins"]),
            },
            "events": [
                {
                    "seq": d.get("seq"),
                    "time_ms": d.get("time_ms"),
                    "kind": d.get("kind"),
                    "summary": _summary(d),
                }
                for d in reversed(history[-200:])
                if d.get("kind") in EVENT_KINDS
            ][:25],
        }

    @staticmethod
    def _stability(history: Iterable[Mapping[str, Any]]) -> float:
        outcomes: list[bool] = []
        for doc in history:
            kind = doc.get("kind")
            if kind == "promoted":
                imp = improvement_of(doc)
                outcomes.append(imp is None or imp >= 0)
            elif kind in ("rollback", "training_failed"):
                outcomes.append(False)
        last = outcomes[-20:]
        return float(sum(last)) / len(last) if last else 1.0

    def _performance(self, perf: list[tuple[int, dict[str, list[float]]]]) -> dict[str, Any]:
        points = []
        for start, versions in perf:
            req = sum(int(r[0]) for r in versions.values())
            err = sum(int(r[1]) for r in versions.values())
            lat = sum(r[2] for r in versions.values())
            nfb = sum(int(r[3]) for r in versions.values())
            rew = sum(r[4] for r in versions.values())
            points.append(
                {
                    "time_ms": start,
                    "requests": req,
                    "errors": err,
                    "error_rate": err / req if req else None,
                    "latency_ms": lat / req if req else None,
                    "feedback": nfb,
                    "score": rew / nfb if nfb else None,
                    "by_version": {
                        v: {
                            "requests": int(r[0]),
                            "score": r[4] / r[3] if r[3] else None,
                        }
                        for v, r in sorted(versions.items())
                    },
                }
            )
        return {"bucket_seconds": self._config.report_bucket_seconds, "points": points}

    @staticmethod
    def _busiest(perf: list[tuple[int, dict[str, list[float]]]]) -> str | None:
        totals: dict[str, int] = {}
        for _start, versions in perf[-10:]:
            for v, r in versions.items():
                if v != "unknown":
                    totals[v] = totals.get(v, 0) + int(r[0])
        return max(totals, key=lambda v: totals[v]) if totals else None

    # -- /api/rollout ------------------------------------------------------------

    def rollout_dict(self, now_ms: int | None = None) -> dict[str, Any]:
        """The live rollout (stage, evidence) and the traffic split."""
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        with self._store.read() as txn:
            docs = list(
                read_history(
                    txn,
                    self._store,
                    kinds=frozenset({"rollout_transition", "promoted", "rollback"}),
                    newest_first=True,
                    limit=200,
                )
            )
            perf = read_perf(txn, self._store)
        latest = docs[0] if docs else None
        rollout: dict[str, Any] | None = None
        if latest is not None:
            rid = latest.get("rollout_id")
            transitions = [
                d
                for d in docs
                if d.get("kind") == "rollout_transition"
                and (rid is None or d.get("rollout_id") == rid)
            ]
            last_tr = transitions[0] if transitions else latest
            state = (
                "PROMOTED"
                if latest.get("kind") == "promoted"
                else "ROLLED_BACK"
                if latest.get("kind") == "rollback"
                else _state(latest, "to_state", "to")
            )
            evidence = last_tr.get("evidence")
            if isinstance(evidence, str):
                try:
                    evidence = json.loads(evidence)
                except ValueError:
                    evidence = {"text": evidence}
            weight = _num(last_tr.get("candidate_weight_bps"))
            if weight is None:
                weight = _num(last_tr.get("weight_bps"))
            if state == "PROMOTED":
                weight = 10000.0
            elif state in ("ROLLED_BACK", "ABORTED"):
                weight = 0.0
            rollout = {
                "rollout_id": rid,
                "candidate_version": last_tr.get("candidate_version") or _version(latest) or None,
                "stable_version": last_tr.get("stable_version") or last_tr.get("stable") or None,
                "state": state,
                "active": state not in TERMINAL and bool(state),
                "stage_index": last_tr.get("stage_index"),
                "candidate_weight_bps": int(weight) if weight is not None else None,
                "reason": last_tr.get("reason") or latest.get("reason"),
                "evidence": evidence if isinstance(evidence, Mapping) else {},
                "improvement": improvement_of(last_tr),
                "updated_ms": latest.get("time_ms"),
                "transitions": [
                    {
                        "time_ms": d.get("time_ms"),
                        "from_state": _state(d, "from_state", "from"),
                        "to_state": _state(d, "to_state", "to"),
                        "stage_index": d.get("stage_index"),
                        "reason": d.get("reason"),
                    }
                    for d in transitions[:12]
                ],
            }
        return {
            "generated_at_ms": now,
            "rollout": rollout,
            "traffic": {
                "desired": self._desired(rollout),
                "observed": self._observed(perf, now),
            },
        }

    def _desired(self, rollout: Mapping[str, Any] | None) -> dict[str, Any] | None:
        source = self.traffic_source
        if source is not None:
            try:
                desired = source()
            except Exception:
                desired = None
            if desired is not None:
                return {
                    "source": "control",
                    "revision": desired.revision,
                    "routes": [
                        {"version": r.version, "weight_bps": r.weight_bps} for r in desired.routes
                    ],
                    "shadow": (
                        {"version": desired.shadow.version, "mirror_bps": desired.shadow.mirror_bps}
                        if desired.shadow
                        else None
                    ),
                }
        if rollout is None or rollout.get("candidate_weight_bps") is None:
            return None
        cand = rollout.get("candidate_version")
        stable = rollout.get("stable_version")
        w = int(rollout["candidate_weight_bps"])
        routes = []
        if stable and w < 10000:
            routes.append({"version": stable, "weight_bps": 10000 - w})
        if cand and w > 0:
            routes.append({"version": cand, "weight_bps": w})
        return {"source": "rollout", "revision": None, "routes": routes, "shadow": None}

    def _observed(self, perf: list[tuple[int, dict[str, list[float]]]], now: int) -> dict[str, Any]:
        """Users' requests per version over the last few buckets."""
        bucket_ms = int(self._config.report_bucket_seconds * 1000)
        window = max(5 * bucket_ms, 300_000)
        totals: dict[str, int] = {}
        for start, versions in perf:
            if start + bucket_ms <= now - window:
                continue
            for v, r in versions.items():
                if int(r[0]):
                    totals[v] = totals.get(v, 0) + int(r[0])
        n = sum(totals.values())
        return {
            "window_seconds": window / 1000,
            "requests": n,
            "versions": [
                {"version": v, "requests": c, "share": c / n}
                for v, c in sorted(totals.items(), key=lambda kv: -kv[1])
            ],
        }
