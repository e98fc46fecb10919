"""Training: batch composition, dataset snapshots, trainer hooks, the candidate registry."""

from sidecar.training._composer import (
    BatchComposer,
    CarriesSamples,
    ComposeContext,
    ComposerChain,
    LearningBatch,
    QualityFilter,
)
from sidecar.training._dataset import DATASET_FILES, Snapshot, write_snapshot
from sidecar.training._hooks import (
    CandidateSpec,
    CommandHook,
    HttpHook,
    TrainerHook,
    TrainingFailed,
    TrainingJob,
)
from sidecar.training._registry import (
    CandidateExistsError,
    InvalidCandidateError,
    ModelRecord,
    ModelRegistry,
    OnRegistered,
)
from sidecar.training._stage import TrainingStage, UpdateOutcome

__all__ = [
    "DATASET_FILES",
    "BatchComposer",
    "CandidateExistsError",
    "CandidateSpec",
    "CarriesSamples",
    "CommandHook",
    "ComposeContext",
    "ComposerChain",
    "HttpHook",
    "InvalidCandidateError",
    "LearningBatch",
    "ModelRecord",
    "ModelRegistry",
    "OnRegistered",
    "QualityFilter",
    "Snapshot",
    "TrainerHook",
    "TrainingFailed",
    "TrainingJob",
    "TrainingStage",
    "UpdateOutcome",
    "write_snapshot",
]
