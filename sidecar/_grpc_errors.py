"""Requests that cannot be decoded answer INVALID_ARGUMENT, naming the field.

grpc's Python server decodes a unary request before the handler runs, and a
streamed one inside ``context.read()`` or the request iterator. A protobuf
``DecodeError`` there (a string field that is not UTF-8, a truncated message)
ends the call as UNKNOWN "Unexpected DecodeError", with a traceback in the
log for every such request. :class:`UndecodableRequestInterceptor` wraps each
method's deserializer so the client is told INVALID_ARGUMENT and which field
is wrong, and nothing is logged.

- unary requests: the deserializer returns a marker instead of raising, and
  the wrapped handler aborts before the servicer sees it;
- streamed requests: the deserializer raises :class:`RequestDecodeError` (a
  ``DecodeError`` carrying the field), which a servicer may handle itself
  (the control channel counts it and ends its stream); otherwise the wrapped
  handler turns it into INVALID_ARGUMENT.

Handlers without a deserializer (ingest decodes its batches itself) are left
as they are.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from sidecar._wire import read_varint

__all__ = ["RequestDecodeError", "UndecodableRequestInterceptor", "describe_decode_error"]

#: Nesting followed when looking for the bad field (protobuf's own limit is 100).
_MAX_DEPTH = 32


class RequestDecodeError(DecodeError):
    """A request message could not be decoded; ``str()`` names the field."""


class _Undecodable:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _bad_utf8(desc: Any, data: bytes, path: str, depth: int) -> str | None:
    """The path of the first string field in ``data`` that is not UTF-8, or None."""
    seen: dict[int, int] = {}
    i, n = 0, len(data)
    while i < n:
        tag, i = read_varint(data, i)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, i = read_varint(data, i)
            continue
        if wire == 1 or wire == 5:
            i += 8 if wire == 1 else 4
            continue
        if wire != 2:
            return None  # groups: not used by these protos
        size, i = read_varint(data, i)
        chunk, i = data[i : i + size], i + size
        field = desc.fields_by_number.get(number)
        if field is None:
            continue
        name = f"{path}.{field.name}" if path else field.name
        if field.is_repeated:
            index = seen.get(number, 0)
            seen[number] = index + 1
            name = f"{name}[{index}]"
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif field.type == FieldDescriptor.TYPE_MESSAGE and depth < _MAX_DEPTH:
            found = _bad_utf8(field.message_type, chunk, name, depth + 1)
            if found is not None:
                return found
    return None


def describe_decode_error(message_type: type[Message], raw: bytes, exc: Exception) -> str:
    """Why ``raw`` is not a ``message_type``, naming the field where it can.

    ``"hello.server_id: not valid UTF-8"`` for a string field with bad
    UTF-8 (protobuf itself does not say which); otherwise the message type
    and protobuf's own reason.
    """
    desc = message_type.DESCRIPTOR
    try:
        field = _bad_utf8(desc, raw, "", 0)
    except Exception:  # a malformed message: fall back to protobuf's own words
        field = None
    if field is not None:
        return f"{field}: not valid UTF-8"
    reason = str(exc).rpartition(": ")[2] or "cannot be decoded"
    return f"request: not a valid {desc.full_name}: {reason}"


def _message_type(deserializer: Callable[[bytes], Any]) -> type[Message] | None:
    owner = getattr(deserializer, "__self__", None)
    if isinstance(owner, type) and issubclass(owner, Message):
        return owner
    return None


def _decoding(deserializer: Callable[[bytes], Any], *, streamed: bool) -> Callable[[bytes], Any]:
    message_type = _message_type(deserializer)

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as exc:
            reason = (
                describe_decode_error(message_type, raw, exc)
                if message_type is not None
                else f"request: cannot be decoded: {exc}"
            )
            if streamed:
                raise RequestDecodeError(reason) from None
            return _Undecodable(reason)

    return decode


def _is_async(behavior: Any) -> bool:
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


class UndecodableRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answers INVALID_ARGUMENT (naming the field) for requests that cannot be decoded.

    Install it first in the server's interceptors, so that its deserializer
    is the one grpc calls. ``rejected`` counts the requests it answered.
    """

    def __init__(self) -> None:
        self.rejected = 0

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        if handler.request_streaming:
            return self._streamed(handler)
        return self._unary(handler)

    def _unary(self, handler: Any) -> Any:
        deserializer = _decoding(handler.request_deserializer, streamed=False)
        serializer = handler.response_serializer
        inner = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if not _is_async(inner):
            return handler

        async def refuse(request: _Undecodable, context: grpc.aio.ServicerContext) -> None:
            self.rejected += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)

        if not handler.response_streaming:

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if type(request) is _Undecodable:
                    await refuse(request, context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)
        if inspect.isasyncgenfunction(inner):

            async def unary_stream_gen(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                if type(request) is _Undecodable:
                    await refuse(request, context)
                async for response in inner(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream_gen, deserializer, serializer)

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
            if type(request) is _Undecodable:
                await refuse(request, context)
            await inner(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)

    def _streamed(self, handler: Any) -> Any:
        deserializer = _decoding(handler.request_deserializer, streamed=True)
        serializer = handler.response_serializer
        inner = handler.stream_stream if handler.response_streaming else handler.stream_unary
        if not _is_async(inner):
            return handler

        async def refuse(exc: RequestDecodeError, context: grpc.aio.ServicerContext) -> None:
            self.rejected += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        if handler.response_streaming and inspect.isasyncgenfunction(inner):

            async def stream_stream_gen(
                requests: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                try:
                    async for response in inner(requests, context):
                        yield response
                except RequestDecodeError as exc:
                    await refuse(exc, context)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream_gen, deserializer, serializer
            )

        async def call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await inner(requests, context)
            except RequestDecodeError as exc:
                await refuse(exc, context)

        factory = (
            grpc.stream_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(call, deserializer, serializer)
