"""The telemetry stage: OpenTelemetry providers, exporters and the daemon's own views.

Configuration follows the OpenTelemetry SDK's standard variables, read once
at start: ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER`` (+ ``_ARG``), ``OTEL_SDK_DISABLED``, and
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the per-signal ``..._TRACES_ENDPOINT`` /
``..._METRICS_ENDPOINT``) with the exporter's own ``OTEL_EXPORTER_OTLP_*``
options. Without an endpoint nothing is exported over the network; metrics
are always readable at ``/metrics`` in the Prometheus text format.

The tracer and meter providers belong to this stage (they are not installed
as the process-wide globals), so several daemons in one process (tests) do
not see each other's spans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from atlas_sidecar_client.pb import events_pb2
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from prometheus_client import CollectorRegistry, generate_latest

from sidecar import __version__
from sidecar import instruments as ins
from sidecar._aio import cancel_and_wait, spawn
from sidecar.config import TelemetryConfig
from sidecar.errors import ConfigError
from sidecar.ingest import BatchInfo
from sidecar.scoring import WeightTable
from sidecar.store import IngestResult, ProcessorRunner, Store, StoreWriter, read_history
from sidecar.telemetry._cardinality import VersionLabels
from sidecar.telemetry._traffic import TrafficView, forget_cursor

__all__ = ["EXCLUDED_SERVICES", "TERMINAL_STATES", "Telemetry"]

log = logging.getLogger(__name__)

#: gRPC services never traced: probes and tooling, not work.
EXCLUDED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")

_TRUE = {"1", "true", "yes", "on"}
_ACCEPTED = {"outcome": "accepted"}
_DUPLICATE = {"outcome": "duplicate"}
_REJECTED = {"outcome": "rejected"}
_OUTCOMES = (_ACCEPTED, _DUPLICATE, _REJECTED)


def _endpoint(env: Mapping[str, str], signal: str) -> str | None:
    return env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )


def _check_protocol(env: Mapping[str, str], signal: str) -> None:
    proto = env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if proto != "grpc":
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={proto!r}: this build exports OTLP over gRPC only "
            "(set it to 'grpc' or unset it)"
        )


class Telemetry:
    """Tracing, metrics and the traffic view of one daemon.

    ``start()`` installs the instruments every stage uses
    (:mod:`sidecar.instruments`), hooks the ingest batches and
    starts following the log and the learning history; ``shutdown()`` flushes
    and removes them. Both are idempotent. With ``telemetry.enabled: false``
    (or ``OTEL_SDK_DISABLED=true``) nothing is recorded and ``/metrics`` is off.
    """

    def __init__(
        self,
        config: TelemetryConfig,
        *,
        store: Store,
        writer: StoreWriter,
        processors: ProcessorRunner | None = None,
        open_streams: Callable[[], int] | None = None,
        span_exporter: SpanExporter | None = None,
        metric_readers: Sequence[MetricReader] = (),
        environ: Mapping[str, str] | None = None,
        pinned_versions: Callable[[], Iterable[str]] | None = None,
        weights: WeightTable | None = None,
    ) -> None:
        """``weights``: the configured scoring table, so that the rewards in
        ``/metrics`` and the dashboard are the training data's rewards."""
        env = dict(os.environ if environ is None else environ)
        self.config = config
        self.enabled = config.enabled and env.get("OTEL_SDK_DISABLED", "").lower() not in _TRUE
        self._env = env
        self._store = store
        self._writer = writer
        self._processors = processors
        self._open_streams = open_streams
        self._span_exporter = span_exporter
        self._extra_readers = list(metric_readers)
        # ingest spans started at submit, by id of their batch, until acked
        self._pending_ingest: dict[int, Any] = {}
        # Events acked by outcome (accepted, duplicate, rejected): plain
        # integers on the hot path, read by an observable counter at export
        # (a synchronous counter's add with an attribute takes about 11 us,
        # up to three per batch).
        self._ingest_counts = [0, 0, 0]
        # Whether spans go anywhere (an OTLP endpoint or a given exporter).
        # Without one, no ingest span is made: a recording span per batch,
        # exported nowhere, took about 38 us (about 4% of the daemon's CPU
        # for a batch of 100 events).
        self.traces_exported = self.enabled and (
            span_exporter is not None or bool(_endpoint(env, "TRACES"))
        )
        if self.enabled:
            for signal in ("TRACES", "METRICS"):
                if _endpoint(env, signal):
                    _check_protocol(env, signal)
        self.registry = CollectorRegistry()
        self.traffic = (
            TrafficView(
                store,
                writer,
                config,
                labels=VersionLabels(config.max_versions, pinned_versions),
                table=weights,
            )
            if self.enabled
            else None
        )
        self.tracer_provider: TracerProvider | None = None
        self.meter_provider: MeterProvider | None = None
        self.instruments: ins.Instruments | None = None
        self._history_task: asyncio.Task[None] | None = None
        self._history_seq = 0
        #: Latest rollout state seen in the history: {"state", "weight_bps", ...}.
        self.rollout_gauges: dict[str, float] = {}
        self._started = False

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        if not self.enabled:
            await self._writer.run(lambda txn: forget_cursor(txn, self._store))
            return
        resource = self._resource()
        tp = TracerProvider(resource=resource)
        if self._span_exporter is not None:
            tp.add_span_processor(SimpleSpanProcessor(self._span_exporter))
        if _endpoint(self._env, "TRACES"):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        readers: list[MetricReader] = [
            PrometheusMetricReader(registry=self.registry, disable_target_info=False),
            *self._extra_readers,
        ]
        if _endpoint(self._env, "METRICS"):
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        mp = MeterProvider(
            metric_readers=readers, resource=resource, exemplar_filter=AlwaysOffExemplarFilter()
        )
        self.tracer_provider, self.meter_provider = tp, mp
        self.instruments = ins.Instruments(
            tp.get_tracer("atlas-sidecar", __version__), mp.get_meter("atlas-sidecar", __version__)
        )
        self._observe_gauges()
        ins.install(self.instruments)
        self._history_seq = 0
        self._history_task = spawn(self._follow_history(), stage="telemetry", name="history")
        if self.traffic is not None:
            await self.traffic.start()
        log.info(
            "telemetry started",
            extra={
                "otlp_traces": bool(_endpoint(self._env, "TRACES")),
                "otlp_metrics": bool(_endpoint(self._env, "METRICS")),
            },
        )

    async def shutdown(self) -> None:
        if self.traffic is not None:
            await self.traffic.shutdown()
        task, self._history_task = self._history_task, None
        await cancel_and_wait(task)
        if self.instruments is not None:
            ins.uninstall(self.instruments)
        tp, self.tracer_provider = self.tracer_provider, None
        mp, self.meter_provider = self.meter_provider, None
        loop = asyncio.get_running_loop()
        if tp is not None:
            await loop.run_in_executor(None, tp.shutdown)
        if mp is not None:
            await loop.run_in_executor(None, lambda: mp.shutdown(timeout_millis=5000))

    def _resource(self) -> Resource:
        attrs: dict[str, str] = {"service.version": __version__}
        if not self._env.get("OTEL_SERVICE_NAME") and "service.name=" not in self._env.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        ):
            attrs["service.name"] = "atlas-sidecar"
        return Resource.create(attrs)

    # -- gRPC ------------------------------------------------------------

    def grpc_interceptors(self) -> list[Any]:
        """Server interceptors continuing the caller's W3C trace context;
        health checks and reflection are not traced."""
        if not self.enabled or self.tracer_provider is None:
            return []
        from sidecar.telemetry._grpc import TraceContextInterceptor

        extra = self._env.get("OTEL_PYTHON_GRPC_EXCLUDED_SERVICES", "")
        excluded = [*EXCLUDED_SERVICES, *(s.strip() for s in extra.split(",") if s.strip())]
        tracer = self.tracer_provider.get_tracer("atlas-sidecar.grpc", __version__)
        return [TraceContextInterceptor(tracer, excluded)]

    # -- ingest ----------------------------------------------------------

    def begin_ingest(self, batch: BatchInfo) -> Callable[[IngestResult], None] | None:
        """At submit, in the caller's context: starts the batch's span. Its context
        is remembered for the batch's sequence numbers on the writer thread at
        commit, so a processor reading them next always continues this trace."""
        i = self.instruments
        if i is None or not self.traces_exported:
            return None
        sp = i.tracer.start_span("ingest.batch")
        pending = self._pending_ingest
        pending[id(batch)] = sp
        while len(pending) > 10_000:  # batches whose commit failed never finish
            pending.pop(next(iter(pending))).end()
        ctx = sp.get_span_context()

        def on_commit(result: IngestResult) -> None:
            if result.accepted:
                ins.remember_ingest(result.first_seq, result.last_seq, ctx)

        return on_commit

    def observe_ingest(
        self,
        batch: BatchInfo,
        ack: events_pb2.IngestAck,
        seconds: float,
        result: IngestResult | None = None,
    ) -> None:
        """Per ingest batch, once durable: the ingest metrics, and its span when
        spans are exported."""
        i = self.instruments
        if i is None:
            return
        rejected = len(ack.rejected) + ack.rejected_unlisted
        counts = self._ingest_counts
        counts[0] += ack.accepted
        counts[1] += ack.duplicates
        counts[2] += rejected
        if self.traces_exported:
            self._ingest_span(i, batch, ack, rejected, seconds, result)
        i.ingest_commit.record(seconds)

    def _ingest_span(
        self,
        i: ins.Instruments,
        batch: BatchInfo,
        ack: events_pb2.IngestAck,
        rejected: int,
        seconds: float,
        result: IngestResult | None,
    ) -> None:
        attrs: dict[str, int] = {
            "events": batch.size,
            "accepted": ack.accepted,
            "duplicates": ack.duplicates,
            "rejected": rejected,
        }
        if result is not None and result.accepted:
            attrs["first_seq"], attrs["last_seq"] = result.first_seq, result.last_seq
        # Never made current: nothing runs inside it. Started at submit by
        # begin_ingest when that hook is set (then remembered at commit).
        sp = self._pending_ingest.pop(id(batch), None)
        if sp is None:
            sp = i.tracer.start_span("ingest.batch", start_time=time.time_ns() - int(seconds * 1e9))
            if result is not None and result.accepted:
                ins.remember_ingest(result.first_seq, result.last_seq, sp.get_span_context())
        sp.set_attributes(attrs)
        sp.end()

    # -- metrics ---------------------------------------------------------

    def metrics_text(self) -> bytes:
        """The Prometheus text exposition of every instrument."""
        return generate_latest(self.registry)

    def _observe_gauges(self) -> None:
        assert self.meter_provider is not None
        m = self.meter_provider.get_meter("atlas-sidecar.gauges", __version__)

        def queue_depth(_o: CallbackOptions) -> Iterable[Observation]:
            yield Observation(self._writer.queue_depth)

        def streams(_o: CallbackOptions) -> Iterable[Observation]:
            if self._open_streams is not None:
                yield Observation(self._open_streams())

        def lag(_o: CallbackOptions) -> Iterable[Observation]:
            if self._processors is not None:
                for name, st in self._processors.stats.items():
                    yield Observation(st.lag, {"processor": name})

        def store_bytes(_o: CallbackOptions) -> Iterable[Observation]:
            with contextlib.suppress(Exception):
                yield Observation(self._store.stats()["used_bytes"])

        def rollout(_o: CallbackOptions) -> Iterable[Observation]:
            g = self.rollout_gauges
            if g:
                yield Observation(g.get("candidate_weight_bps", 0.0))

        def rollout_active(_o: CallbackOptions) -> Iterable[Observation]:
            yield Observation(self.rollout_gauges.get("active", 0.0))

        def ingest_events(_o: CallbackOptions) -> Iterable[Observation]:
            for n, attrs in zip(self._ingest_counts, _OUTCOMES, strict=True):
                if n:
                    yield Observation(n, attrs)

        m.create_observable_counter(
            "atlas_ingest_events", [ingest_events], unit="1", description="Events by outcome"
        )

        m.create_observable_gauge(
            "atlas_ingest_queue_depth",
            [queue_depth],
            unit="1",
            description="Jobs waiting for the store writer",
        )
        m.create_observable_gauge(
            "atlas_ingest_open_streams", [streams], unit="1", description="Open ingest streams"
        )
        m.create_observable_gauge(
            "atlas_processor_lag_events",
            [lag],
            unit="1",
            description="Events in the log a processor has not read yet",
        )
        m.create_observable_gauge(
            "atlas_store_used", [store_bytes], unit="By", description="Bytes used by the store"
        )
        m.create_observable_gauge(
            "atlas_rollout_candidate_weight_bps",
            [rollout],
            unit="1",
            description="The candidate's share of traffic in basis points (latest rollout)",
        )
        m.create_observable_gauge(
            "atlas_rollout_active",
            [rollout_active],
            unit="1",
            description="1 while a rollout is in progress",
        )

    # -- the learning history ----------------------------------------------

    async def _follow_history(self) -> None:
        while True:
            try:
                self.fold_history()
            except Exception:
                log.exception("telemetry: reading the learning history failed")
            await asyncio.sleep(1.0)

    def fold_history(self) -> None:
        """Counts new history entries into the learning and rollout metrics."""
        i = self.instruments
        if i is None:
            return
        with self._store.read() as txn:
            docs = list(read_history(txn, self._store, since_seq=self._history_seq + 1))
        for doc in docs:
            self._history_seq = max(self._history_seq, int(doc.get("seq", 0)))
            kind = doc.get("kind", "")
            if kind == "trigger":
                i.learning_triggers.add(1, {"reason": _reason(doc)})
            elif kind == "trigger_suppressed":
                i.learning_suppressed.add(1, {"reason": _reason(doc)})
            elif kind in _UPDATE_OUTCOMES:
                i.learning_updates.add(1, {"outcome": _UPDATE_OUTCOMES[kind]})
            if kind == "rollout_transition":
                to_state = _state(doc, "to_state", "to")
                i.rollout_transitions.add(
                    1, {"to_state": to_state, "from_state": _state(doc, "from_state", "from")}
                )
                weight = _number(doc, "candidate_weight_bps", "weight_bps")
                self.rollout_gauges = {
                    "active": 0.0 if to_state in TERMINAL_STATES else 1.0,
                    "candidate_weight_bps": weight if weight is not None else 0.0,
                }
            elif kind in ("promoted", "rollback"):
                self.rollout_gauges = {
                    "active": 0.0,
                    "candidate_weight_bps": 10000.0 if kind == "promoted" else 0.0,
                }


_UPDATE_OUTCOMES = {
    "dataset": "dataset",
    "training_started": "training_started",
    "training_succeeded": "training_succeeded",
    "training_failed": "training_failed",
    "candidate_registered": "candidate_registered",
    "promoted": "promoted",
    "rollback": "rolled_back",
}

#: Rollout states after which nothing more happens.
TERMINAL_STATES = frozenset({"PROMOTED", "ROLLED_BACK", "ABORTED"})


def _reason(doc: Mapping[str, Any]) -> str:
    # ``trigger`` is the condition's short name (count, time, drop, errors,
    # manual); ``reason`` is prose. Label values need the short one.
    value = doc.get("trigger") or doc.get("reason") or "unknown"
    # Reasons are label values: keep the cardinality of a short word.
    return str(value).split(":", 1)[0].split()[0][:40] if str(value).strip() else "unknown"


def _state(doc: Mapping[str, Any], *keys: str) -> str:
    for key in keys:
        value = doc.get(key)
        if value:
            return str(value).removeprefix("ROLLOUT_STATE_").upper()
    return ""


def _number(doc: Mapping[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = doc.get(key)
        if isinstance(value, int | float):
            return float(value)
    return None
