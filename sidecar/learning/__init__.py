"""Learning: when to learn (the scheduler), what to learn from, what to remember, when to ask.

Selective learning values samples; memory consolidation keeps a diverse
episodic memory per task and replays it; the holdout is never trained on;
active learning decides when to ask a user for feedback.
"""

from sidecar.learning._active import (
    ActiveLearner,
    ActiveLearningServicer,
    FeedbackAnswerProcessor,
    FeedbackDecision,
)
from sidecar.learning._batch import SelectiveReplayStep
from sidecar.learning._compose import (
    ComposedBatch,
    ComposedRow,
    SelectiveReplayComposer,
)
from sidecar.learning._curation import HoldoutAtCuration, curation_options
from sidecar.learning._history import HistoryRetention
from sidecar.learning._holdout import HeldOutSample, HoldoutSet, RegressionPrompt, RegressionSuite
from sidecar.learning._memory import (
    ConsolidationResult,
    MemoryConsolidation,
    MemoryItem,
    fifo_memory,
    k_center_select,
)
from sidecar.learning._scheduler import Decision, LearningScheduler, SchedulerState
from sidecar.learning._selective import (
    CandidateSample,
    SelectiveLearner,
    ValuedSample,
    ValueFeatures,
)
from sidecar.learning._summary import learning_quality_report
from sidecar.learning._vectors import (
    HashedNgramVectorizer,
    TextVectorizer,
    uncertainty,
)

__all__ = [
    "ActiveLearner",
    "ActiveLearningServicer",
    "CandidateSample",
    "ComposedBatch",
    "ComposedRow",
    "ConsolidationResult",
    "Decision",
    "FeedbackAnswerProcessor",
    "FeedbackDecision",
    "HashedNgramVectorizer",
    "HeldOutSample",
    "HistoryRetention",
    "HoldoutAtCuration",
    "HoldoutSet",
    "LearningScheduler",
    "MemoryConsolidation",
    "MemoryItem",
    "RegressionPrompt",
    "RegressionSuite",
    "SchedulerState",
    "SelectiveLearner",
    "SelectiveReplayComposer",
    "SelectiveReplayStep",
    "TextVectorizer",
    "ValueFeatures",
    "ValuedSample",
    "curation_options",
    "fifo_memory",
    "k_center_select",
    "learning_quality_report",
    "uncertainty",
]
