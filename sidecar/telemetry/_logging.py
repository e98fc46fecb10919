"""JSON logs on stderr, each record carrying the current ``trace_id`` and
``span_id``. Prompt, response and correction text never reaches a log record
unless ``telemetry.log_text`` is on: such fields are replaced by their length.
"""

from __future__ import annotations

import logging
import sys

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

__all__ = ["TEXT_FIELDS", "TraceContextFilter", "configure_logging"]

#: Record attributes (``extra=``) that hold user text.
TEXT_FIELDS = frozenset({"prompt", "response", "correction", "completion", "chosen", "rejected"})


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id``/``span_id`` (hex) of the current span; redacts user text."""

    def __init__(self, log_text: bool = False) -> None:
        super().__init__()
        self._log_text = log_text

    def filter(self, record: logging.LogRecord) -> bool:
        sc = trace.get_current_span().get_span_context()
        if sc.is_valid:
            record.trace_id = format(sc.trace_id, "032x")
            record.span_id = format(sc.span_id, "016x")
        if not self._log_text:
            for name in TEXT_FIELDS.intersection(record.__dict__):
                value = record.__dict__[name]
                if isinstance(value, str):
                    record.__dict__[name] = f"<{len(value)} chars redacted>"
        return True


def configure_logging(level: str = "INFO", json_logs: bool = True, log_text: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceContextFilter(log_text))
    if json_logs:
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
