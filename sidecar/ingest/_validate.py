"""Per-event validation. Returns a reason naming the bad field, or None."""

from __future__ import annotations

import math

from atlas_sidecar_client.pb import events_pb2

from sidecar.config import IngestConfig

__all__ = ["EventValidator"]

_ROLES = frozenset(events_pb2.Role.values())
_SIGNALS = frozenset(events_pb2.Signal.values())


def _utf8_len(text: str) -> int:
    # len(text) is a lower bound of the UTF-8 length and 4x an upper bound.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


class EventValidator:
    """Checks one ``Event`` against the contract and the configured limits."""

    def __init__(self, config: IngestConfig) -> None:
        self._c = config

    def _text(self, field: str, value: str, limit: int) -> str | None:
        if len(value) > limit // 4 and _utf8_len(value) > limit:
            return f"{field}: longer than {limit} bytes"
        return None

    def _attributes(self, field: str, attrs: object) -> str | None:
        c = self._c
        items = attrs.items()  # type: ignore[attr-defined]
        if len(items) > c.max_attributes:
            return f"{field}: more than {c.max_attributes} entries"
        for key, value in items:
            if _utf8_len(key) > c.max_attribute_key_bytes:
                return f"{field}: key longer than {c.max_attribute_key_bytes} bytes"
            if _utf8_len(value) > c.max_attribute_value_bytes:
                return f"{field}[{key!r}]: value longer than {c.max_attribute_value_bytes} bytes"
        return None

    def check(self, event: events_pb2.Event) -> str | None:
        c = self._c
        eid = event.event_id
        if not eid:
            return "event_id: required"
        if _utf8_len(eid) > c.max_id_bytes:
            return f"event_id: longer than {c.max_id_bytes} bytes"
        kind = event.WhichOneof("payload")
        if kind == "inference":
            return self._inference(event.inference)
        if kind == "feedback":
            return self._feedback(event.feedback)
        return "payload: one of inference or feedback is required"

    def _inference(self, inf: events_pb2.Inference) -> str | None:
        c = self._c
        if not inf.request_id:
            return "inference.request_id: required"
        if _utf8_len(inf.request_id) > c.max_id_bytes:
            return f"inference.request_id: longer than {c.max_id_bytes} bytes"
        if not inf.model_version:
            return "inference.model_version: required"
        if inf.role not in _ROLES:
            return f"inference.role: unknown enum value {inf.role}"
        latency = inf.latency_ms
        if not (latency >= 0.0) or math.isinf(latency):
            return f"inference.latency_ms: must be a finite number >= 0, got {latency}"
        for field, value in (
            ("inference.prompt", inf.prompt),
            ("inference.response", inf.response),
        ):
            reason = self._text(field, value, c.max_text_bytes)
            if reason:
                return reason
        for field, value in (
            ("inference.model_version", inf.model_version),
            ("inference.error_code", inf.error_code),
            ("inference.session_id", inf.session_id),
            ("inference.user_id", inf.user_id),
            ("inference.retry_of", inf.retry_of),
        ):
            if value and _utf8_len(value) > c.max_id_bytes:
                return f"{field}: longer than {c.max_id_bytes} bytes"
        lps = inf.token_logprobs
        if lps:
            if len(lps) > c.max_logprobs:
                return f"inference.token_logprobs: more than {c.max_logprobs} values"
            for i, lp in enumerate(lps):
                if not (lp <= 0.0) or math.isinf(lp):
                    return f"inference.token_logprobs[{i}]: must be a finite number <= 0, got {lp}"
        if inf.attributes:
            return self._attributes("inference.attributes", inf.attributes)
        return None

    def _feedback(self, fb: events_pb2.Feedback) -> str | None:
        c = self._c
        if not fb.request_id:
            return "feedback.request_id: required"
        if _utf8_len(fb.request_id) > c.max_id_bytes:
            return f"feedback.request_id: longer than {c.max_id_bytes} bytes"
        if fb.HasField("rating"):
            r = fb.rating
            if not (0.0 <= r <= 1.0):
                return f"feedback.rating: must be within [0, 1], got {r}"
        if fb.signal not in _SIGNALS:
            return f"feedback.signal: unknown enum value {fb.signal}"
        if fb.correction:
            reason = self._text("feedback.correction", fb.correction, c.max_text_bytes)
            if reason:
                return reason
        for field, value in (
            ("feedback.user_id", fb.user_id),
            ("feedback.session_id", fb.session_id),
        ):
            if value and _utf8_len(value) > c.max_id_bytes:
                return f"{field}: longer than {c.max_id_bytes} bytes"
        if fb.attributes:
            return self._attributes("feedback.attributes", fb.attributes)
        return None
