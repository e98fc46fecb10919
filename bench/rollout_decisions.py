"""Decision quality of the rollout engine, against two baselines, on the same runs.

Synthetic traffic (requests/s, feedback rate, noise) drives the real
RolloutEngine (real LMDB store and writer, an in-memory control plane, a
compressed clock) through canary rollouts of candidates whose effect is
known: better, equal, a higher error rate, a lower feedback score, slower.
Each seeded run is replayed with three judges:

- sequential: the engine's default (anytime-valid e-processes);
- seed: the seed's rule, roll back if a stage's error rate is above 0.05;
- fixed: interval checks against fixed thresholds, roll back after N failures.

Printed per judge: false-rollback rate of good and equal candidates, the
detection rate of bad ones, the share of bad runs caught before exceeding
10 % of traffic, the largest traffic share a bad candidate reached, the
median time to decision, and the slowest rollback directive hand-over.

    .venv/bin/python bench/rollout_decisions.py [--runs 100] [--rps 50] [--feedback-rate 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sidecar.config import CanaryConfig, RolloutConfig, StoreConfig
from sidecar.rollout import (
    ArmBatch,
    CanaryJudge,
    Collected,
    FixedThresholdJudge,
    RolloutEngine,
    SeedRuleJudge,
    SequentialJudge,
    ShadowBatch,
    TrafficBatch,
)
from sidecar.store import Store, StoreWriter
from sidecar.testing import FakeControlPlane


@dataclass(frozen=True)
class Effect:
    error_rate: float = 0.01
    latency_factor: float = 1.0
    reward_shift: float = 0.0


BASE = Effect()
CANDIDATES: dict[str, tuple[Effect, bool]] = {
    # name: (effect, is_bad)
    "better": (Effect(error_rate=0.008, latency_factor=0.9, reward_shift=0.05), False),
    "equal": (Effect(), False),
    "higher_error": (Effect(error_rate=0.04), True),
    "lower_feedback": (Effect(reward_shift=-0.10), True),
    "slower": (Effect(latency_factor=1.5), True),
}


class Clock:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def now_ms(self) -> int:
        return self.ms


class SyntheticTraffic:
    """Requests and feedback for the interval since the last call, split as the control plane says."""

    def __init__(
        self,
        control: FakeControlPlane,
        clock: Clock,
        rps: float,
        feedback_rate: float,
        noise: float,
    ) -> None:
        self._control = control
        self._clock = clock
        self.rps = rps
        self.feedback_rate = feedback_rate
        self.noise = noise
        self.rng = np.random.default_rng(0)
        self.candidate = ""
        self.effect = BASE
        self._last = clock.now_ms()

    def reset(self, seed: int, candidate: str, effect: Effect) -> None:
        self.rng = np.random.default_rng(seed)
        self.candidate = candidate
        self.effect = effect
        self._last = self._clock.now_ms()

    def _arm(self, n: int, eff: Effect) -> ArmBatch:
        r = self.rng
        lat = 200.0 * eff.latency_factor * np.exp(r.normal(0.0, 0.35 * self.noise, n))
        err = r.random(n) < eff.error_rate
        k = r.binomial(n, self.feedback_rate)
        mean = min(0.95, max(0.05, 0.6 + eff.reward_shift))
        conc = 2.0 / max(self.noise, 1e-3) ** 2  # noise 1: sd about 0.28
        reward = r.beta(mean * conc, (1 - mean) * conc, k)
        return ArmBatch(lat, err, reward)

    def collect(self, rollout_id: str, cursor: int, now_ms: int) -> Collected:
        dt = (now_ms - self._last) / 1000.0
        self._last = now_ms
        n = self.rng.poisson(self.rps * dt) if dt > 0 else 0
        w = self._control.weight_bps(self.candidate) / 10_000
        nc = self.rng.binomial(n, w)
        batch = TrafficBatch(self._arm(nc, self.effect), self._arm(n - nc, BASE))
        return Collected(batch, ShadowBatch(), cursor + 1)


JUDGES: dict[str, Callable[[CanaryConfig, Mapping[str, Any] | None], CanaryJudge]] = {
    "sequential": lambda cfg, st: SequentialJudge(cfg, st),
    "seed": lambda cfg, st: SeedRuleJudge(0.05, st),
    "fixed": lambda cfg, st: FixedThresholdJudge(
        interval_seconds_batches=FIXED["batches"], max_failed=FIXED["n"], state=st
    ),
}
#: Fixed-threshold baseline: one check per minute, roll back after 5 failed checks.
FIXED = {"batches": 2, "n": 5}


@dataclass
class Outcome:
    kind: str
    bad: bool
    state: str
    max_share: float
    seconds: float


async def run_judge(
    judge: str, runs: int, args: argparse.Namespace, tmp: Path
) -> tuple[list[Outcome], list[float]]:
    cfg = RolloutConfig(
        initial_stable_version="stable-0",
        checkpoint_interval_seconds=600,
        unload_after_seconds=0,
        validation={"enabled": False},
        shadow={"enabled": False},
        canary={
            "min_dwell_seconds": args.dwell,
            "min_samples": args.min_samples,
            "max_dwell_seconds": 3600,
        },
    )
    store = Store(StoreConfig(data_dir=tmp / judge, sync=False, commit_window_ms=0))
    store.open()
    writer = StoreWriter(store, StoreConfig(data_dir=tmp / judge, sync=False, commit_window_ms=0))
    await writer.start()
    control = FakeControlPlane()
    clock = Clock()
    traffic = SyntheticTraffic(control, clock, args.rps, args.feedback_rate, args.noise)
    engine = RolloutEngine(
        store,
        writer,
        control,
        cfg,
        clock=clock,
        source=traffic,
        judge_factory=JUDGES[judge],
        autorun=False,
    )
    await engine.start()
    outcomes: list[Outcome] = []
    rollback_s: list[float] = []
    tick = int(args.tick * 1000)
    for i in range(runs):
        for k, (kind, (effect, bad)) in enumerate(CANDIDATES.items()):
            name = f"{kind}-{i}"
            traffic.reset(args.seed + 1000 * i + k, name, effect)
            rec = await engine.start_rollout(name)
            t0 = clock.ms
            share = 0.0
            while engine.rollout_active() and clock.ms - t0 < 6 * 3600 * 1000:
                share = max(share, control.weight_bps(name) / 100)
                clock.ms += tick
                await engine.step()
            if engine.rollout_active():
                await engine.abort(rec.rollout_id, "bench time limit")
            final = engine.get(rec.rollout_id)
            assert final is not None
            if final.state == "PROMOTED":
                share = 100.0
            if final.state == "ROLLED_BACK" and engine.last_rollback_seconds is not None:
                rollback_s.append(engine.last_rollback_seconds)
            outcomes.append(Outcome(kind, bad, final.state, share, (clock.ms - t0) / 1000))
    await engine.shutdown()
    await writer.shutdown()
    store.close()
    return outcomes, rollback_s


def summarize(outs: list[Outcome], rollback_s: list[float]) -> dict[str, Any]:
    good = [o for o in outs if not o.bad]
    bad = [o for o in outs if o.bad]
    caught = [o for o in bad if o.state == "ROLLED_BACK"]
    early = [o for o in caught if o.max_share <= 10.0]
    per_kind = {}
    for kind in CANDIDATES:
        ks = [o for o in outs if o.kind == kind]
        per_kind[kind] = {
            "promoted": sum(o.state == "PROMOTED" for o in ks) / len(ks),
            "rolled_back": sum(o.state == "ROLLED_BACK" for o in ks) / len(ks),
            "max_share_pct": max(o.max_share for o in ks),
            "median_decision_s": float(np.median([o.seconds for o in ks])),
        }
    return {
        "good_promoted": sum(o.state == "PROMOTED" for o in good) / len(good),
        "false_rollback": sum(o.state == "ROLLED_BACK" for o in good) / len(good),
        "bad_detected": len(caught) / len(bad),
        "bad_caught_by_10pct": len(early) / len(bad),
        "bad_max_share_pct": max((o.max_share for o in bad), default=0.0),
        "median_decision_s": float(np.median([o.seconds for o in outs])),
        "max_rollback_directive_ms": 1000 * max(rollback_s, default=0.0),
        "per_kind": per_kind,
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=50, help="seeded runs per candidate kind")
    p.add_argument("--rps", type=float, default=50.0, help="requests per second (all traffic)")
    p.add_argument(
        "--feedback-rate", type=float, default=0.3, help="share of requests with feedback"
    )
    p.add_argument("--noise", type=float, default=1.0, help="scale of latency and reward noise")
    p.add_argument("--dwell", type=float, default=300.0, help="min dwell per stage, seconds")
    p.add_argument("--min-samples", type=int, default=100, help="candidate requests per stage")
    p.add_argument("--tick", type=float, default=30.0, help="seconds between evaluations")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    FIXED["batches"] = max(1, round(60 / args.tick))
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for judge in JUDGES:
            outs, rb = asyncio.run(run_judge(judge, args.runs, args, Path(tmp)))
            results[judge] = summarize(outs, rb)
    wall = time.perf_counter() - started
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f"{args.runs} runs x {len(CANDIDATES)} candidates per judge; {args.rps:g} rps, "
        f"feedback {args.feedback_rate:g}, noise {args.noise:g}; {wall:.1f} s"
    )
    hdr = f"{'judge':<11}{'good promoted':>14}{'false rb':>10}{'bad caught':>11}{'by 10%':>8}{'bad max %':>10}{'median s':>10}{'rb ms':>8}"
    print(hdr)
    for judge, r in results.items():
        print(
            f"{judge:<11}{r['good_promoted']:>14.3f}{r['false_rollback']:>10.3f}"
            f"{r['bad_detected']:>11.3f}{r['bad_caught_by_10pct']:>8.3f}{r['bad_max_share_pct']:>10.1f}"
            f"{r['median_decision_s']:>10.0f}{r['max_rollback_directive_ms']:>8.1f}"
        )
    print("per candidate kind (promoted / rolled back / max share % / median decision s):")
    for kind in CANDIDATES:
        cells = []
        for judge, r in results.items():
            k = r["per_kind"][kind]
            cells.append(
                f"{judge}: {k['promoted']:.2f}/{k['rolled_back']:.2f}/{k['max_share_pct']:.0f}/{k['median_decision_s']:.0f}"
            )
        print(f"  {kind:<15}" + "   ".join(cells))
    s = results["sequential"]

    # The one comparable figure: runs decided correctly (good promoted, bad caught
    # by 10 %), sequential judge vs the better of the two baselines, same runs.
    def correct(r: dict[str, Any]) -> float:
        return (r["good_promoted"] * 2 + r["bad_caught_by_10pct"] * 3) / 5

    best = max(correct(results["seed"]), correct(results["fixed"]))
    print(f"correct decisions: sequential {correct(s):.3f} vs best baseline {best:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
