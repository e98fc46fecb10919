"""Registers a servicer so that a request that does not parse answers INVALID_ARGUMENT.

grpc's generated ``add_*Servicer_to_server`` hands the request bytes to the
message class's ``FromString`` before the servicer sees them; a
``DecodeError`` there (invalid UTF-8 in a string field, a truncated field)
escapes as ``UNKNOWN`` and grpc logs a traceback for it. Here the method
handlers take the raw bytes and parse them inside the call, where a bad
request can be answered with ``INVALID_ARGUMENT`` naming the field. Nothing
else changes: the same servicer methods, the same response serializers.

Unary-request methods only (AdminService and ActiveLearningService have no
streaming requests); a service with one is refused at registration.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message

__all__ = ["add_strict_servicer", "bad_request_reason"]

_LEN = 2
_MAX_DEPTH = 32


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _bad_utf8_field(desc: Any, data: bytes, prefix: str, depth: int = 0) -> str | None:
    """The dotted name of the first string field in ``data`` that is not UTF-8."""
    if depth > _MAX_DEPTH:
        return None
    pos = 0
    try:
        while pos < len(data):
            tag, pos = _varint(data, pos)
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                _, pos = _varint(data, pos)
                continue
            if wire == 1:
                pos += 8
                continue
            if wire == 5:
                pos += 4
                continue
            if wire != _LEN:
                return None
            size, pos = _varint(data, pos)
            chunk, pos = data[pos : pos + size], pos + size
            field = desc.fields_by_number.get(number)
            if field is None:
                continue
            name = f"{prefix}{field.name}"
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
                inner = _bad_utf8_field(field.message_type, chunk, f"{name}.", depth + 1)
                if inner is not None:
                    return inner
    except ValueError:
        return None
    return None


def bad_request_reason(desc: Any, data: bytes, exc: Exception) -> str:
    """Why ``data`` is not a valid ``desc`` message, naming the field when one is at fault."""
    field = _bad_utf8_field(desc, data, "")
    if field is not None:
        return f"{field}: not valid UTF-8"
    return f"request is not a valid {desc.full_name}: {exc}"


def _parser(
    cls: type[Message],
) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
    desc = cls.DESCRIPTOR

    async def parse(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return cls.FromString(raw)
        except DecodeError as exc:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, bad_request_reason(desc, raw, exc)
            )
            raise AssertionError("unreachable") from exc

    return parse


def _unary_unary(method: Callable[..., Any], cls: type[Message]) -> Callable[..., Any]:
    parse = _parser(cls)

    async def call(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await method(await parse(raw, context), context)

    return call


def _unary_stream(method: Callable[..., Any], cls: type[Message]) -> Callable[..., Any]:
    parse = _parser(cls)

    async def call(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        request = await parse(raw, context)
        async for item in method(request, context):
            yield item

    return call


def add_strict_servicer(
    service: ServiceDescriptor, servicer: object, server: grpc.aio.Server
) -> None:
    """Registers ``servicer``'s methods for ``service`` on ``server``, parsing requests itself.

    Raises:
        TypeError: the service has a streaming-request method.
    """
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for m in service.methods:
        if m.client_streaming:
            raise TypeError(f"{service.full_name}.{m.name}: streaming requests are not supported")
        request_cls = message_factory.GetMessageClass(m.input_type)
        response_cls = message_factory.GetMessageClass(m.output_type)
        method = getattr(servicer, m.name)
        if m.server_streaming:
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(
                _unary_stream(method, request_cls),
                request_deserializer=None,
                response_serializer=response_cls.SerializeToString,
            )
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                _unary_unary(method, request_cls),
                request_deserializer=None,
                response_serializer=response_cls.SerializeToString,
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    # as the generated code does: grpc looks registered methods up directly
    server.add_registered_method_handlers(service.full_name, handlers)
