"""Bearer tokens and roles on every gRPC method.

The role each method needs comes from the services' descriptors, so a method
added to the proto is refused until it is listed here (a test checks every
method of every service has a role). A refused call never reaches the
servicer and its request is not decoded: the deny handler takes raw bytes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from atlas_sidecar_client.pb import active_learning_pb2, admin_pb2, control_pb2, ingest_pb2

from sidecar.auth._authenticator import Authenticator, Denied
from sidecar.auth._tokens import Role

__all__ = ["METHOD_ROLES", "OPEN_SERVICES", "AuthInterceptor"]

_READ_ADMIN = {"GetStatus", "GetReport", "ListRollouts"}


def _method_roles() -> dict[str, tuple[str, Role, bool, bool]]:
    """``/pkg.Service/Method`` -> (service, role, client streaming, server streaming)."""
    out: dict[str, tuple[str, Role, bool, bool]] = {}
    for module, name in (
        (ingest_pb2, "IngestService"),
        (active_learning_pb2, "ActiveLearningService"),
        (control_pb2, "ControlService"),
        (admin_pb2, "AdminService"),
    ):
        service = module.DESCRIPTOR.services_by_name[name]
        for m in service.methods:
            if name in ("IngestService", "ActiveLearningService"):
                role = Role.INGEST
            elif name == "ControlService":
                role = Role.SERVER
            else:
                role = Role.READ if m.name in _READ_ADMIN else Role.OPERATOR
            out[f"/{service.full_name}/{m.name}"] = (
                name,
                role,
                m.client_streaming,
                m.server_streaming,
            )
    return out


#: Every method of the daemon's own services and the role it needs.
METHOD_ROLES = _method_roles()

#: ``auth.open`` names and the gRPC services they leave open.
OPEN_SERVICES = {
    "health": ("grpc.health.v1.Health",),
    "reflection": (
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    ),
}


def _authorization(details: grpc.HandlerCallDetails) -> str | None:
    for key, value in details.invocation_metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def _deny_handler(denied: Denied, client_streaming: bool, server_streaming: bool) -> Any:
    code = (
        grpc.StatusCode.UNAUTHENTICATED
        if denied.unauthenticated
        else grpc.StatusCode.PERMISSION_DENIED
    )

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, denied.message)

    make: Callable[..., Any] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(client_streaming, server_streaming)]
    # No deserializer: a refused caller's bytes are never parsed.
    return make(deny)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without a token that has the method's role.

    Methods of services in ``open_services`` pass; methods not in
    :data:`METHOD_ROLES` (reflection when enabled and not open) need ``read``.
    """

    def __init__(self, auth: Authenticator, open_names: Iterable[str]) -> None:
        self._auth = auth
        self._open = {s for name in open_names for s in OPEN_SERVICES.get(name, ())}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        if not self._auth.enabled:
            return await continuation(details)
        method = details.method or ""
        service = method[1:].partition("/")[0]
        if service in self._open:
            return await continuation(details)
        known = METHOD_ROLES.get(method)
        if known is None:
            role, short, streaming = Role.READ, service.rpartition(".")[2], None
        else:
            short, role, cs, ss = known
            streaming = (cs, ss)
        who = self._auth.authorize(_authorization(details), role)
        if not isinstance(who, Denied):
            return await continuation(details)
        self._auth.count(short or "unknown", who)
        if streaming is None:
            handler = await continuation(details)
            if handler is None:
                return None
            streaming = (handler.request_streaming, handler.response_streaming)
        return _deny_handler(who, *streaming)
