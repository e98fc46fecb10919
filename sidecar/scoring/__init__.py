"""Scoring: join inference and feedback, score, curate, preference pairs, quarantine."""

from sidecar.scoring._processor import (
    FeedbackProcessor,
    PairListener,
    SampleDocumentListener,
    SampleListener,
    table_from_config,
)
from sidecar.scoring._rows import (
    EXPORT_KINDS,
    RowExclusion,
    dpo_row,
    encode_row,
    iter_export_rows,
    kto_row,
    sft_row,
)
from sidecar.scoring._views import (
    Pair,
    Sample,
    ScoringCounters,
    VersionFeedback,
    iter_pairs,
    iter_samples,
    quarantined_sources,
    read_all_version_feedback,
    read_counters,
    read_version_feedback,
)
from sidecar.scoring._weights import (
    DEFAULT_SIGNAL_WEIGHTS,
    Score,
    WeightTable,
    current_weight_version,
    read_weight_versions,
    score_feedback,
)

__all__ = [
    "DEFAULT_SIGNAL_WEIGHTS",
    "EXPORT_KINDS",
    "FeedbackProcessor",
    "Pair",
    "PairListener",
    "RowExclusion",
    "Sample",
    "SampleDocumentListener",
    "SampleListener",
    "Score",
    "ScoringCounters",
    "VersionFeedback",
    "WeightTable",
    "current_weight_version",
    "dpo_row",
    "encode_row",
    "iter_export_rows",
    "iter_pairs",
    "iter_samples",
    "kto_row",
    "quarantined_sources",
    "read_all_version_feedback",
    "read_counters",
    "read_version_feedback",
    "read_weight_versions",
    "score_feedback",
    "sft_row",
    "table_from_config",
]
