"""AdminService: status, registry, rollouts, learning triggers, exports, report.

The servicer owns no stage logic. Each group of RPCs is delegated to the
stage that implements it, passed in through :class:`AdminHandlers`; an RPC
whose stage is not configured answers ``UNIMPLEMENTED`` naming what is
missing, never a fake success.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc

from sidecar import __version__
from sidecar.admin._limits import request_problem
from sidecar.config import AdminConfig
from sidecar.errors import SidecarError
from sidecar.store import SCHEMA_VERSION, Store, StoreWriter

__all__ = [
    "AdminHandlers",
    "AdminServicer",
    "CandidateRegistry",
    "LearningControl",
    "ReportSource",
    "RolloutControl",
    "StatusSource",
]


class CandidateRegistry(Protocol):
    async def register(
        self, request: admin_pb2.RegisterCandidateRequest
    ) -> admin_pb2.RegisterCandidateResponse: ...


class RolloutControl(Protocol):
    async def start(self, request: admin_pb2.StartRolloutRequest) -> admin_pb2.Rollout: ...
    async def promote(self, request: admin_pb2.PromoteRolloutRequest) -> admin_pb2.Rollout: ...
    async def abort(self, request: admin_pb2.AbortRolloutRequest) -> admin_pb2.Rollout: ...
    async def rollback(self, request: admin_pb2.RollbackRequest) -> admin_pb2.Rollout: ...
    async def list(
        self, request: admin_pb2.ListRolloutsRequest
    ) -> admin_pb2.ListRolloutsResponse: ...


class LearningControl(Protocol):
    async def trigger(
        self, request: admin_pb2.TriggerLearningRequest
    ) -> admin_pb2.TriggerLearningResponse: ...
    def export(
        self, request: admin_pb2.ExportSamplesRequest
    ) -> AsyncIterator[admin_pb2.ExportedRow]: ...


class ReportSource(Protocol):
    async def report(self) -> admin_pb2.Report: ...


#: A stage's part of the status, as a JSON-ready mapping.
StatusSource = Callable[[], Mapping[str, Any]]


@dataclass
class AdminHandlers:
    registry: CandidateRegistry | None = None
    rollouts: RolloutControl | None = None
    learning: LearningControl | None = None
    report: ReportSource | None = None
    #: stage name -> status source, rendered into Status.details_json.
    status: dict[str, StatusSource] = field(default_factory=dict)


class _Counters(Protocol):
    open_streams: int


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        store: Store,
        writer: StoreWriter,
        handlers: AdminHandlers,
        ingest: _Counters | None = None,
        connected_servers: Callable[[], int] | None = None,
        limits: AdminConfig | None = None,
    ) -> None:
        self._limits = limits or AdminConfig()
        #: Requests refused for a bad name or an over-long text field.
        self.invalid_requests = 0
        self._store = store
        self._writer = writer
        self._h = handlers
        self._ingest = ingest
        self._connected = connected_servers
        self._started = time.monotonic()

    def status(self) -> admin_pb2.Status:
        """The daemon's status; also served at ``/api/status``."""
        counters = self._writer.stats.counters
        stats = self._store.stats()
        with self._store.read() as txn:
            cur = txn.cursor(db=self._store.db("events"))
            first = int.from_bytes(cur.key(), "big") if cur.first() else 0
            last = int.from_bytes(cur.key(), "big") if cur.last() else 0
        details: dict[str, Any] = {}
        for name, source in self._h.status.items():
            try:
                details[name] = dict(source())
            except Exception as exc:  # a stage's status must not break status
                details[name] = {"error": str(exc)}
        return admin_pb2.Status(
            version=__version__,
            uptime_seconds=time.monotonic() - self._started,
            events=admin_pb2.EventCounts(
                accepted=counters.get("accepted", 0),
                duplicates=counters.get("duplicates", 0),
                rejected=counters.get("rejected", 0),
            ),
            store=admin_pb2.StoreStatus(
                log_events=stats["log_events"],
                first_seq=first,
                last_seq=last,
                used_bytes=stats["used_bytes"],
                map_size_bytes=stats["map_size_bytes"],
                disk_free_bytes=stats["disk_free_bytes"],
                data_dir=str(self._store.data_dir.resolve()),
                schema_version=SCHEMA_VERSION,
            ),
            open_streams=self._ingest.open_streams if self._ingest else 0,
            connected_servers=self._connected() if self._connected else 0,
            details_json=json.dumps(details, sort_keys=True, default=str),
        )

    async def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Status:
        return self.status()

    # -- delegated RPCs --------------------------------------------------

    @staticmethod
    async def _missing(context: grpc.aio.ServicerContext, rpc: str, what: str) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{rpc} is not available: {what} is not part of this build",
        )

    async def _check(self, context: grpc.aio.ServicerContext, rpc: str, request: Any) -> None:
        """Answers INVALID_ARGUMENT naming the field when a name or text field is bad."""
        problem = request_problem(rpc, request, self._limits)
        if problem is not None:
            self.invalid_requests += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)

    def request_status(self) -> dict[str, int]:
        """The admin API's part of the status."""
        return {"invalid_requests": self.invalid_requests}

    @staticmethod
    async def _fail(context: grpc.aio.ServicerContext, exc: SidecarError) -> None:
        code = getattr(exc, "grpc_code", grpc.StatusCode.FAILED_PRECONDITION)
        await context.abort(code, str(exc))

    async def RegisterCandidate(
        self, request: admin_pb2.RegisterCandidateRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RegisterCandidateResponse:
        if self._h.registry is None:
            await self._missing(
                context, "RegisterCandidate", "the candidate registry (training stage)"
            )
            raise AssertionError("unreachable")
        await self._check(context, "RegisterCandidate", request)
        try:
            return await self._h.registry.register(request)
        except SidecarError as exc:
            await self._fail(context, exc)
            raise

    async def _rollout(
        self, context: grpc.aio.ServicerContext, rpc: str, call: str, request: Any
    ) -> Any:
        if self._h.rollouts is None:
            await self._missing(context, rpc, "the rollout engine")
            raise AssertionError("unreachable")
        await self._check(context, rpc, request)
        try:
            return await getattr(self._h.rollouts, call)(request)
        except SidecarError as exc:
            await self._fail(context, exc)
            raise

    async def StartRollout(
        self, request: admin_pb2.StartRolloutRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Rollout:
        result: admin_pb2.Rollout = await self._rollout(context, "StartRollout", "start", request)
        return result

    async def PromoteRollout(
        self, request: admin_pb2.PromoteRolloutRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Rollout:
        result: admin_pb2.Rollout = await self._rollout(
            context, "PromoteRollout", "promote", request
        )
        return result

    async def AbortRollout(
        self, request: admin_pb2.AbortRolloutRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Rollout:
        result: admin_pb2.Rollout = await self._rollout(context, "AbortRollout", "abort", request)
        return result

    async def Rollback(
        self, request: admin_pb2.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Rollout:
        result: admin_pb2.Rollout = await self._rollout(context, "Rollback", "rollback", request)
        return result

    async def ListRollouts(
        self, request: admin_pb2.ListRolloutsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListRolloutsResponse:
        result: admin_pb2.ListRolloutsResponse = await self._rollout(
            context, "ListRollouts", "list", request
        )
        return result

    async def TriggerLearning(
        self, request: admin_pb2.TriggerLearningRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.TriggerLearningResponse:
        if self._h.learning is None:
            await self._missing(context, "TriggerLearning", "the learning scheduler")
            raise AssertionError("unreachable")
        await self._check(context, "TriggerLearning", request)
        try:
            return await self._h.learning.trigger(request)
        except SidecarError as exc:
            await self._fail(context, exc)
            raise

    async def ExportSamples(
        self, request: admin_pb2.ExportSamplesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.ExportedRow]:
        if self._h.learning is None:
            await self._missing(context, "ExportSamples", "the curation stage")
            return
        try:
            async for row in self._h.learning.export(request):
                yield row
        except SidecarError as exc:
            await self._fail(context, exc)

    async def GetReport(
        self, request: admin_pb2.GetReportRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Report:
        if self._h.report is None:
            await self._missing(context, "GetReport", "the learning monitor")
            raise AssertionError("unreachable")
        return await self._h.report.report()
