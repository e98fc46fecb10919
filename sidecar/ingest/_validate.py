"""Per-event validation. Returns a reason naming the bad field, or None.

This runs for every event on the ingest path, so each field is read once
and the exact UTF-8 length is only computed when ``4 * len(text)`` could
exceed a limit (a str of n code points is between n and 4n UTF-8 bytes).
"""

from __future__ import annotations

import math

from atlas_sidecar_client.pb import events_pb2

from sidecar.config import IngestConfig

__all__ = ["EventValidator"]

_ROLES = frozenset(events_pb2.Role.values())
_SIGNALS = frozenset(events_pb2.Signal.values())
_INF = math.inf


def _over(text: str, limit: int) -> bool:
    """Whether ``text`` is longer than ``limit`` UTF-8 bytes (the slow, exact check)."""
    n = len(text)
    if n > limit:
        return True
    return n * 4 > limit and len(text.encode("utf-8")) > limit


class EventValidator:
    """Checks one ``Event`` against the contract and the configured limits."""

    def __init__(self, config: IngestConfig) -> None:
        self._c = config
        self._id = config.max_id_bytes
        self._id4 = config.max_id_bytes // 4
        self._text = config.max_text_bytes
        self._text4 = config.max_text_bytes // 4

    def check(self, event: events_pb2.Event) -> str | None:
        eid = event.event_id
        if not eid:
            return "event_id: required"
        if len(eid) > self._id4 and _over(eid, self._id):
            return f"event_id: longer than {self._id} bytes"
        kind = event.WhichOneof("payload")
        if kind == "inference":
            return self._inference(event.inference)
        if kind == "feedback":
            return self._feedback(event.feedback)
        return "payload: one of inference or feedback is required"

    def _ids(self, prefix: str, fields: tuple[tuple[str, str], ...]) -> str | None:
        for name, value in fields:
            if len(value) > self._id4 and _over(value, self._id):
                return f"{prefix}.{name}: longer than {self._id} bytes"
        return None

    def _inference(self, inf: events_pb2.Inference) -> str | None:
        rid = inf.request_id
        version = inf.model_version
        if not rid:
            return "inference.request_id: required"
        if not version:
            return "inference.model_version: required"
        code, session, user, retry = inf.error_code, inf.session_id, inf.user_id, inf.retry_of
        if max(len(rid), len(version), len(code), len(session), len(user), len(retry)) > self._id4:
            reason = self._ids(
                "inference",
                (
                    ("request_id", rid),
                    ("model_version", version),
                    ("error_code", code),
                    ("session_id", session),
                    ("user_id", user),
                    ("retry_of", retry),
                ),
            )
            if reason:
                return reason
        role = inf.role
        if role not in _ROLES:
            return f"inference.role: unknown enum value {role}"
        latency = inf.latency_ms
        if not (0.0 <= latency < _INF):
            return f"inference.latency_ms: must be a finite number >= 0, got {latency}"
        prompt, response = inf.prompt, inf.response
        if max(len(prompt), len(response)) > self._text4:
            for name, value in (("prompt", prompt), ("response", response)):
                if _over(value, self._text):
                    return f"inference.{name}: longer than {self._text} bytes"
        lps = inf.token_logprobs
        if lps:
            if len(lps) > self._c.max_logprobs:
                return f"inference.token_logprobs: more than {self._c.max_logprobs} values"
            if not (min(lps) > -_INF and max(lps) <= 0.0) or any(x != x for x in lps):
                for i, lp in enumerate(lps):
                    if not (-_INF < lp <= 0.0):
                        return (
                            f"inference.token_logprobs[{i}]: must be a finite number <= 0, got {lp}"
                        )
        attrs = inf.attributes
        if attrs:
            return self._attributes("inference.attributes", attrs)
        return None

    def _feedback(self, fb: events_pb2.Feedback) -> str | None:
        rid = fb.request_id
        if not rid:
            return "feedback.request_id: required"
        user, session = fb.user_id, fb.session_id
        if max(len(rid), len(user), len(session)) > self._id4:
            reason = self._ids(
                "feedback", (("request_id", rid), ("user_id", user), ("session_id", session))
            )
            if reason:
                return reason
        if fb.HasField("rating"):
            r = fb.rating
            if not (0.0 <= r <= 1.0):
                return f"feedback.rating: must be within [0, 1], got {r}"
        signal = fb.signal
        if signal not in _SIGNALS:
            return f"feedback.signal: unknown enum value {signal}"
        correction = fb.correction
        if len(correction) > self._text4 and _over(correction, self._text):
            return f"feedback.correction: longer than {self._text} bytes"
        attrs = fb.attributes
        if attrs:
            return self._attributes("feedback.attributes", attrs)
        return None

    def _attributes(self, field: str, attrs: object) -> str | None:
        c = self._c
        items = attrs.items()  # type: ignore[attr-defined]
        if len(items) > c.max_attributes:
            return f"{field}: more than {c.max_attributes} entries"
        for key, value in items:
            if _over(key, c.max_attribute_key_bytes):
                return f"{field}: key longer than {c.max_attribute_key_bytes} bytes"
            if _over(value, c.max_attribute_value_bytes):
                return f"{field}[{key!r}]: value longer than {c.max_attribute_value_bytes} bytes"
        return None
