"""Telemetry: OpenTelemetry setup, the per-version traffic view and the learning report.

The instruments every stage uses live below every stage, in
:mod:`sidecar.instruments` (it imports nothing else of the daemon), so this
package may depend on the stages it observes without a cycle; a test walks
the import graph and fails on one.
"""

from __future__ import annotations

from sidecar.telemetry._cardinality import fold_versions
from sidecar.telemetry._logging import configure_logging
from sidecar.telemetry._report import LearningMonitor
from sidecar.telemetry._setup import Telemetry
from sidecar.telemetry._traffic import TrafficView

__all__ = ["LearningMonitor", "Telemetry", "TrafficView", "configure_logging", "fold_versions"]
