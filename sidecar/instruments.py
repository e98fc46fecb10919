"""Spans and metrics for every stage: the one module stages import to be seen.

Usage from a stage::

    from sidecar import instruments as ins

    with ins.span("learning.trigger", reason="count", samples=120):
        append_history(txn, store, "trigger", reason="count", **ins.trace_fields())
    ...
    # later, maybe after a restart, in another task:
    with ins.span("training.run", parent=trigger_doc, update_id=uid):
        ...

Learning and rollout *metrics* need no call: the telemetry stage counts them
from the learning history. Directives are counted with :func:`directive_sent`
and :func:`directive_applied`.

Rules this module keeps for its callers:

- Spans are per batch or per decision, never per event.
- Before :class:`~sidecar.telemetry.Telemetry` starts (unit tests, tools) or
  with telemetry disabled, every helper is a cheap no-op.
- Trace context crosses three kinds of boundary, each with one helper:
  the writer thread (:func:`carry` wraps a function given to
  ``StoreWriter.run``), asyncio tasks (they copy the context themselves), and
  durable records (:func:`traceparent` gives a W3C string to store beside a
  history entry; ``span(..., parent=that_string)`` continues it later, even
  after a restart).
- No helper raises into the caller because of telemetry.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import Meter, NoOpMeter
from opentelemetry.trace import Link, Span, SpanContext, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "SCORE_BUCKETS",
    "SECONDS_BUCKETS",
    "Instruments",
    "auth_denied",
    "carry",
    "context_from",
    "current",
    "directive_applied",
    "directive_sent",
    "feedback",
    "feedback_signals",
    "ingest_contexts",
    "install",
    "link_ingests",
    "log_batch_span",
    "model_traffic",
    "processor_batch",
    "remember_ingest",
    "span",
    "trace_fields",
    "traceparent",
    "uninstall",
    "view_batch",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Histogram boundaries for durations in seconds (commit latency, model latency).
SECONDS_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
#: Boundaries for scores and rewards in [0, 1].
SCORE_BUCKETS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

_PROPAGATOR = TraceContextTextMapPropagator()
_NOOP_TRACER: Tracer = trace.NoOpTracer()

AttrValue = str | bool | int | float | Sequence[str] | Sequence[int] | Sequence[float]


@dataclass
class Instruments:
    """The daemon's OpenTelemetry instruments. Names follow Prometheus
    conventions once exported: the unit becomes a suffix (``_seconds``) and
    monotonic counters end in ``_total``."""

    tracer: Tracer
    meter: Meter
    enabled: bool = True
    _made: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = self.meter
        self.ingest_commit = m.create_histogram(
            "atlas_ingest_commit_duration",
            unit="s",
            description="Time from a batch's arrival to its durable ack (its count is batches acked)",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.processor_events = m.create_counter(
            "atlas_processor_events", unit="1", description="Events processed, by processor"
        )
        self.processor_batch = m.create_histogram(
            "atlas_processor_batch_duration",
            unit="s",
            description="Time to process one batch of the log, by processor",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.model_requests = m.create_counter(
            "atlas_model_requests", unit="1", description="Inference records by version and role"
        )
        self.model_errors = m.create_counter(
            "atlas_model_errors", unit="1", description="Failed inferences by version and role"
        )
        self.model_latency = m.create_histogram(
            "atlas_model_latency_sampled",
            unit="s",
            description="Inference latency by version (a sample of each batch; see docs)",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.model_latency_sum = m.create_counter(
            "atlas_model_latency",
            unit="s",
            description="Sum of inference latencies, by version (exact)",
        )
        self.model_feedback = m.create_histogram(
            "atlas_model_feedback_reward_sampled",
            unit="1",
            description="Feedback reward in [0, 1] by version (a sample of each batch)",
            explicit_bucket_boundaries_advisory=SCORE_BUCKETS,
        )
        self.model_feedback_count = m.create_counter(
            "atlas_model_feedback", unit="1", description="Feedback events by version (exact)"
        )
        self.model_feedback_sum = m.create_counter(
            "atlas_model_feedback_reward",
            unit="1",
            description="Sum of feedback rewards by version (exact)",
        )
        self.feedback_events = m.create_counter(
            "atlas_feedback_events", unit="1", description="Feedback events by signal"
        )
        # Learning and rollout counters are fed from the learning history by
        # the telemetry stage, so every stage that appends history is counted.
        self.learning_triggers = m.create_counter(
            "atlas_learning_triggers", unit="1", description="Learning triggers fired, by reason"
        )
        self.learning_suppressed = m.create_counter(
            "atlas_learning_triggers_suppressed",
            unit="1",
            description="Triggers that were due but held back, by reason",
        )
        self.learning_updates = m.create_counter(
            "atlas_learning_updates", unit="1", description="Learning updates by outcome"
        )
        self.rollout_transitions = m.create_counter(
            "atlas_rollout_transitions", unit="1", description="Rollout transitions by target state"
        )
        self.directives_sent = m.create_counter(
            "atlas_directives_sent", unit="1", description="Directives sent, by kind"
        )
        self.directives_applied = m.create_counter(
            "atlas_directives_applied", unit="1", description="Directive answers, by kind and ok"
        )
        self.auth_denied = m.create_counter(
            "atlas_auth_denied",
            unit="1",
            description="Calls refused for their token, by service and reason",
        )
        self.telemetry_view_events = m.create_counter(
            "atlas_telemetry_view_events",
            unit="1",
            description="Events folded into the traffic view",
        )
        self.telemetry_view_skipped = m.create_counter(
            "atlas_telemetry_view_skipped_events",
            unit="1",
            description="Events the traffic view skipped when too far behind",
        )


_current: Instruments = Instruments(_NOOP_TRACER, NoOpMeter("atlas-sidecar"), enabled=False)


def install(instruments: Instruments) -> None:
    """Makes ``instruments`` the ones every helper uses (done by Telemetry.start)."""
    global _current
    _current = instruments
    # Sequence numbers belong to one store: a new installation (a new app in
    # the same process) must not continue traces of the previous one's log.
    _ingested.clear()


def uninstall(instruments: Instruments) -> None:
    """Back to no-ops, if ``instruments`` is still the installed set."""
    global _current
    if _current is instruments:
        _current = Instruments(_NOOP_TRACER, NoOpMeter("atlas-sidecar"), enabled=False)


def current() -> Instruments:
    return _current


# -- trace context ------------------------------------------------------------


def traceparent() -> str | None:
    """The current span as a W3C ``traceparent`` string, to store in a durable
    record (a history entry, a rollout) and continue later; None without one."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def trace_fields() -> dict[str, str]:
    """``{"traceparent": ...}`` for the current span (empty without one): spread
    it into a history entry so later work continues the same trace."""
    tp = traceparent()
    return {"traceparent": tp} if tp else {}


def context_from(value: str | Mapping[str, Any] | None) -> otel_context.Context | None:
    """A context from a ``traceparent`` string, or from a record holding one
    under the key ``traceparent``. None when there is nothing valid."""
    if isinstance(value, Mapping):
        value = value.get("traceparent")
    if not value or not isinstance(value, str):
        return None
    ctx = _PROPAGATOR.extract({"traceparent": value})
    sc = trace.get_current_span(ctx).get_span_context()
    return ctx if sc.is_valid else None


def carry(fn: Callable[..., T]) -> Callable[..., T]:
    """Wraps ``fn`` so it runs in the caller's context on another thread
    (``StoreWriter.run(carry(fn))``): spans it opens join the caller's trace."""
    ctx = contextvars.copy_context()

    def run(*args: Any) -> T:
        return ctx.run(fn, *args)

    return run


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: str | Mapping[str, Any] | otel_context.Context | None = None,
    links: Sequence[SpanContext] = (),
    start_time_ns: int | None = None,
    **attributes: AttrValue | None,
) -> Iterator[Span]:
    """Opens a span as the current one. ``parent`` continues a stored trace
    (a ``traceparent`` string or a record holding one); otherwise the current
    context is the parent. ``None`` attributes are dropped. An exception
    escaping the block is recorded on the span and re-raised."""
    tracer = _current.tracer
    ctx: otel_context.Context | None
    if parent is None or isinstance(parent, otel_context.Context):
        ctx = parent
    else:
        ctx = context_from(parent)
    attrs = {k: v for k, v in attributes.items() if v is not None}
    with tracer.start_as_current_span(
        name,
        context=ctx,
        links=[Link(sc) for sc in links if sc.is_valid],
        attributes=attrs,
        start_time=start_time_ns,
    ) as sp:
        yield sp


# -- metric helpers (each is one call per batch or decision) --------------------


def _guard(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # telemetry never breaks the caller
        log.debug("telemetry instrument failed", exc_info=True)


def directive_sent(kind: str, n: int = 1) -> None:
    _guard(lambda: _current.directives_sent.add(n, {"kind": kind}))


def auth_denied(service: str, reason: str) -> None:
    _guard(lambda: _current.auth_denied.add(1, {"service": service, "reason": reason}))


def directive_applied(kind: str, ok: bool) -> None:
    _guard(lambda: _current.directives_applied.add(1, {"kind": kind, "ok": str(ok).lower()}))


#: Histogram observations recorded per version per batch. A histogram
#: measurement costs about 10 us in the SDK, so latency and reward histograms
#: get a uniform sample of each batch; exact counts and sums are counters.
HISTOGRAM_SAMPLE = 32


def _sample(values: Sequence[float]) -> Sequence[float]:
    if len(values) <= HISTOGRAM_SAMPLE:
        return values
    return random.sample(list(values), HISTOGRAM_SAMPLE)


def model_traffic(
    version: str,
    role: str,
    requests: int,
    errors: int,
    latencies_s: Sequence[float] = (),
) -> None:
    """One call per version and role per batch of the log."""

    def rec() -> None:
        i = _current
        attrs = {"version": version, "role": role}
        i.model_requests.add(requests, attrs)
        if errors:
            i.model_errors.add(errors, attrs)
        if latencies_s:
            i.model_latency_sum.add(sum(latencies_s), attrs)
            for value in _sample(latencies_s):
                i.model_latency.record(value, attrs)

    _guard(rec)


def feedback(version: str, rewards: Sequence[float]) -> None:
    """One call per version per batch: each feedback event's reward in [0, 1]."""

    def rec() -> None:
        i = _current
        attrs = {"version": version}
        i.model_feedback_count.add(len(rewards), attrs)
        i.model_feedback_sum.add(sum(rewards), attrs)
        for r in _sample(rewards):
            i.model_feedback.record(r, attrs)

    _guard(rec)


def feedback_signals(signals: Mapping[str, int]) -> None:
    """One call per batch: how many feedback events carried each signal."""

    def rec() -> None:
        for name, n in signals.items():
            _current.feedback_events.add(n, {"signal": name})

    _guard(rec)


# -- the log: from ingest batches to the stages that read them -------------------

#: (first_seq, last_seq, span context) of recent ingest batches, so a batch of
#: the log read later continues the trace of the ingest batch that wrote it.
_ingested: deque[tuple[int, int, SpanContext]] = deque(maxlen=4096)
#: Links per log batch span beyond its parent (a batch may hold many ingests).
MAX_LINKS = 32


def remember_ingest(first_seq: int, last_seq: int, span_context: SpanContext) -> None:
    """Called per ingest batch (by the telemetry stage) once it is durable."""
    if last_seq >= first_seq and span_context.is_valid:
        _ingested.append((first_seq, last_seq, span_context))


def ingest_contexts(first_seq: int, last_seq: int) -> list[SpanContext]:
    """Span contexts of the ingest batches that wrote ``first_seq..last_seq``,
    oldest first (at most ``MAX_LINKS + 1``)."""
    out: list[SpanContext] = []
    for first, last, sc in tuple(_ingested):
        if last >= first_seq and first <= last_seq:
            out.append(sc)
            if len(out) > MAX_LINKS:
                break
    return out


def latest_ingest_context() -> otel_context.Context | None:
    """A parent context for work caused by the newest ingest batch (a trigger
    that fires on the data it brought), or None when none is remembered."""
    if not _ingested:
        return None
    return trace.set_span_in_context(trace.NonRecordingSpan(_ingested[-1][2]))


@contextlib.contextmanager
def log_batch_span(
    name: str, first_seq: int, last_seq: int, **attributes: AttrValue | None
) -> Iterator[Span]:
    """A span for work on a batch of the event log (a processor batch): its
    parent is the ingest batch that wrote ``first_seq``; once the batch's range
    is known, :func:`link_ingests` links the other ingest batches it covered.
    Use :func:`carry` to run the work on the writer thread inside it."""
    if not _current.enabled:
        yield trace.INVALID_SPAN
        return
    contexts = ingest_contexts(first_seq, last_seq)
    parent = trace.set_span_in_context(trace.NonRecordingSpan(contexts[0])) if contexts else None
    attrs: dict[str, AttrValue | None] = {"first_seq": first_seq, **attributes}
    with span(name, parent=parent, **attrs) as sp:  # type: ignore[arg-type]
        yield sp


def link_ingests(sp: Span, first_seq: int, last_seq: int) -> None:
    """Once a log batch span knows the range it covered: links to the ingest
    batches that wrote it, beyond its parent (at most ``MAX_LINKS``)."""
    if not _current.enabled or last_seq < first_seq:
        return
    parent = getattr(sp, "parent", None)
    parent_id = parent.span_id if parent is not None else None
    try:
        for sc in ingest_contexts(first_seq, last_seq)[: MAX_LINKS + 1]:
            if sc.span_id != parent_id:
                sp.add_link(sc)
    except Exception:
        log.debug("telemetry link failed", exc_info=True)


def view_batch(events: int, skipped: int) -> None:
    def rec() -> None:
        _current.telemetry_view_events.add(events)
        if skipped:
            _current.telemetry_view_skipped.add(skipped)

    _guard(rec)


def processor_batch(processor: str, events: int, seconds: float) -> None:
    def rec() -> None:
        attrs = {"processor": processor}
        _current.processor_events.add(events, attrs)
        _current.processor_batch.record(seconds, attrs)

    _guard(rec)
