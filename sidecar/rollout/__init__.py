"""Rollout: the durable rollout state machine and its analysis (statistics, comparators)."""

from sidecar.rollout._admin import RolloutAdmin
from sidecar.rollout._analysis import (
    ArmBatch,
    CanaryJudge,
    FixedThresholdJudge,
    SeedRuleJudge,
    SequentialJudge,
    TrafficBatch,
    Verdict,
)
from sidecar.rollout._compare import (
    CharNgramCosine,
    Comparator,
    NormalizedExact,
    TokenJaccard,
    comparator_by_name,
)
from sidecar.rollout._engine import Clock, JudgeFactory, RolloutEngine, SystemClock
from sidecar.rollout._errors import (
    RolloutConflictError,
    RolloutError,
    RolloutInputError,
    RolloutNotFoundError,
)
from sidecar.rollout._observe import (
    ActiveView,
    Collected,
    RecentGoodAnswers,
    RegressionCase,
    RegressionSource,
    RolloutObserver,
    ShadowBatch,
    StoredObservations,
    TrafficSource,
)
from sidecar.rollout._record import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    RolloutRecord,
    Transition,
    state_name,
)
from sidecar.rollout._sequential import MeanDifferenceTest, RateRatioTest

__all__ = [
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "ActiveView",
    "ArmBatch",
    "CanaryJudge",
    "CharNgramCosine",
    "Clock",
    "Collected",
    "Comparator",
    "FixedThresholdJudge",
    "JudgeFactory",
    "MeanDifferenceTest",
    "NormalizedExact",
    "RateRatioTest",
    "RecentGoodAnswers",
    "RegressionCase",
    "RegressionSource",
    "RolloutAdmin",
    "RolloutConflictError",
    "RolloutEngine",
    "RolloutError",
    "RolloutInputError",
    "RolloutNotFoundError",
    "RolloutObserver",
    "RolloutRecord",
    "SeedRuleJudge",
    "SequentialJudge",
    "ShadowBatch",
    "StoredObservations",
    "SystemClock",
    "TokenJaccard",
    "TrafficBatch",
    "TrafficSource",
    "Transition",
    "Verdict",
    "comparator_by_name",
    "state_name",
]
