"""The compiled ingest path against the reference (upb + EventValidator).

For random events, valid and not, for byte-level mutations of serialized
batches and for unusual encodings (merged duplicates, both oneof members,
unknown fields, groups, invalid UTF-8), the compiled decoder must give what
the reference gives event by event: the same accepted events (their bytes
unchanged), the same rejection indexes and reasons. Where the reference
cannot parse an event at all, the decoder must reject that event (and only
because it does not parse). It must never crash on arbitrary bytes.
"""

from __future__ import annotations

import math
import os
import struct

import pytest
from atlas_sidecar_client.pb import events_pb2
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sidecar._compiled import PURE_PYTHON_ENV, compiled_decoder, compiled_reason, row_builder
from sidecar.config import IngestConfig
from sidecar.ingest import (
    NOT_AN_EVENT,
    BatchDecodeError,
    BatchDecoder,
    DecodedBatch,
    EventValidator,
    split_batch,
)
from sidecar.store import append_rows

# make install builds the extension. Not built is a failure here (a broken
# build must not pass quietly); only an explicit ATLAS_SIDECAR_PURE_PYTHON=1
# leaves these comparisons out.
pytestmark = pytest.mark.skipif(
    compiled_decoder() is None and os.environ.get(PURE_PYTHON_ENV) is not None,
    reason=compiled_reason(),
)


def test_the_compiled_path_is_built() -> None:
    assert compiled_decoder() is not None, compiled_reason()


# Small limits make "over the limit" cheap to generate.
SMALL = IngestConfig(
    max_id_bytes=8,
    max_text_bytes=16,
    max_attributes=3,
    max_attribute_key_bytes=4,
    max_attribute_value_bytes=6,
    max_logprobs=4,
)
DEFAULT = IngestConfig()
#: ``make sanitize`` runs these tests against an AddressSanitizer/UBSan build
#: with this many times the examples.
SCALE = max(1, int(os.environ.get("ATLAS_SIDECAR_EXAMPLES_SCALE", "1")))
SETTINGS = settings(
    max_examples=300 * SCALE,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)


def reference(raw: bytes, config: IngestConfig) -> DecodedBatch | None:
    """upb and EventValidator: the whole batch when upb parses it, else event
    by event; None when not even the batch's framing holds."""
    validator = EventValidator(config)
    items: list[tuple[bytes, bytes]] = []
    rejected: list[tuple[int, str]] = []
    try:
        events = list(events_pb2.EventBatch.FromString(raw).events)
    except DecodeError:
        try:
            slices = split_batch(raw)
        except BatchDecodeError:
            return None
        events = []
        for index, data in enumerate(slices):
            try:
                events.append(events_pb2.Event.FromString(data))
            except DecodeError:
                events.append(None)
                rejected.append((index, NOT_AN_EVENT))
    for index, event in enumerate(events):
        if event is None:
            continue
        reason = validator.check(event)
        if reason is None:
            items.append((event.event_id.encode(), event.SerializeToString()))
        else:
            rejected.append((index, reason))
    rejected.sort()
    return DecodedBatch(items, rejected, len(events))


def assert_agree(raw: bytes, config: IngestConfig = SMALL) -> DecodedBatch | None:
    expected = reference(raw, config)
    decoder = BatchDecoder(config, compiled=True)
    if expected is None:
        with pytest.raises(BatchDecodeError, match=r"EventBatch: malformed at byte \d+"):
            decoder.decode(raw)
        return None
    got = decoder.decode(raw)
    assert got.size == expected.size
    assert [i for i, _ in got.rejected] == [i for i, _ in expected.rejected]
    for (_, mine), (_, theirs) in zip(got.rejected, expected.rejected, strict=True):
        if theirs == NOT_AN_EVENT:  # upb refused the event's bytes
            assert mine.startswith(NOT_AN_EVENT) or mine.endswith(": invalid UTF-8"), mine
        else:
            assert mine == theirs
    assert [e for e, _ in got.items] == [e for e, _ in expected.items]
    for (_, mine), (_, theirs) in zip(got.items, expected.items, strict=True):
        assert events_pb2.Event.FromString(mine) == events_pb2.Event.FromString(theirs)
    try:
        slices = split_batch(raw)
    except BatchDecodeError:
        return got
    # The bytes stored are the client's own, unchanged.
    bad = {i for i, _ in got.rejected}
    assert [d for _, d in got.items] == [d for i, d in enumerate(slices) if i not in bad]
    return got


# -- strategies ------------------------------------------------------------
# A valid event, then up to two of its fields set to something drawn from a
# much wider range (over the limits, NaN, unknown enum values, ...), so that
# every check is reached, not only the first ones.

ALPHABET = "abcé"  # é: two bytes, so limits fall inside characters too
ident = st.text(ALPHABET, min_size=1, max_size=3)
opt_ident = st.text(ALPHABET, max_size=3)
wide_text = (
    st.text(max_size=12)
    | st.text(alphabet="é€😀", max_size=6)
    | st.sampled_from(["", "a" * 8, "a" * 9, "é" * 4, "é" * 5, "a" * 16, "a" * 17])
)
f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
f64 = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 5e-324, -5e-324, 1e308, math.inf, -math.inf, math.nan]
)
enum_value = st.integers(-3, 12) | st.integers(-(2**31), 2**31 - 1)
keys = st.text(ALPHABET, max_size=2) | st.sampled_from(["'", '"', "a'b\"", "\x00", "\n", "é"])
wide_keys = st.text(max_size=6) | st.sampled_from(["'", '"', "a'b\"", "\x00", "\n", "😀😀"])
attrs = st.dictionaries(keys, st.text(ALPHABET, max_size=3), max_size=3)
wide_attrs = st.dictionaries(wide_keys, st.text(max_size=8), max_size=5)
logprobs = st.lists(st.floats(-10, 0, width=32), max_size=4)
wide_logprobs = st.lists(f32 | st.floats(-10, 0, width=32), max_size=6)

INFERENCE_WIDE = {
    "request_id": wide_text,
    "model_version": wide_text,
    "error_code": wide_text,
    "session_id": wide_text,
    "user_id": wide_text,
    "retry_of": wide_text,
    "prompt": wide_text,
    "response": wide_text,
    "role": enum_value,
    "latency_ms": f64,
    "token_logprobs": wide_logprobs,
    "attributes": wide_attrs,
}
FEEDBACK_WIDE = {
    "request_id": wide_text,
    "user_id": wide_text,
    "session_id": wide_text,
    "correction": wide_text,
    "signal": enum_value,
    "rating": f32,
    "attributes": wide_attrs,
}


@st.composite
def event(draw: st.DrawFn) -> events_pb2.Event:
    kind = draw(st.sampled_from(["inference", "feedback", "inference", "feedback", None]))
    ev = events_pb2.Event(event_id=draw(ident))
    if draw(st.booleans()):
        ev.time.seconds = draw(st.integers(-(2**40), 2**40))
        ev.time.nanos = draw(st.integers(0, 999_999_999))
    fields: dict[str, object]
    if kind == "inference":
        fields = {
            "request_id": draw(ident),
            "model_version": draw(ident),
            "role": draw(st.sampled_from(events_pb2.Role.values())),
            "prompt": draw(opt_ident),
            "response": draw(opt_ident),
            "latency_ms": draw(st.floats(0, 1e6)),
            "error": draw(st.booleans()),
            "error_code": draw(opt_ident),
            "token_logprobs": draw(logprobs),
            "session_id": draw(opt_ident),
            "user_id": draw(opt_ident),
            "retry_of": draw(opt_ident),
            "attributes": draw(attrs),
        }
        wide = INFERENCE_WIDE
    elif kind == "feedback":
        fields = {
            "request_id": draw(ident),
            "signal": draw(st.sampled_from(events_pb2.Signal.values())),
            "dwell_ms": draw(st.integers(0, 2**32 - 1)),
            "correction": draw(opt_ident),
            "attributes": draw(attrs),
            "user_id": draw(opt_ident),
            "session_id": draw(opt_ident),
        }
        if draw(st.booleans()):
            fields["rating"] = draw(st.floats(0, 1, width=32))
        wide = FEEDBACK_WIDE
    else:
        wide = {}
    corrupt = draw(st.lists(st.sampled_from(["event_id", *wide]), max_size=2))
    for name in corrupt:
        if name == "event_id":
            ev.event_id = draw(wide_text)
        else:
            fields[name] = draw(wide[name])
    if kind == "inference":
        ev.inference.CopyFrom(events_pb2.Inference(**fields))  # type: ignore[arg-type]
    elif kind == "feedback":
        ev.feedback.CopyFrom(events_pb2.Feedback(**fields))  # type: ignore[arg-type]
    return ev


def batch_bytes(events: list[bytes], extra: bytes = b"") -> bytes:
    out = bytearray()
    for data in events:
        out += b"\x0a" + _varint(len(data)) + data
    return bytes(out) + extra


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


# -- the properties --------------------------------------------------------


@SETTINGS
@given(st.lists(event(), max_size=8))
def test_random_events_agree_with_the_reference(events: list[events_pb2.Event]) -> None:
    raw = events_pb2.EventBatch(events=events).SerializeToString()
    got = assert_agree(raw)
    assert got is not None
    assert got.size == len(events)
    assert_agree(raw, DEFAULT)


@SETTINGS
@given(st.lists(st.lists(event(), min_size=1, max_size=3), max_size=5))
def test_merged_encodings_agree(groups: list[list[events_pb2.Event]]) -> None:
    """Concatenated serializations are merged by protobuf: singular fields
    sent twice, both oneof members, logprobs in two pieces."""
    raw = batch_bytes([b"".join(e.SerializeToString() for e in g) for g in groups])
    assert_agree(raw)


INVALID_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"]
MARK = "@@@@"


@SETTINGS
@given(
    st.lists(event(), min_size=1, max_size=5),
    st.data(),
)
def test_invalid_utf8_rejects_only_that_event(
    events: list[events_pb2.Event], data: st.DataObject
) -> None:
    target = data.draw(st.integers(0, len(events) - 1))
    ev = events[target]
    field = data.draw(
        st.sampled_from(
            ["event_id", "prompt", "response", "user_id", "attr_key", "attr_value", "correction"]
        )
    )
    kind = ev.WhichOneof("payload")
    if field == "event_id" or kind is None:
        ev.event_id = MARK
        name = "event_id"
    elif kind == "inference":
        if field in ("attr_key", "attr_value"):
            ev.inference.attributes[MARK if field == "attr_key" else "k"] = (
                MARK if field == "attr_value" else "v"
            )
            name = "inference.attributes"
        else:
            attr = "prompt" if field == "correction" else field
            setattr(ev.inference, attr, MARK)
            name = f"inference.{attr}"
    else:
        if field in ("attr_key", "attr_value"):
            ev.feedback.attributes[MARK if field == "attr_key" else "k"] = (
                MARK if field == "attr_value" else "v"
            )
            name = "feedback.attributes"
        else:
            attr = field if field in ("user_id", "correction") else "correction"
            setattr(ev.feedback, attr, MARK)
            name = f"feedback.{attr}"
    bad = data.draw(st.sampled_from(INVALID_UTF8))
    raw = events_pb2.EventBatch(events=events).SerializeToString()
    assume(raw.count(MARK.encode()) == 1)
    raw = raw.replace(MARK.encode(), bad.ljust(4, b"a"))
    got = assert_agree(raw)
    assert got is not None
    assert (target, f"{name}: invalid UTF-8") in got.rejected
    assert len(got.items) + len(got.rejected) == len(events)


@SETTINGS
@given(
    st.lists(event(), min_size=1, max_size=4),
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "insert", "delete", "truncate"]), st.integers(0, 1 << 16)
        ),
        min_size=1,
        max_size=4,
    ),
    st.binary(min_size=1, max_size=3),
)
def test_mutated_batches_agree_and_never_crash(
    events: list[events_pb2.Event], mutations: list[tuple[str, int]], junk: bytes
) -> None:
    raw = bytearray(events_pb2.EventBatch(events=events).SerializeToString())
    for op, at in mutations:
        if not raw:
            break
        i = at % len(raw)
        if op == "flip":
            raw[i] ^= junk[0] or 0x80
        elif op == "insert":
            raw[i:i] = junk
        elif op == "delete":
            del raw[i]
        else:
            del raw[i:]
    assert_agree(bytes(raw))


@settings(max_examples=500 * SCALE, deadline=None, derandomize=True)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_crash(raw: bytes) -> None:
    assert_agree(raw)
    assert_agree(b"\x0a" + _varint(len(raw)) + raw)  # as the bytes of one event
    for prefix in (b"\x52", b"\x5a", b"\x12"):  # inside an inference, a feedback, a timestamp
        inner = prefix + _varint(len(raw)) + raw
        assert_agree(batch_bytes([b"\x0a\x01a" + inner]))


# -- hand-written cases ----------------------------------------------------


def _raw_event(*fields: bytes) -> bytes:
    return b"".join(fields)


def _str(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _inference(*fields: bytes) -> bytes:
    return _str(10, b"".join(fields))


GOOD_INF = _str(1, b"r") + _str(2, b"v")

UNUSUAL = {
    "unknown varint field": _str(1, b"e") + _inference(GOOD_INF) + _varint(99 << 3) + b"\x01",
    "unknown fixed fields": _str(1, b"e")
    + _inference(GOOD_INF + _varint(40 << 3 | 1) + b"\0" * 8 + _varint(41 << 3 | 5) + b"\0" * 4),
    "a group": _str(1, b"e") + _inference(GOOD_INF) + _varint(50 << 3 | 3) + _varint(50 << 3 | 4),
    "a stray end-group": _str(1, b"e") + _inference(GOOD_INF) + _varint(50 << 3 | 4),
    "wire type 6": _str(1, b"e") + _inference(GOOD_INF) + _varint(50 << 3 | 6),
    "field number 0": _str(1, b"e") + _inference(GOOD_INF) + b"\x02\x00",
    "unpacked logprobs": _str(1, b"e")
    + _inference(GOOD_INF + b"\x4d" + struct.pack("<f", -0.5) + b"\x4d" + struct.pack("<f", 0.5)),
    "packed logprobs of 5 bytes": _str(1, b"e") + _inference(GOOD_INF + _str(9, b"\0" * 5)),
    "padded varint": _str(1, b"e") + _inference(GOOD_INF + b"\x18\x81\x00"),
    "10-byte varint": _str(1, b"e") + _inference(GOOD_INF + b"\x18" + b"\xff" * 9 + b"\x01"),
    "overlong varint": _str(1, b"e") + _inference(GOOD_INF + b"\x18" + b"\xff" * 10 + b"\x01"),
    "role as fixed32": _str(1, b"e") + _inference(GOOD_INF + b"\x1d\x01\0\0\0"),
    "latency as varint": _str(1, b"e") + _inference(GOOD_INF + b"\x30\x05"),
    "event_id twice": _str(1, b"e") + _str(1, b"f") + _inference(GOOD_INF),
    "both payloads": _str(1, b"e") + _inference(GOOD_INF) + _str(11, _str(1, b"r")),
    "inference twice": _str(1, b"e") + _inference(_str(1, b"r")) + _inference(_str(2, b"v")),
    "duplicate attribute key": _str(1, b"e")
    + _inference(GOOD_INF + _str(13, _str(1, b"k") + _str(2, b"1")) + _str(13, _str(1, b"k"))),
    "two long attribute values": _str(1, b"e")
    + _inference(
        GOOD_INF
        + _str(13, _str(1, b"a") + _str(2, b"x" * 10))
        + _str(13, _str(1, b"b") + _str(2, b"y" * 10))
    ),
    "attribute entry with an unknown field": _str(1, b"e")
    + _inference(GOOD_INF + _str(13, _str(1, b"k") + _str(3, b"?"))),
    "timestamp with a string in it": _str(1, b"e") + _str(2, _str(1, b"x")) + _inference(GOOD_INF),
    "timestamp truncated": _str(1, b"e") + _str(2, b"\x08") + _inference(GOOD_INF),
    "many attributes": _str(1, b"e")
    + _inference(GOOD_INF + b"".join(_str(13, _str(1, b"k%d" % i)) for i in range(70))),
    "rating sent twice": _str(1, b"e")
    + _str(11, _str(1, b"r") + b"\x15" + struct.pack("<f", 2.0) + b"\x15" + struct.pack("<f", 0.5)),
}


@pytest.mark.parametrize("data", list(UNUSUAL.values()), ids=list(UNUSUAL))
def test_unusual_encodings_agree(data: bytes) -> None:
    raw = batch_bytes(
        [_str(1, b"a") + _inference(GOOD_INF), data, _str(1, b"z") + _inference(GOOD_INF)]
    )
    got = assert_agree(raw)
    assert got is not None and got.size == 3
    assert [e for e, _ in got.items][:1] == [b"a"] and got.items[-1][0] == b"z"


BATCH_LEVEL = {
    "truncated length": b"\x0a\x05ab",
    "truncated tag": b"\x0a\x01a\x8a",
    "truncated fixed64": b"\x09\x00\x00",
    "a group at the top": b"\x0b\x0c",
    "events as a varint": b"\x08\x01",
    "unknown top-level field": b"\x12\x01x" + b"\x0a\x00",
}


@pytest.mark.parametrize("raw", list(BATCH_LEVEL.values()), ids=list(BATCH_LEVEL))
def test_batch_framing(raw: bytes) -> None:
    assert_agree(raw)


def test_broken_framing_names_the_byte_offset() -> None:
    good = events_pb2.Event(event_id="a", feedback=events_pb2.Feedback(request_id="r"))
    raw = events_pb2.EventBatch(events=[good]).SerializeToString()
    with pytest.raises(BatchDecodeError, match=f"malformed at byte {len(raw)}:"):
        BatchDecoder(SMALL).decode(raw + b"\x0a\x09abc")


def test_typical_events_take_no_slow_path() -> None:
    """The compiled path must handle what clients send without help."""
    native = compiled_decoder()
    assert native is not None
    events = [
        events_pb2.Event(
            event_id="0190f1e2-aaaa-7bbb-8ccc-123456789abc",
            inference=events_pb2.Inference(
                request_id="req-1",
                model_version="model-v12",
                role=events_pb2.PRIMARY,
                prompt="How do I reset my password? ✓",
                response="Open Settings, then Security.",
                latency_ms=123.4,
                error=True,
                error_code="timeout",
                token_logprobs=[-0.5, -0.25, 0.0],
                session_id="s",
                user_id="u",
                retry_of="req-0",
                attributes={"task_id": "support", "intent": "reset"},
            ),
        ),
        events_pb2.Event(
            event_id="0190f1e2-aaaa-7bbb-8ccc-123456789abd",
            feedback=events_pb2.Feedback(
                request_id="req-1",
                rating=0.0,
                signal=events_pb2.EDIT,
                dwell_ms=1200,
                correction="Open Settings.",
                attributes={"k": "v"},
                user_id="u",
                session_id="s",
            ),
        ),
    ]
    events[0].time.GetCurrentTime()
    raw = events_pb2.EventBatch(events=events).SerializeToString()
    c = DEFAULT
    fast = native(
        max_id_bytes=c.max_id_bytes,
        max_text_bytes=c.max_text_bytes,
        max_attributes=c.max_attributes,
        max_attribute_key_bytes=c.max_attribute_key_bytes,
        max_attribute_value_bytes=c.max_attribute_value_bytes,
        max_logprobs=c.max_logprobs,
        roles=events_pb2.Role.values(),
        signals=events_pb2.Signal.values(),
    )
    out = fast.decode(raw)
    assert out is not None
    items, rejected, slow, count = out
    assert (rejected, slow, count) == ([], [], 2)
    # The client's bytes as sent (a map's entries may serialize in another
    # order each time, so compare by content, and check they come from ``raw``).
    assert [eid for eid, _ in items] == [e.event_id.encode() for e in events]
    for (_, stored), event in zip(items, events, strict=True):
        assert stored in raw
        assert events_pb2.Event.FromString(stored) == event


def test_the_python_path_gives_the_same_answers() -> None:
    """The fallback (no compiled module) rejects undecodable events alone too."""
    events = [
        events_pb2.Event(event_id="a", feedback=events_pb2.Feedback(request_id="r")),
        events_pb2.Event(event_id=MARK, feedback=events_pb2.Feedback(request_id="r")),
        events_pb2.Event(event_id="c", feedback=events_pb2.Feedback(request_id="")),
    ]
    raw = events_pb2.EventBatch(events=events).SerializeToString().replace(b"@@@@", b"\xff@@@")
    python = BatchDecoder(SMALL, compiled=False)
    assert python.path == "python"
    got = python.decode(raw)
    assert [e for e, _ in got.items] == [b"a"]
    assert got.rejected[0][0] == 1 and got.rejected[0][1].startswith(NOT_AN_EVENT)
    assert got.rejected[1] == (2, "feedback.request_id: required")
    with pytest.raises(BatchDecodeError, match="malformed at byte"):
        python.decode(raw + b"\x0a\x05")
    compiled = BatchDecoder(SMALL).decode(raw)
    assert compiled.rejected[0] == (1, "event_id: invalid UTF-8")
    assert compiled.items == got.items and compiled.rejected[1] == got.rejected[1]


@settings(max_examples=100 * SCALE, deadline=None, derandomize=True)
@given(
    st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=400)), max_size=50),
    st.integers(0, 2**64 - 200),
    st.integers(0, 2**64 - 1),
)
def test_compiled_rows_are_the_python_rows(
    items: list[tuple[bytes, bytes]], seq: int, now_ms: int
) -> None:
    build = row_builder()
    assert build is not None
    assert build(items, seq, now_ms) == append_rows(items, seq, now_ms)
