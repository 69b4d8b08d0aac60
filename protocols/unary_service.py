"""Trio adapter for unary protocols: one request, one answer per libp2p stream."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import trio

from p2pnode.errors import ErrorCode, NetworkError, RemoteProtocolError
from p2pnode.protocols.stream import (
    ByteStream,
    close_quietly,
    close_with_error,
    next_event,
    reset_quietly,
    send,
)
from p2pnode.protocols.unary import ClientMachine, Req, Resp, ServerMachine
from p2pnode.protocols.wire import PEER_CLOSED, Error, Sentinel


async def request(
    stream: ByteStream, machine: ClientMachine[Req, Resp], message: Req, wait_s: float
) -> Resp:
    """Send ``message`` on a freshly opened stream, return the answer, close the stream.

    Raises :class:`NetworkError` if no answer comes within ``wait_s`` or the
    server answers with an Error frame, :class:`RemoteProtocolError` if the
    answer is malformed, :class:`BrokenStreamError` if the stream breaks.
    """
    try:
        with trio.fail_after(wait_s):
            await send(stream, machine, machine.send_request(message))
            event = await next_event(stream, machine)
    except trio.TooSlowError as exc:
        raise NetworkError(f"no answer to {message.TYPE} within {wait_s:g} s") from exc
    finally:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + wait_s):
            await close_quietly(stream)
    if isinstance(event, Error):
        raise NetworkError(f"peer refused {message.TYPE}: {code_name(event.code)} {event.message}")
    assert not isinstance(event, Sentinel)  # the machine raises on EOF before an answer
    return event


async def serve(
    stream: ByteStream,
    machine: ServerMachine[Req, Resp],
    answer: Callable[[Req], Resp | Awaitable[Resp]],
    wait_s: float,
) -> None:
    """Answer one request on an inbound stream, then close it.

    A malformed or unexpected frame gets an Error frame and the stream is
    closed; the :class:`RemoteProtocolError` is re-raised so the node can
    count it against the peer. A client that sends nothing within ``wait_s``
    gets a TIMEOUT Error frame; an answer not written within ``wait_s`` ends
    the stream (reset) without blaming the client.
    """
    received = False
    try:
        with trio.fail_after(wait_s):
            event = await next_event(stream, machine)
            if event is PEER_CLOSED:
                await close_quietly(stream)
                return
            assert not isinstance(event, Sentinel)  # next_event never returns NEED_DATA
            received = True
            response = answer(event)
            if inspect.isawaitable(response):
                response = await response
            await send(stream, machine, machine.send_response(response))
            await close_quietly(stream)
    except RemoteProtocolError as exc:
        await close_with_error(stream, machine.send_error(Error.from_exception(exc)))
        raise
    except trio.TooSlowError as exc:
        if received:
            # The request came in time; answering it did not (our work, or a
            # peer slow to read it). No Error frame fits the machine's state
            # any more, and the peer broke no rule: end the stream.
            await reset_quietly(stream)
            return
        frame = machine.send_error(Error(code=ErrorCode.TIMEOUT, message="no request in time"))
        await close_with_error(stream, frame)
        raise RemoteProtocolError(ErrorCode.TIMEOUT, "no request in time") from exc


def code_name(code: int) -> str:
    """A readable name for an error code a peer sent (it may be one we do not know)."""
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return f"code {code}"
