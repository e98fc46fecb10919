"""Learning: when to learn (the scheduler), and what to learn from."""

from sidecar.learning._scheduler import Decision, LearningScheduler, SchedulerState

__all__ = ["Decision", "LearningScheduler", "SchedulerState"]
