"""Scoring: join inference and feedback, score, curate, preference pairs."""

from sidecar.scoring._weights import DEFAULT_SIGNAL_WEIGHTS, Score, WeightTable, score_feedback

__all__ = ["DEFAULT_SIGNAL_WEIGHTS", "Score", "WeightTable", "score_feedback"]
