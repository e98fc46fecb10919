"""Canary analysis: what the traffic of one stage says about the candidate.

The engine hands a :class:`CanaryJudge` the traffic it observed since the last
evaluation (:class:`TrafficBatch`) and asks for a :class:`Verdict`. The
default judge, :class:`SequentialJudge`, decides with the anytime-valid tests
of ``_sequential.py``. Two baselines implement the same interface for the
decision-quality benchmark: :class:`SeedRuleJudge` (roll back when the stage's
error rate is above 0.05) and :class:`FixedThresholdJudge` (roll back after N
failed interval checks against fixed thresholds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from sidecar.config import CanaryConfig
from sidecar.rollout._sequential import MeanDifferenceTest, RateRatioTest

__all__ = [
    "ArmBatch",
    "CanaryJudge",
    "FixedThresholdJudge",
    "SeedRuleJudge",
    "SequentialJudge",
    "TrafficBatch",
    "Verdict",
]

_EMPTY = np.zeros(0)


@dataclass(slots=True)
class ArmBatch:
    """PRIMARY requests served by one version, and feedback rewards on its answers."""

    latency_ms: np.ndarray = field(default_factory=lambda: _EMPTY)
    error: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    reward: np.ndarray = field(default_factory=lambda: _EMPTY)

    @property
    def requests(self) -> int:
        return len(self.latency_ms)


@dataclass(slots=True)
class TrafficBatch:
    candidate: ArmBatch = field(default_factory=ArmBatch)
    stable: ArmBatch = field(default_factory=ArmBatch)


@dataclass(frozen=True, slots=True)
class Verdict:
    #: Name of the guardrail that found the candidate worse, or None.
    harm: str | None
    #: Whether every proof the stage asks for (non-inferiority) has been given.
    safe: bool
    #: The numbers behind the verdict, for the stored transition.
    evidence: dict[str, Any]


class CanaryJudge(Protocol):
    """Turns observed traffic into a verdict. State survives restarts via ``state()``."""

    def begin_stage(self, index: int, weight_bps: int) -> None: ...
    def observe(self, batch: TrafficBatch) -> None: ...
    def verdict(self, *, stage_complete: bool, final_stage: bool) -> Verdict: ...
    def state(self) -> dict[str, Any]: ...


class _Counts:
    """Per-stage and whole-rollout request, error and feedback counts."""

    def __init__(self) -> None:
        self.stage = {"cand_req": 0, "cand_err": 0, "stab_req": 0, "stab_err": 0}
        self.total = {"cand_req": 0, "cand_err": 0, "stab_req": 0, "stab_err": 0}
        self.fb = [0.0, 0, 0.0, 0]  # cand sum, cand n, stable sum, stable n

    def add(self, b: TrafficBatch) -> None:
        for d in (self.stage, self.total):
            d["cand_req"] += b.candidate.requests
            d["cand_err"] += int(b.candidate.error.sum())
            d["stab_req"] += b.stable.requests
            d["stab_err"] += int(b.stable.error.sum())
        self.fb[0] += float(b.candidate.reward.sum())
        self.fb[1] += len(b.candidate.reward)
        self.fb[2] += float(b.stable.reward.sum())
        self.fb[3] += len(b.stable.reward)

    def evidence(self) -> dict[str, Any]:
        c_sum, c_n, s_sum, s_n = self.fb
        return {
            "stage": dict(self.stage),
            "total": dict(self.total),
            "candidate_score": round(c_sum / c_n, 4) if c_n else None,
            "stable_score": round(s_sum / s_n, 4) if s_n else None,
            "candidate_feedback_n": int(c_n),
            "stable_feedback_n": int(s_n),
        }

    def state(self) -> dict[str, Any]:
        return {"stage": self.stage, "total": self.total, "fb": self.fb}

    def restore(self, s: Mapping[str, Any]) -> None:
        self.stage = dict(s["stage"])
        self.total = dict(s["total"])
        self.fb = list(s["fb"])


class SequentialJudge:
    """Error rate, latency p99 exceedance and feedback score, by e-processes.

    Each guardrail alarms when its e-value reaches ``1 / alpha``; under a
    candidate no worse than stable that happens with probability at most
    ``alpha`` over the whole rollout, however often it is checked. The latency
    threshold is the stable model's ``latency_quantile`` over the stable
    requests seen *before* the batch being judged, so it is fixed when the
    batch's exceedances are counted.
    """

    def __init__(self, config: CanaryConfig, state: Mapping[str, Any] | None = None) -> None:
        self._cfg = config
        self._threshold = 1.0 / config.alpha
        self.errors = RateRatioTest(null_ratio=config.error_rate_ratio)
        self.latency = RateRatioTest(null_ratio=config.latency_exceedance_ratio)
        self.feedback = MeanDifferenceTest(
            margin=config.feedback_margin,
            safe_margin=max(config.non_inferiority_margin, 1e-6),
            block=config.pair_block,
        )
        self.counts = _Counts()
        self._stable_lat = np.zeros(0)
        self._stable_lat_max = 4000
        if state:
            self.errors.restore(state["errors"])
            self.latency.restore(state["latency"])
            self.feedback.restore(state["feedback"])
            self.counts.restore(state["counts"])
            self._stable_lat = np.asarray(state["stable_latency"], dtype=float)

    def begin_stage(self, index: int, weight_bps: int) -> None:
        self.counts.stage = dict.fromkeys(self.counts.stage, 0)

    def observe(self, batch: TrafficBatch) -> None:
        c, s = batch.candidate, batch.stable
        n = c.requests + s.requests
        self.counts.add(batch)
        if n and c.requests and s.requests:
            share = c.requests / n
            self.errors.update(int(c.error.sum()), int(s.error.sum()), share)
            if len(self._stable_lat) >= 200:
                tau = float(np.quantile(self._stable_lat, self._cfg.latency_quantile))
                self.latency.update(
                    int((c.latency_ms > tau).sum()), int((s.latency_ms > tau).sum()), share
                )
        if len(c.reward) or len(s.reward):
            self.feedback.update(c.reward, s.reward)
        if s.requests:
            ok = s.latency_ms[~s.error] if s.error.any() else s.latency_ms
            self._stable_lat = np.concatenate([self._stable_lat, ok])[-self._stable_lat_max :]

    def verdict(self, *, stage_complete: bool, final_stage: bool) -> Verdict:
        e = {
            "error_rate": self.errors.harm_e,
            "latency_p99": self.latency.harm_e,
            "feedback_score": self.feedback.harm_e,
        }
        harm = max(e, key=lambda k: e[k])
        evidence = self.counts.evidence()
        evidence["e_values"] = {k: round(v, 3) if v < 1e9 else 1e9 for k, v in e.items()}
        evidence["threshold"] = self._threshold
        safe = True
        margin = self._cfg.non_inferiority_margin
        if margin > 0 and (final_stage or self._cfg.non_inferiority_every_stage):
            # safe_e >= 1/alpha is the same as: the anytime-valid (1 - alpha)
            # lower confidence bound on E[candidate - stable] lies above -margin.
            safe_e = self.feedback.safe_e
            safe = safe_e >= self._threshold
            c, s = self.feedback.means()
            evidence["non_inferiority"] = {
                "margin": margin,
                "e_value": round(min(safe_e, 1e9), 3),
                "shown": safe,
                "difference": round(c - s, 4) if c is not None and s is not None else None,
                "pairs": self.feedback.pairs,
            }
        return Verdict(harm if e[harm] >= self._threshold else None, safe, evidence)

    def state(self) -> dict[str, Any]:
        return {
            "errors": self.errors.state(),
            "latency": self.latency.state(),
            "feedback": self.feedback.state(),
            "counts": self.counts.state(),
            "stable_latency": np.round(self._stable_lat[-2000:], 2).tolist(),
        }


class SeedRuleJudge:
    """The seed's rule: at the end of a stage, roll back if the error rate is above 0.05."""

    def __init__(
        self, max_error_rate: float = 0.05, state: Mapping[str, Any] | None = None
    ) -> None:
        self.max_error_rate = max_error_rate
        self.counts = _Counts()
        if state:
            self.counts.restore(state["counts"])

    def begin_stage(self, index: int, weight_bps: int) -> None:
        self.counts.stage = dict.fromkeys(self.counts.stage, 0)

    def observe(self, batch: TrafficBatch) -> None:
        self.counts.add(batch)

    def verdict(self, *, stage_complete: bool, final_stage: bool) -> Verdict:
        st = self.counts.stage
        rate = st["cand_err"] / st["cand_req"] if st["cand_req"] else 0.0
        evidence = self.counts.evidence()
        evidence["stage_error_rate"] = round(rate, 4)
        harm = "error_rate" if stage_complete and rate > self.max_error_rate else None
        return Verdict(harm, True, evidence)

    def state(self) -> dict[str, Any]:
        return {"counts": self.counts.state()}


class FixedThresholdJudge:
    """Interval checks against fixed thresholds; roll back after ``max_failed`` failures.

    Every ``interval_requests`` candidate requests form one check: it fails
    when the candidate's error rate is above ``max_error_rate``, its p99 is
    above ``max_latency_ratio`` times the stable p99 of the same interval, or
    its mean reward is below the stable one's by more than ``max_score_drop``.
    Failures count cumulatively over the rollout (as Flagger counts them).
    """

    def __init__(
        self,
        *,
        interval_seconds_batches: int = 6,
        max_failed: int = 5,
        max_error_rate: float = 0.05,
        max_latency_ratio: float = 1.25,
        max_score_drop: float = 0.05,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        self.interval = interval_seconds_batches
        self.max_failed = max_failed
        self.max_error_rate = max_error_rate
        self.max_latency_ratio = max_latency_ratio
        self.max_score_drop = max_score_drop
        self.counts = _Counts()
        self.failed = 0
        self.checks = 0
        self._pending: list[TrafficBatch] = []
        self._last_failure = ""
        if state:
            self.counts.restore(state["counts"])
            self.failed = int(state["failed"])
            self.checks = int(state["checks"])

    def begin_stage(self, index: int, weight_bps: int) -> None:
        self.counts.stage = dict.fromkeys(self.counts.stage, 0)
        self._pending = []

    def observe(self, batch: TrafficBatch) -> None:
        self.counts.add(batch)
        self._pending.append(batch)
        if len(self._pending) >= self.interval:
            self._check(self._pending)
            self._pending = []

    def _check(self, batches: list[TrafficBatch]) -> None:
        c_lat = np.concatenate([b.candidate.latency_ms for b in batches])
        c_err = np.concatenate([b.candidate.error for b in batches])
        s_lat = np.concatenate([b.stable.latency_ms for b in batches])
        c_rew = np.concatenate([b.candidate.reward for b in batches])
        s_rew = np.concatenate([b.stable.reward for b in batches])
        if not len(c_lat):
            return
        self.checks += 1
        reasons = []
        if c_err.mean() > self.max_error_rate:
            reasons.append("error_rate")
        if len(s_lat) and np.quantile(c_lat, 0.99) > self.max_latency_ratio * np.quantile(
            s_lat, 0.99
        ):
            reasons.append("latency_p99")
        if len(c_rew) and len(s_rew) and c_rew.mean() < s_rew.mean() - self.max_score_drop:
            reasons.append("feedback_score")
        if reasons:
            self.failed += 1
            self._last_failure = reasons[0]

    def verdict(self, *, stage_complete: bool, final_stage: bool) -> Verdict:
        evidence = self.counts.evidence()
        evidence.update(failed_checks=self.failed, checks=self.checks)
        harm = self._last_failure or "checks" if self.failed >= self.max_failed else None
        return Verdict(harm, True, evidence)

    def state(self) -> dict[str, Any]:
        return {"counts": self.counts.state(), "failed": self.failed, "checks": self.checks}


def finite(x: float) -> float:
    return x if math.isfinite(x) else 1e9
