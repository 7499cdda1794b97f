"""The one place asyncio appears: grpclib calls run on an asyncio loop hosted inside Trio.

Why: grpclib (the mandated gRPC client) speaks asyncio only. trio-asyncio runs an asyncio loop as
a few Trio tasks inside the caller's nursery tree, so its lifetime is a scope like any other and a
Trio cancel scope cancels the asyncio task doing the call (see
docs/decisions/grpclib-via-trio-asyncio.md).
Everything the rest of the agent sees here is Trio-flavoured: `unary()` returns the reply,
`server_stream()` is an async context manager whose body iterates replies. Streams are context
managers, never bare async generators, so a consumer cancelled mid-stream always resets the
HTTP/2 stream.

Exceptions pass through unchanged (grpclib's `GRPCError`, `StreamTerminatedError`, `OSError` ...);
`agent.containerd.client` maps them to its own errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio
import trio_asyncio
from grpclib.client import Channel

Reply = TypeVar("Reply")

# The grpclib method objects (UnaryUnaryMethod, UnaryStreamMethod) are untyped for mypy.
GrpcMethod = Any
Metadata = Mapping[str, str]


class GrpcChannel:
    """A grpclib `Channel` plus the trio-asyncio loop it lives on (see `open_grpc_channel`)."""

    def __init__(self, loop: Any, channel: Channel) -> None:
        self._loop = loop
        self.channel = channel  # pass to the generated `*Stub` classes

    async def _aio(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # The coroutine is created and run inside the asyncio task, with the loop given explicitly,
        # so the call works from any Trio task, whatever its contextvars.
        return await trio_asyncio.aio_as_trio(fn, loop=self._loop)(*args, **kwargs)

    async def unary(
        self, method: GrpcMethod, request: Any, metadata: Metadata | None = None
    ) -> Any:
        """Call a unary-unary method; cancellable by the caller's cancel scopes."""
        return await self._aio(method, request, metadata=_md(metadata))

    @asynccontextmanager
    async def server_stream(
        self, method: GrpcMethod, request: Any, metadata: Metadata | None = None
    ) -> AsyncIterator[AsyncIterator[Any]]:
        """Open a unary-stream call; the body iterates the replies.

        Leaving the block early (break, exception or cancellation) resets the stream.
        """
        stream = method.open(metadata=_md(metadata))
        await self._aio(stream.__aenter__)
        done = False
        try:
            await self._aio(stream.send_message, request, end=True)

            async def replies() -> AsyncIterator[Any]:
                nonlocal done
                while True:
                    message = await self._aio(stream.recv_message)
                    if message is None:
                        done = True
                        return
                    yield message

            yield replies()
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await self._close(stream, exc, cancel=True)
            raise
        else:
            with trio.CancelScope(shield=True):
                await self._close(stream, None, cancel=not done)

    async def _close(self, stream: Any, exc: BaseException | None, *, cancel: bool) -> None:
        try:
            if cancel and stream._send_request_done and not stream._cancel_done:
                await self._aio(stream.cancel)
        except Exception:  # best effort: the connection may already be gone
            pass
        try:
            if exc is None:
                await self._aio(stream.__aexit__, None, None, None)
            else:
                # grpclib only needs to know that the call ended abnormally; Trio's Cancelled is
                # not an asyncio exception, so hand it a plain one.
                plain = exc if isinstance(exc, Exception) else Exception("call abandoned")
                await self._aio(stream.__aexit__, type(plain), plain, None)
        except Exception:
            if exc is None:
                raise


def _md(metadata: Metadata | None) -> list[tuple[str, str]] | None:
    return list(metadata.items()) if metadata else None


def _make_channel(path: str) -> Channel:
    return Channel(path=path)


def _lone_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


@asynccontextmanager
async def open_grpc_channel(socket_path: str) -> AsyncIterator[GrpcChannel]:
    """Run an asyncio loop for the block's duration; open a lazy grpclib channel to a unix socket.

    The channel connects on first use and reconnects by itself after the server restarts.
    An exception leaving the block comes out as itself, not wrapped in the loop's exception groups.
    """
    try:
        async with trio_asyncio.open_loop() as loop:

            async def make() -> Channel:
                return _make_channel(socket_path)

            channel = await trio_asyncio.aio_as_trio(make, loop=loop)()
            try:
                yield GrpcChannel(loop, channel)
            finally:
                channel.close()
    except BaseExceptionGroup as group:
        lone = _lone_exception(group)
        if lone is None:
            raise
        raise lone from lone.__cause__
