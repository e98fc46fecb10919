"""Wires the stages together; the only place that knows their order.

Sinks start first and sources stop first: the store and its writer come up
before anything can produce writes, and on shutdown the gRPC server stops
taking batches, in-flight batches are committed and acked, and only then is
the writer drained and the store closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import grpc
from atlas_sidecar_client.pb import (
    active_learning_pb2,
    active_learning_pb2_grpc,
    admin_pb2,
    admin_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    events_pb2,
    ingest_pb2,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar._admission import CallAdmission
from sidecar._aio import spawn
from sidecar._compiled import compiled_reason
from sidecar._grpc_errors import UndecodableRequestInterceptor
from sidecar._private import restrict_socket, unix_socket_path
from sidecar.admin import AdminHandlers, AdminServicer, status_to_dict
from sidecar.auth import (
    Authenticator,
    AuthInterceptor,
    HttpAuth,
    Role,
    TlsFiles,
    check_exposure,
    new_token,
)
from sidecar.config import SidecarConfig
from sidecar.control import ControlChannel
from sidecar.control.adapters import AdapterStage
from sidecar.errors import ConfigError, PortInUseError, StoreError
from sidecar.ingest import IngestServicer
from sidecar.learning import (
    ActiveLearner,
    ActiveLearningServicer,
    FeedbackAnswerProcessor,
    HashedNgramVectorizer,
    HistoryRetention,
    HoldoutAtCuration,
    HoldoutSet,
    LearningScheduler,
    MemoryConsolidation,
    RegressionSuite,
    SelectiveLearner,
    SelectiveReplayComposer,
    SelectiveReplayStep,
    curation_options,
    learning_quality_report,
)
from sidecar.rollout import RecentGoodAnswers, RegressionCase, RolloutAdmin, RolloutEngine
from sidecar.scoring import FeedbackProcessor, table_from_config
from sidecar.store import (
    FatalHandler,
    PageRelease,
    ProcessorRunner,
    Retention,
    Store,
    StoreHealth,
    StoreWriter,
)
from sidecar.telemetry import LearningMonitor, Telemetry
from sidecar.training import ComposerChain, ModelRecord, ModelRegistry, TrainingStage
from sidecar.web import WebServer

__all__ = ["INGEST_SERVICE", "SidecarApp", "Stage"]

log = logging.getLogger(__name__)

#: The ingest service's name in grpc.health.v1 (NOT_SERVING while the store is full).
INGEST_SERVICE = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name
_SERVICE_NAMES = (
    INGEST_SERVICE,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name,
    active_learning_pb2.DESCRIPTOR.services_by_name["ActiveLearningService"].full_name,
)
#: The services inference servers call: each of their calls takes one of the
#: server.max_concurrent_streams slots (admin and health calls do not).
_PRODUCER_SERVICES = (
    INGEST_SERVICE,
    control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name,
    active_learning_pb2.DESCRIPTOR.services_by_name["ActiveLearningService"].full_name,
)


def _self_target(config: SidecarConfig) -> str:
    """Where an in-process client reaches this daemon's gRPC server.

    With TLS on, a ``unix:`` address (plain: no certificate to check against
    a host name); a daemon with an adapter and TLS must listen on one.
    """
    if config.server.tls.enabled:
        for addr in config.server.listen:
            if addr.startswith("unix:"):
                return addr
        if config.control.adapter.kind != "none":
            raise ConfigError(
                "control.adapter: with server.tls on, the in-process adapter connects over a "
                "unix: socket; add one to server.listen (e.g. unix:/var/run/atlas/sidecar.sock)"
            )
    addr = config.server.listen[0]
    host, _, port = addr.rpartition(":")
    if addr.startswith("unix:") or host not in ("0.0.0.0", "[::]", "::"):
        return addr
    return f"127.0.0.1:{port}"


class Stage(Protocol):
    """What app.py needs of a stage: start and an idempotent shutdown."""

    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...


class _FirstNonEmpty:
    """Regression prompts from the learner's suite, else from the fallback."""

    def __init__(self, suite: RegressionSuite, fallback: RecentGoodAnswers) -> None:
        self._suite = suite
        self._fallback = fallback

    def cases(self, limit: int) -> list[RegressionCase]:
        cases = [
            RegressionCase(p.prompt, p.reference) for p in self._suite.regression_prompts(limit)
        ]
        return cases or self._fallback.cases(limit)


class SidecarApp:
    """The daemon. ``start()`` binds every port or raises; ``shutdown()`` is idempotent."""

    def __init__(
        self,
        config: SidecarConfig,
        *,
        telemetry_options: dict[str, Any] | None = None,
        on_store_fatal: FatalHandler | None = None,
    ) -> None:
        """``on_store_fatal`` is called once when a damaged page is met while
        serving (``atlas-sidecar serve`` exits then); without it the store's
        readers and writers just raise ``StoreCorruptError``."""
        self.config = config
        # -- who may call: tokens and roles (auth.*), TLS (server.tls.*) ---------
        self.auth = Authenticator(
            config.auth.tokens_file, reload_interval=config.auth.reload_interval_seconds
        )
        check_exposure(
            [
                *(("server.listen", a) for a in config.server.listen),
                ("server.http_listen", config.server.http_listen),
            ],
            auth_on=self.auth.enabled,
            allow_unauthenticated=config.auth.allow_unauthenticated,
        )
        tls = config.server.tls
        self.tls = (
            TlsFiles(
                tls.cert_file,
                tls.key_file,
                tls.client_ca_file,
                check_seconds=tls.reload_check_seconds,
            )
            if tls.cert_file is not None and tls.key_file is not None
            else None
        )
        self.store = Store(config.store, on_fatal=on_store_fatal)
        self.writer = StoreWriter(self.store, config.store)
        self.retention = Retention(self.store, self.writer, config.store)
        self.page_release = PageRelease(self.store, config.store.release_mapped_pages_seconds)
        self.ingest = IngestServicer(self.writer, config.ingest)
        self.handlers = AdminHandlers()
        self.handlers.status["ingest"] = self.ingest.status
        self.admission = CallAdmission(
            _PRODUCER_SERVICES,
            max_calls=config.server.max_concurrent_streams,
            max_per_peer=config.server.max_streams_per_peer,
            identity=self._token_name if self.auth.enabled else None,
        )
        self.handlers.status["admission"] = self.admission.status
        self.handlers.status["process"] = self.page_release.status
        self.handlers.status["auth"] = self.auth.status
        # -- control channel (sidecar/control): the desired state, reconciling
        # every connected inference server to it (ControlService.Connect).
        # The rollout engine drives it through the ControlPlane protocol.
        self.control = ControlChannel(
            self.store,
            self.writer,
            config.control,
            may_claim=self._may_claim if self.auth.enabled else None,
        )
        self.handlers.status["control"] = self.control.status
        self.admin = AdminServicer(
            self.store,
            self.writer,
            self.handlers,
            ingest=self.ingest,
            connected_servers=self.control.connected_servers,
            limits=config.admin,
        )
        self.handlers.status["admin"] = self.admin.request_status
        self.health = health.aio.HealthServicer()
        # A full disk turns the ingest service NOT_SERVING until space returns.
        self.store_health = StoreHealth(
            self.store, self.writer, config.store, set_serving=self._ingest_serving
        )
        self.handlers.status["store_health"] = self.store_health.status
        # Stages that read the event log register processors here before start.
        self.processors = ProcessorRunner(self.store, self.writer, [])
        self.handlers.status["processing"] = self.processors.status
        # -- telemetry: tracing, metrics, the traffic view and the learning
        # report. Started before the other stages so their first spans and
        # metrics are recorded; stopped after them (it is not in ``stages``).
        # Pass ``span_exporter``/``metric_readers`` through ``telemetry_options``
        # to capture telemetry in-process (tests).
        self.telemetry = Telemetry(
            config.telemetry,
            store=self.store,
            writer=self.writer,
            processors=self.processors,
            open_streams=lambda: self.ingest.open_streams,
            pinned_versions=self.pinned_versions,
            weights=table_from_config(config.scoring),
            **(telemetry_options or {}),
        )
        if self.telemetry.enabled:
            self.ingest.add_observer(self.telemetry.observe_ingest)
            self.ingest.set_batch_start(self.telemetry.begin_ingest)
        if self.telemetry.traffic is not None:
            self.handlers.status["telemetry"] = self.telemetry.traffic.status
        self.monitor = LearningMonitor(
            self.store, config.telemetry, traffic_source=self.control.desired
        )
        self.handlers.report = self.monitor

        # -- what to learn from, what to remember, when to ask ------------------
        # Memory and the holdout form the regression suite validation probes
        # with; the composer is the learning batch's selection + replay step.
        vectorizer = HashedNgramVectorizer(
            config.selective.vector_dim, config.selective.ngram_sizes
        )
        self.memory = MemoryConsolidation(self.store, config.memory, vectorizer)
        self.selective = SelectiveLearner(self.store, config.selective, self.memory)
        self.holdout = HoldoutSet(self.store, config.holdout)
        self.regression = RegressionSuite(self.store, self.holdout, self.memory)
        self.composer = SelectiveReplayComposer(self.selective, self.memory, self.holdout)
        self.active = ActiveLearner(
            config.active_learning, config.selective.uncertainty, store=self.store
        )
        self.active_servicer = ActiveLearningServicer(
            self.active,
            max_id_bytes=config.ingest.max_id_bytes,
            max_logprobs=config.ingest.max_logprobs,
        )
        self.processors.add(FeedbackAnswerProcessor(self.active, self.store))
        self.handlers.status["selective"] = self.selective.status
        self.handlers.status["memory"] = self.memory.status
        self.handlers.status["holdout"] = self.holdout.status
        self.handlers.status["active_learning"] = self.active.status
        # the learning report's section: memory per task, holdout, ask/answer rates
        self.monitor.sections["learning_quality"] = self.learning_quality
        # Stages started after the writer and before the servers, stopped in
        # reverse order after the servers.
        self.stages: list[Stage] = []
        # The control channel starts before the stages that drive it. A
        # configured adapter (control.adapter) joins it as one more replica,
        # over this daemon's own gRPC address.
        self.stages.append(self.control)
        self.control_adapter = AdapterStage(
            config.control.adapter, _self_target(config), token=self._adapter_token()
        )
        self.stages.append(self.control_adapter)
        if config.control.adapter.kind != "none":
            self.handlers.status["control_adapter"] = self.control_adapter.status

        # -- learning: join/score/curate on the log, the scheduler, training ----
        # Others plug in here: the rollout engine sets
        # ``scheduler.rollout_active`` and appends to ``registry.on_registered``;
        # selective learning and memory append steps to ``training.composer``
        # (a ComposerChain) and may listen to ``scoring.sample_listeners`` (or
        # ``sample_document_listeners``, which skip building a Sample per answer).
        lcfg = config.learning
        self.registry = ModelRegistry(
            self.store, self.writer, base_version=config.training.base_version
        )
        self.scoring = FeedbackProcessor(
            self.store,
            config.scoring,
            baseline_samples=lcfg.baseline_samples,
            recent_samples=lcfg.recent_samples,
            on_primary_version=self.registry.observe_primary_version,
            **curation_options(config),
        )
        self.processors.add(self.scoring)
        self.scheduler = LearningScheduler(
            self.store, lcfg, stable_version=self.registry.stable_version_txn
        )
        self.training = TrainingStage(
            self.store,
            self.writer,
            config,
            scheduler=self.scheduler,
            registry=self.registry,
            scoring=self.scoring,
            holdout=self.holdout,
            pinned_versions=self.pinned_versions,
        )
        self.stages.append(self.training)
        # the learning history, trimmed by age and count on the log's cadence
        self.history_retention = HistoryRetention(
            self.store,
            self.writer,
            lcfg,
            interval_seconds=config.store.retention_interval_seconds,
            batch=config.store.retention_batch,
        )
        self.stages.append(self.history_retention)
        self.handlers.status["history"] = self.history_retention.status
        self.handlers.registry = self.registry
        self.handlers.learning = self.training
        self.handlers.status["learning"] = self.training.status
        self.stages.append(self.active)
        # -- rollout engine (sidecar/rollout): drives the control channel,
        # observes the log for the active rollout, answers the rollout RPCs.
        # It starts after the control channel, whose desired state it reads.
        # Validation probes the holdout and memory first (the learner's own
        # regression suite), recent good answers when those are still empty.
        self.rollouts = RolloutEngine(
            self.store,
            self.writer,
            self.control,
            config.rollout,
            regression=_FirstNonEmpty(self.regression, RecentGoodAnswers(self.store)),
            candidates=self.registry,
            weights=table_from_config(config.scoring),
        )
        self.processors.add(self.rollouts.observer)
        self.stages.append(self.rollouts)
        self.handlers.rollouts = RolloutAdmin(self.rollouts)
        self.handlers.status["rollout"] = self.rollouts.status

        # -- curation <-> selective learning, memory, holdout --------------------
        # A good sample's holdout decision is made when it is first curated,
        # in the transaction that stores it (and so is never undone by a
        # replay). Every dataset snapshot then goes through the selective
        # replay step: held-out requests and prompts out (pairs too), new
        # samples valued and cut at the threshold, highest value first,
        # memory replayed at exactly memory.replay_ratio and consolidated
        # from the samples trained on. Exports skip the holdout as well
        # (TrainingStage.export, atlas-sidecar export).
        self.scoring.sample_document_listeners.append(
            HoldoutAtCuration.for_config(self.holdout, config).on_document
        )
        training_chain = self.training.composer
        if not isinstance(training_chain, ComposerChain):
            raise TypeError("training.composer must be a ComposerChain to add the replay step")
        training_chain.append(
            SelectiveReplayStep(
                self.composer,
                task_attribute=config.memory.task_attribute,
                default_task=config.memory.default_task,
            )
        )
        # Good samples a full batch left out (selective.max_batch_samples)
        # stay pending: the step offers them again with the next batch, and
        # the scheduler counts them as pending.
        self.scheduler.carried = self.selective.pending_count

        # -- learning <-> rollout ---------------------------------------------
        # No update while a rollout runs; a registered candidate may start a
        # rollout (rollout.auto_start); a promotion (or the rollback of one)
        # moves the registry's stable version; a fresh install learns its
        # stable version from the first PRIMARY traffic the registry saw.
        self.scheduler.rollout_active = self.rollouts.rollout_active
        self.registry.on_registered.append(self._auto_rollout)
        self.rollouts.add_stable_hook(self.registry.set_stable)
        self.rollouts.stable_source = self.registry.stable_version
        self.server: grpc.aio.Server | None = None
        self.web: WebServer | None = None
        self.metrics_web: WebServer | None = None
        self._tls_task: asyncio.Task[None] | None = None
        self.ports: dict[str, int] = {}
        self._stopped = asyncio.Event()
        self._started = False
        self._shutdown_done = False

    def _adapter_token(self) -> str | None:
        """A token that never leaves this process, for the in-process adapter."""
        if not self.auth.enabled or self.config.control.adapter.kind == "none":
            return None
        token = new_token()
        self.auth.add_internal(
            "control-adapter (in-process)",
            token,
            [Role.SERVER],
            server_ids=[self.config.control.adapter.server_id],
        )
        return token

    async def _http_feedback(self, raw: bytes) -> Any:
        """``POST /v1/feedback`` on the HTTP listener: one Feedback event, as the gateway takes it."""
        from aiohttp import web
        from atlas_sidecar_client import uuid7
        from atlas_sidecar_client.openai import BadFeedback, parse_feedback

        try:
            f = parse_feedback(raw)
        except BadFeedback as exc:
            return web.json_response({"error": {"message": str(exc)}}, status=400)
        event = events_pb2.Event(
            event_id=uuid7(),
            feedback=events_pb2.Feedback(
                request_id=f.request_id,
                signal=f.signal,  # type: ignore[arg-type]
                dwell_ms=f.dwell_ms,
                correction=f.correction,
                user_id=f.user_id,
                session_id=f.session_id,
            ),
        )
        if f.rating is not None:
            event.feedback.rating = f.rating
        event.time.GetCurrentTime()
        try:
            ack = await self.ingest.record(events_pb2.EventBatch(events=[event]))
        except StoreError as exc:
            return web.json_response({"error": {"message": str(exc)}}, status=503)
        if ack.rejected:
            return web.json_response({"error": {"message": ack.rejected[0].reason}}, status=400)
        return web.json_response({"ok": True, "event_id": event.event_id}, status=202)

    def _token_name(self, context: grpc.aio.ServicerContext) -> str | None:
        who = self.auth.identity_of(context.invocation_metadata())
        return who.name if who is not None else None

    def _may_claim(self, context: grpc.aio.ServicerContext, server_id: str) -> str | None:
        who = self.auth.identity_of(context.invocation_metadata())
        if who is None:  # the interceptor let no anonymous caller this far
            return "no valid token"
        if not who.may_claim(server_id):
            return (
                f"hello.server_id: token {who.name!r} may not claim {server_id!r} "
                "(its server_ids in auth.tokens_file)"
            )
        return None

    async def _auto_rollout(self, record: ModelRecord) -> str | None:
        if not self.config.rollout.auto_start or self.rollouts.active() is not None:
            return None
        rollout = await self.rollouts.start_rollout(
            record.version,
            reason="candidate registered (rollout.auto_start)",
            artifact_uri=record.artifact_uri,
            update_id=record.update_id,
        )
        return rollout.rollout_id

    def pinned_versions(self) -> set[str]:
        """Versions that keep their own metrics and status entry past
        telemetry.max_versions: the stable one and those being rolled out."""
        out: set[str] = set()
        stable = self.registry.stable_version()
        if stable:
            out.add(stable)
        active = self.rollouts.active()
        if active is not None:
            out.update((active.candidate, active.stable))
        desired = self.control.desired()
        if desired is not None:
            out.add(desired.stable_version)
            out.update(r.version for r in desired.routes)
            if desired.shadow is not None:
                out.add(desired.shadow.version)
        out.discard("")
        return out

    def learning_quality(self) -> dict[str, Any]:
        """The learning report's quality section, for the report and telemetry.

        ``{memory_size_per_task, memory_size, task_boundaries, holdout_size,
        holdout_size_per_task, ask_rate, answer_rate, asks, answers}``; the
        same figures are in status under ``memory``, ``holdout`` and
        ``active_learning``. Reads the store (short read transactions): call
        it after ``start()``.
        """
        return learning_quality_report(self.memory, self.holdout, self.active)

    def status_dict(self) -> dict[str, Any]:
        return status_to_dict(self.admin.status())

    async def start(self) -> None:
        """Opens the store and binds every listener.

        Raises:
            DataDirLockedError, SchemaVersionError, StoreError: the store.
            PortInUseError: a listen address could not be bound.
        """
        cfg = self.config
        self.store.open()
        try:
            await self.auth.start()
            await self.writer.start()
            await self.retention.start()
            await self.page_release.start()
            await self.telemetry.start()
            for stage in self.stages:
                await stage.start()
            await self.processors.start()
            await self._start_grpc()
            await self.store_health.start()
            metrics = self.telemetry.metrics_text if self.telemetry.enabled else None
            ssl_context = self.tls.http_context() if self.tls is not None else None
            if cfg.server.http_listen:
                self.web = WebServer(
                    cfg.server.http_listen,
                    self.status_dict,
                    metrics=metrics,
                    report=self.monitor.report_dict,
                    rollout=self.monitor.rollout_dict,
                    refresh_seconds=cfg.telemetry.dashboard_refresh_seconds,
                    feedback=self._http_feedback,
                    ssl_context=ssl_context,
                )
                HttpAuth(
                    self.auth,
                    session_seconds=cfg.auth.session_seconds,
                    secure_cookie=ssl_context is not None,
                ).install(self.web.app)
                await self.web.start()
                self.ports["http"] = self.web.port or 0
            if cfg.server.metrics_listen:
                self.metrics_web = WebServer.metrics_only(
                    cfg.server.metrics_listen, metrics, ssl_context=ssl_context
                )
                await self.metrics_web.start()
                self.ports["metrics"] = self.metrics_web.port or 0
            if self.tls is not None:
                self._tls_task = spawn(self._watch_tls(self.tls), stage="auth", name="tls-watch")
        except BaseException:
            await self.shutdown()
            raise
        self._started = True
        log.info(
            "atlas-sidecar serving",
            extra={
                "listen": cfg.server.listen,
                "http": cfg.server.http_listen,
                "data_dir": str(self.store.data_dir),
            },
        )

    async def _watch_tls(self, tls: TlsFiles) -> None:
        """Loads renewed TLS files into the HTTP listeners (gRPC asks at each handshake)."""
        while True:
            await asyncio.sleep(self.config.server.tls.reload_check_seconds)
            tls.check()

    def rollout_active(self) -> bool:
        """For the learning scheduler: True while a rollout is in progress."""
        return self.rollouts.rollout_active()

    async def _start_grpc(self) -> None:
        cfg = self.config.server
        # First, so that its deserializer is the one grpc calls: a request
        # that cannot be decoded answers INVALID_ARGUMENT naming the field.
        self.decode_errors = UndecodableRequestInterceptor()
        # Before it: a caller without the method's role is refused before its
        # request is decoded and before it takes one of the call slots.
        interceptors = [self.decode_errors, self.admission, *self.telemetry.grpc_interceptors()]
        if self.auth.enabled:
            interceptors.insert(0, AuthInterceptor(self.auth, self.config.auth.open))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", 0),
                # A replica whose connection died without a FIN is noticed
                # within ~30 s, so its server_id can connect again.
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
            ],
        )
        self.ingest.add_to_server(server)
        if self.ingest.decoder.path == "python":
            log.warning(
                "ingest runs its pure-Python path (slower)", extra={"reason": compiled_reason()}
            )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(self.admin, server)
        active_learning_pb2_grpc.add_ActiveLearningServiceServicer_to_server(
            self.active_servicer, server
        )
        control_pb2_grpc.add_ControlServiceServicer_to_server(self.control.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if cfg.reflection:
            reflection.enable_server_reflection(
                (
                    *_SERVICE_NAMES,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ),
                server,
            )
        self.server = server
        for addr in cfg.listen:
            try:
                if self.tls is not None and not addr.startswith("unix:"):
                    port = server.add_secure_port(addr, self.tls.grpc_credentials())
                else:
                    port = server.add_insecure_port(addr)
            except RuntimeError as exc:
                raise PortInUseError(f"cannot listen on {addr} (server.listen): {exc}") from exc
            if port == 0 and not addr.startswith("unix:"):
                raise PortInUseError(f"cannot listen on {addr} (server.listen): address in use")
            if addr.startswith("unix:"):
                restrict_socket(unix_socket_path(addr), cfg.unix_socket_group)
            self.ports[addr] = port
        await server.start()
        for name in ("", *_SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def _ingest_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(INGEST_SERVICE, status)

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    async def shutdown(self) -> None:
        """NOT_SERVING, stop reading, commit and ack in-flight batches, close.

        Safe before start and safe twice.
        """
        if self._shutdown_done:
            return
        self._shutdown_done = True
        grace = self.config.server.grace_seconds
        await self.health.enter_graceful_shutdown()
        await self.store_health.shutdown()
        await self.auth.shutdown()
        self.ingest.drain()
        # Control streams live as long as their servers: end them now, or
        # server.stop would wait out the whole grace period for them.
        self.control.drain()
        if self.server is not None:
            await self.server.stop(grace)
        if self.web is not None:
            await self.web.shutdown()
        if self.metrics_web is not None:
            await self.metrics_web.shutdown()
        if self._tls_task is not None:
            self._tls_task.cancel()
        await self.processors.shutdown()
        for stage in reversed(self.stages):
            try:
                await stage.shutdown()
            except Exception:
                log.exception("stage shutdown failed")
        try:
            await self.telemetry.shutdown()
        except Exception:
            log.exception("telemetry shutdown failed")
        await self.retention.shutdown()
        await self.page_release.shutdown()
        await self.writer.shutdown()
        self.store.close()
        self._stopped.set()
