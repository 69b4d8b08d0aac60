"""Trio adapter of the status protocol over a libp2p stream."""

from __future__ import annotations

from collections.abc import Callable

import trio

from p2pnode.errors import ErrorCode, NetworkError, RemoteProtocolError
from p2pnode.protocols.status import Config
from p2pnode.protocols.status.machine import ClientMachine, ServerMachine
from p2pnode.protocols.status.messages import StatusResponse
from p2pnode.protocols.stream import (
    ByteStream,
    close_quietly,
    close_with_error,
    next_event,
    send,
)
from p2pnode.protocols.wire import PEER_CLOSED, Error


async def request(stream: ByteStream, cfg: Config) -> StatusResponse:
    """Ask for status over a freshly opened stream and close it.

    Raises :class:`NetworkError` if no answer comes within ``cfg.timeout`` or
    the server answers with an Error frame, :class:`RemoteProtocolError` if
    the answer is malformed, :class:`BrokenStreamError` if the stream breaks.
    """
    machine = ClientMachine(cfg.max_frame)
    try:
        with trio.fail_after(cfg.timeout):
            await send(stream, machine, machine.send_request())
            event = await next_event(stream, machine)
    except trio.TooSlowError as exc:
        raise NetworkError(f"no status answer within {cfg.timeout:g} s") from exc
    finally:
        with trio.move_on_after(cfg.timeout), trio.CancelScope(shield=True):
            await close_quietly(stream)
    if isinstance(event, Error):
        raise NetworkError(f"peer refused status: {_code_name(event.code)} {event.message}")
    assert isinstance(event, StatusResponse)
    return event


async def serve(stream: ByteStream, answer: Callable[[], StatusResponse], cfg: Config) -> None:
    """Answer one status request on an inbound stream, then close it.

    A malformed or unexpected frame gets an Error frame and the stream is
    closed; the :class:`RemoteProtocolError` is re-raised so the node can
    count it against the peer. A client that sends nothing within
    ``cfg.timeout`` gets a TIMEOUT Error frame.
    """
    machine = ServerMachine(cfg.max_frame)
    try:
        with trio.fail_after(cfg.timeout):
            event = await next_event(stream, machine)
            if event is PEER_CLOSED:
                await close_quietly(stream)
                return
            await send(stream, machine, machine.send_response(answer()))
            await close_quietly(stream)
    except RemoteProtocolError as exc:
        await close_with_error(stream, machine.send_error(Error.from_exception(exc)))
        raise
    except trio.TooSlowError as exc:
        frame = machine.send_error(Error(code=ErrorCode.TIMEOUT, message="no request in time"))
        await close_with_error(stream, frame)
        raise RemoteProtocolError(ErrorCode.TIMEOUT, "no status request in time") from exc


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return f"code {code}"
