"""How many producer calls may be in progress at once, in all and per peer.

Every call to a covered service (the ones inference servers call: ingest,
the control channel, active learning) takes a slot while it runs, streams and
unary calls alike. Past ``server.max_concurrent_streams`` calls in all, or
``server.max_streams_per_peer`` from one peer, a new call answers
``RESOURCE_EXHAUSTED`` naming the key, before its handler runs. Admin and
health calls are not covered: an operator can still look at a saturated
daemon, and probes still answer.

A peer is the address grpc reports without its port (``ipv4:10.0.0.7``,
``ipv6:[::1]``); a Unix socket's peer string is taken whole. With auth on, a
caller with a valid token is counted as its token's name instead
(``token:vllm-0``): in a pod every client shares the loopback address, so the
address alone cannot tell one producer from another.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

__all__ = ["CallAdmission", "peer_key"]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def peer_key(peer: str) -> str:
    """The peer a call is counted against: ``context.peer()`` without the port
    for ``ipv4:`` and ``ipv6:`` peers, the whole string otherwise."""
    if peer.startswith(("ipv4:", "ipv6:")):
        host, sep, port = peer.rpartition(":")
        if sep and port.isdigit() and host not in ("ipv4", "ipv6"):
            return host
    return peer


class CallAdmission(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses covered calls past the total or the per-peer cap.

    ``in_progress`` counts the covered calls running now, ``refused`` those
    answered ``RESOURCE_EXHAUSTED`` since start.
    """

    def __init__(
        self,
        services: Iterable[str],
        *,
        max_calls: int,
        max_per_peer: int,
        identity: Callable[[grpc.aio.ServicerContext], str | None] | None = None,
    ) -> None:
        """``identity(context)``: the caller's token name, when there is one."""
        self._identity = identity
        self._services = frozenset(services)
        self._max_calls = max_calls
        self._max_per_peer = max_per_peer
        self._by_peer: dict[str, int] = {}
        self.in_progress = 0
        self.refused = 0

    def status(self) -> dict[str, Any]:
        """For the admin status: calls in progress, distinct peers, refusals."""
        return {
            "in_progress": self.in_progress,
            "peers": len(self._by_peer),
            "refused": self.refused,
        }

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None or details.method[1:].rpartition("/")[0] not in self._services:
            return handler
        streamed, streaming = handler.request_streaming, handler.response_streaming
        if streamed:
            inner = handler.stream_stream if streaming else handler.stream_unary
        else:
            inner = handler.unary_stream if streaming else handler.unary_unary
        factory = _FACTORIES[(streamed, streaming)]
        if inspect.isasyncgenfunction(inner):

            async def responses(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                peer = await self._enter(context)
                try:
                    async for response in inner(request, context):
                        yield response
                finally:
                    self._leave(peer)

            behavior: Callable[..., Any] = responses
        else:

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                peer = await self._enter(context)
                try:
                    result = inner(request, context)
                    return await result if inspect.isawaitable(result) else result
                finally:
                    self._leave(peer)

            behavior = call
        return factory(behavior, handler.request_deserializer, handler.response_serializer)

    async def _enter(self, context: grpc.aio.ServicerContext) -> str:
        name = self._identity(context) if self._identity is not None else None
        peer = f"token:{name}" if name else peer_key(context.peer() or "")
        held = self._by_peer.get(peer, 0)
        if self.in_progress >= self._max_calls:
            self.refused += 1
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many calls in progress: {self.in_progress}"
                f" (server.max_concurrent_streams={self._max_calls}); retry later",
            )
        if held >= self._max_per_peer:
            self.refused += 1
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many calls from {peer}: {held}"
                f" (server.max_streams_per_peer={self._max_per_peer}); retry later",
            )
        self.in_progress += 1
        self._by_peer[peer] = held + 1
        return peer

    def _leave(self, peer: str) -> None:
        self.in_progress -= 1
        left = self._by_peer[peer] - 1
        if left:
            self._by_peer[peer] = left
        else:
            del self._by_peer[peer]
