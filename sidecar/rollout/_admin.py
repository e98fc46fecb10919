"""The AdminService's rollout RPCs, answered by the engine."""

from __future__ import annotations

from atlas_sidecar_client.pb import admin_pb2

from sidecar.rollout._engine import RolloutEngine

__all__ = ["RolloutAdmin"]

_STRATEGY = {
    admin_pb2.ROLLOUT_STRATEGY_UNSPECIFIED: None,
    admin_pb2.ROLLOUT_STRATEGY_CANARY: "canary",
    admin_pb2.ROLLOUT_STRATEGY_BLUE_GREEN: "blue_green",
}


class RolloutAdmin:
    """Implements ``AdminHandlers.rollouts`` on top of a :class:`RolloutEngine`."""

    def __init__(self, engine: RolloutEngine) -> None:
        self._engine = engine

    async def start(self, request: admin_pb2.StartRolloutRequest) -> admin_pb2.Rollout:
        rec = await self._engine.start_rollout(
            request.candidate_version,
            strategy=_STRATEGY.get(request.strategy),
            reason=request.reason,
        )
        return rec.to_proto()

    async def promote(self, request: admin_pb2.PromoteRolloutRequest) -> admin_pb2.Rollout:
        return (await self._engine.promote(request.rollout_id, request.reason)).to_proto()

    async def abort(self, request: admin_pb2.AbortRolloutRequest) -> admin_pb2.Rollout:
        return (await self._engine.abort(request.rollout_id, request.reason)).to_proto()

    async def rollback(self, request: admin_pb2.RollbackRequest) -> admin_pb2.Rollout:
        return (await self._engine.rollback(request.rollout_id, request.reason)).to_proto()

    async def list(self, request: admin_pb2.ListRolloutsRequest) -> admin_pb2.ListRolloutsResponse:
        recs = self._engine.list_rollouts(request.limit)
        return admin_pb2.ListRolloutsResponse(rollouts=[r.to_proto() for r in recs])
