"""``POST /v1/feedback``: one piece of user feedback on an answer, by its request id.

JSON ``{"request_id", "signal"?, "rating"?, "correction"?, "dwell_ms"?,
"session_id"?, "user_id"?}``; the same JSON as ``text/plain`` (what a
browser's ``navigator.sendBeacon`` sends without a CORS preflight). A bad
field is named in the 400's message. Served by the gateway and by the
daemon's HTTP listener.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from atlas_sidecar_client._json import JSONDecodeError, loads
from atlas_sidecar_client._proto.atlas.sidecar.v1.events_pb2 import Signal

__all__ = ["MAX_FEEDBACK_BYTES", "BadFeedback", "FeedbackFields", "parse_feedback"]

#: Largest feedback body read (a correction is the only long field).
MAX_FEEDBACK_BYTES = 256 * 1024

SIGNALS: dict[str, int] = {
    name: int(number) for name, number in Signal.items() if name != "SIGNAL_UNSPECIFIED"
}


class BadFeedback(ValueError):
    """The body cannot be taken; ``str()`` names the field."""


@dataclass(frozen=True)
class FeedbackFields:
    request_id: str
    signal: int = 0
    rating: float | None = None
    correction: str = ""
    dwell_ms: int = 0
    session_id: str = ""
    user_id: str = ""


def _str(doc: dict[str, Any], key: str, *, limit: int = 256) -> str:
    value = doc.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadFeedback(f"{key}: expected a string")
    if len(value.encode()) > limit:
        raise BadFeedback(f"{key}: longer than {limit} bytes")
    return value


def parse_feedback(body: bytes) -> FeedbackFields:
    """Parses a feedback body (JSON, whatever the content type said)."""
    if len(body) > MAX_FEEDBACK_BYTES:
        raise BadFeedback(f"body: larger than {MAX_FEEDBACK_BYTES} bytes")
    try:
        doc = loads(body)
    except JSONDecodeError as exc:
        raise BadFeedback(f"body: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise BadFeedback("body: expected a JSON object")
    unknown = sorted(set(doc) - {f for f in FeedbackFields.__dataclass_fields__})
    if unknown:
        raise BadFeedback(f"{unknown[0]}: unknown field")
    request_id = _str(doc, "request_id")
    if not request_id:
        raise BadFeedback("request_id: required")
    signal_name = doc.get("signal")
    signal = 0
    if signal_name is not None:
        if not isinstance(signal_name, str) or signal_name.upper() not in SIGNALS:
            raise BadFeedback(f"signal: {signal_name!r} is not one of {', '.join(SIGNALS)}")
        signal = SIGNALS[signal_name.upper()]
    rating = doc.get("rating")
    if rating is not None:
        if isinstance(rating, bool) or not isinstance(rating, int | float):
            raise BadFeedback("rating: expected a number in [0, 1]")
        if not math.isfinite(rating) or not 0.0 <= rating <= 1.0:
            raise BadFeedback("rating: must be in [0, 1]")
        rating = float(rating)
    dwell = doc.get("dwell_ms", 0) or 0
    if isinstance(dwell, bool) or not isinstance(dwell, int) or not 0 <= dwell < 1 << 31:
        raise BadFeedback("dwell_ms: expected a non-negative integer")
    if signal == 0 and rating is None and not doc.get("correction") and not dwell:
        raise BadFeedback("signal: one of signal, rating, correction or dwell_ms is required")
    return FeedbackFields(
        request_id=request_id,
        signal=signal,
        rating=rating,
        correction=_str(doc, "correction", limit=MAX_FEEDBACK_BYTES),
        dwell_ms=dwell,
        session_id=_str(doc, "session_id"),
        user_id=_str(doc, "user_id"),
    )
