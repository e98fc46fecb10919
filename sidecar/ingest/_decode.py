"""From the bytes of an EventBatch to what the writer stores and the ack reports.

Two paths give the same answers. The compiled one (``_fastpath.c``) walks the
wire format without building protobuf objects and hands back each valid
event's bytes exactly as the client sent them; it leaves any encoding it does
not handle itself to the Python path, event by event. The Python path parses
with protobuf (upb) and checks with :class:`EventValidator`, the reference.
When the extension is missing (or ``ATLAS_SIDECAR_PURE_PYTHON=1``, see
``sidecar/_compiled.py``), the Python path does everything.

An event that is not a valid ``Event`` (its bytes do not parse, or a string
field is not valid UTF-8) is rejected alone. A message that is not an
``EventBatch`` at all raises :class:`BatchDecodeError`, answered with
``INVALID_ARGUMENT``; so does a batch of more than
``ingest.max_events_per_batch`` events (:class:`BatchTooLargeError`), found
by counting the batch's tags before anything is decoded, so such a batch
costs no more memory than its own bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from atlas_sidecar_client.pb import events_pb2
from google.protobuf.message import DecodeError

from sidecar._compiled import compiled_decoder, compiled_reason, event_counter
from sidecar._wire import read_varint
from sidecar.config import IngestConfig
from sidecar.errors import SidecarError
from sidecar.ingest._validate import EventValidator

__all__ = [
    "NOT_AN_EVENT",
    "BatchDecodeError",
    "BatchDecoder",
    "BatchTooLargeError",
    "DecodedBatch",
    "count_events",
    "split_batch",
]

#: Start of the reason of an event whose bytes are not a valid Event.
NOT_AN_EVENT = "event: not a valid Event message"


class BatchDecodeError(SidecarError, ValueError):
    """The message is not a valid EventBatch; the text says where."""


class BatchTooLargeError(BatchDecodeError):
    """The batch has more events than ``ingest.max_events_per_batch``."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"events: more than {limit} in one EventBatch"
            f" (ingest.max_events_per_batch={limit}); send smaller batches"
        )


@dataclass(slots=True)
class DecodedBatch:
    """One batch, split: what to store, what to reject, how many events it had."""

    #: (event_id, serialized Event) of the valid events, in batch order.
    items: list[tuple[bytes, bytes]]
    #: (index in the batch, reason) of the rejected events, by index.
    rejected: list[tuple[int, str]]
    size: int


class BatchDecoder:
    """Splits and validates EventBatch messages under the configured limits."""

    def __init__(self, config: IngestConfig, *, compiled: bool | None = None) -> None:
        """``compiled``: None takes the compiled path when it is built and not
        switched off (``sidecar/_compiled.py``); True requires it (ImportError
        otherwise); False takes the Python path."""
        self._validator = EventValidator(config)
        self._max_events = config.max_events_per_batch
        native = compiled_decoder() if compiled is not False else None
        if compiled and native is None:
            raise ImportError(compiled_reason())
        self._fast = (
            native(
                max_id_bytes=config.max_id_bytes,
                max_text_bytes=config.max_text_bytes,
                max_attributes=config.max_attributes,
                max_attribute_key_bytes=config.max_attribute_key_bytes,
                max_attribute_value_bytes=config.max_attribute_value_bytes,
                max_logprobs=config.max_logprobs,
                roles=sorted(events_pb2.Role.values()),
                signals=sorted(events_pb2.Signal.values()),
            )
            if native is not None
            else None
        )
        self._count = (event_counter() if native is not None else None) or count_events

    @property
    def path(self) -> Literal["compiled", "python"]:
        """Which path decodes batches (shown in status)."""
        return "compiled" if self._fast is not None else "python"

    def decode(self, raw: bytes) -> DecodedBatch:
        """Splits a serialized EventBatch. Raises BatchDecodeError
        (BatchTooLargeError, before decoding, for a batch over the cap)."""
        if self._count(raw, self._max_events) > self._max_events:
            raise BatchTooLargeError(self._max_events)
        fast = self._fast
        if fast is None:
            return self._decode_python(raw)
        try:
            out = fast.decode(raw)
        except ValueError as exc:
            raise BatchDecodeError(str(exc)) from None
        if out is None:  # unusual framing of the batch itself
            return self._decode_python(raw)
        items, rejected, slow, size = out
        if slow:
            self._finish_slow(items, rejected, slow)
        return DecodedBatch(items, rejected, size)

    def decode_message(self, batch: events_pb2.EventBatch) -> DecodedBatch:
        """The same for a batch that is already parsed (in-process callers)."""
        if len(batch.events) > self._max_events:
            raise BatchTooLargeError(self._max_events)
        check = self._validator.check
        items: list[tuple[bytes, bytes]] = []
        rejected: list[tuple[int, str]] = []
        for index, event in enumerate(batch.events):
            reason = check(event)
            if reason is None:
                items.append((event.event_id.encode(), event.SerializeToString()))
            else:
                rejected.append((index, reason))
        return DecodedBatch(items, rejected, len(batch.events))

    # -- the Python path -------------------------------------------------

    def check_event_bytes(self, data: bytes) -> tuple[bytes, None] | tuple[None, str]:
        """(event_id, None) when ``data`` is a valid Event, else (None, reason)."""
        try:
            event = events_pb2.Event.FromString(data)
        except DecodeError as exc:
            return None, f"{NOT_AN_EVENT} ({_upb_reason(exc)})"
        reason = self._validator.check(event)
        if reason is not None:
            return None, reason
        return event.event_id.encode(), None

    def _finish_slow(
        self,
        items: list[tuple[bytes, bytes]],
        rejected: list[tuple[int, str]],
        slow: list[tuple[int, int]],
    ) -> None:
        for position, index in reversed(slow):
            data = items[position][1]
            event_id, reason = self.check_event_bytes(data)
            if event_id is not None:
                items[position] = (event_id, data)
            else:
                del items[position]
                rejected.append((index, reason or NOT_AN_EVENT))
        rejected.sort()

    def _decode_python(self, raw: bytes) -> DecodedBatch:
        try:
            batch = events_pb2.EventBatch.FromString(raw)
        except DecodeError:
            pass
        else:
            return self.decode_message(batch)
        # Some event does not parse: find it, and keep the others.
        items: list[tuple[bytes, bytes]] = []
        rejected: list[tuple[int, str]] = []
        events = split_batch(raw)
        for index, data in enumerate(events):
            event_id, reason = self.check_event_bytes(data)
            if event_id is not None:
                items.append((event_id, data))
            else:
                rejected.append((index, reason or NOT_AN_EVENT))
        return DecodedBatch(items, rejected, len(events))


def _upb_reason(exc: DecodeError) -> str:
    # "Error parsing message with type 'atlas.sidecar.v1.Event': Wire format was corrupt"
    return str(exc).rsplit(": ", 1)[-1] or "does not parse"


def count_events(raw: bytes, limit: int) -> int:
    """The events (field 1, length-delimited, outside any group) of a
    serialized EventBatch, counted from its tags and lengths alone. Stops at
    ``limit + 1``, and where the framing breaks (decoding reports that)."""
    count = depth = pos = 0
    end = len(raw)
    try:
        while pos < end and count <= limit:
            tag, pos = read_varint(raw, pos)
            wire = tag & 7
            if wire == 0:
                _, pos = read_varint(raw, pos)
            elif wire == 1 or wire == 5:
                pos += 8 if wire == 1 else 4
            elif wire == 2:
                length, pos = read_varint(raw, pos)
                pos += length
                if pos > end:
                    break
                if depth == 0 and tag >> 3 == 1:
                    count += 1
            elif wire == 3:
                depth += 1
            elif wire == 4 and depth > 0:
                depth -= 1
            else:
                break
    except IndexError:
        pass
    return count


def split_batch(raw: bytes) -> list[bytes]:
    """The bytes of each event of a serialized EventBatch, in order; other
    fields of the batch (and field 1 with another wire type) are skipped, as
    protobuf skips unknown fields. Raises BatchDecodeError naming the byte
    offset where the framing breaks (groups are refused here too)."""
    events: list[bytes] = []
    pos, end = 0, len(raw)
    while pos < end:
        start = pos
        try:
            tag, pos = read_varint(raw, pos)
            wire = tag & 7
            if tag >> 3 == 0 or wire not in (0, 1, 2, 5):
                raise IndexError(start)
            if wire == 0:
                _, pos = read_varint(raw, pos)
            elif wire == 2:
                length, pos = read_varint(raw, pos)
                if length > end - pos:
                    raise IndexError(start)
                if tag >> 3 == 1:
                    events.append(raw[pos : pos + length])
                pos += length
            else:
                pos += 8 if wire == 1 else 4
                if pos > end:
                    raise IndexError(start)
        except IndexError:
            raise BatchDecodeError(
                f"EventBatch: malformed at byte {start}: a field runs past the end of the message"
                " or has an invalid encoding"
            ) from None
    return events
