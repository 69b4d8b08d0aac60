"""The trio shell shared by every protocol adapter: a machine over a libp2p stream.

A protocol's ``service.py`` reads with :func:`next_event` (which loops on the
machine's ``NEED_DATA``), writes with :func:`send` (which marks the machine
failed if the write does not complete, cancellation included) and ends a
misbehaving peer's stream with :func:`close_with_error`. Callers bound every
call with ``trio.fail_after``: these helpers never wait without limit on their
own, but they do wait as long as the peer makes them.
"""

from __future__ import annotations

import contextlib
from typing import Protocol, TypeVar

import trio
from libp2p.io.exceptions import IOException

from p2pnode.errors import BrokenStreamError
from p2pnode.protocols.wire import NEED_DATA

# Bytes asked of the muxer per read. yamux hands out at most what has arrived,
# so this bounds a single read, not a frame (frames are capped by the decoder).
READ_SIZE = 64 * 1024

# How long a peer that broke the protocol gets to receive our Error frame
# before we give up on telling it why.
ERROR_GRACE_S = 1.0


E_co = TypeVar("E_co", covariant=True)
E = TypeVar("E")


class ByteStream(Protocol):
    """What an adapter needs of a stream: libp2p's INetStream fits."""

    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def close(self) -> None: ...
    async def reset(self) -> None: ...


class Machine(Protocol[E_co]):
    """What an adapter needs of a protocol machine."""

    def receive_data(self, data: bytes) -> None: ...
    def next_event(self) -> E_co: ...
    def send_failed(self) -> None: ...


async def next_event(stream: ByteStream, machine: Machine[E]) -> E:
    """Read until the machine has an event other than NEED_DATA.

    EOF is passed to the machine as ``b""`` (it decides whether that is a
    clean close or truncation). A reset becomes :class:`BrokenStreamError`;
    a malformed frame raises :class:`RemoteProtocolError` from the machine.
    """
    while True:
        event = machine.next_event()
        if event is not NEED_DATA:
            return event
        try:
            data = await stream.read(READ_SIZE)
        except EOFError:
            data = b""
        except IOException as exc:
            machine.send_failed()
            raise BrokenStreamError(f"stream broke while reading: {exc!r}") from exc
        machine.receive_data(data)


async def send(stream: ByteStream, machine: Machine[object], data: bytes) -> None:
    """Write bytes a machine produced; on any failure the machine is marked failed."""
    try:
        await stream.write(data)
    except IOException as exc:
        machine.send_failed()
        raise BrokenStreamError(f"stream broke while writing: {exc!r}") from exc
    except BaseException:
        machine.send_failed()
        raise


async def close_with_error(stream: ByteStream, frame: bytes) -> None:
    """Tell the peer why (an Error frame, best effort), then close the stream.

    Close, not reset: a reset may overtake the frame and the peer would learn
    nothing. We stop reading either way, so a peer that keeps writing stalls
    on its own flow-control window.
    """
    with trio.move_on_after(ERROR_GRACE_S):
        try:
            await stream.write(frame)
            await stream.close()
            return
        except IOException:
            pass
    await reset_quietly(stream)


async def close_quietly(stream: ByteStream) -> None:
    """Close our side; a stream the peer already closed or reset is fine too."""
    with contextlib.suppress(IOException):
        await stream.close()


async def reset_quietly(stream: ByteStream) -> None:
    """Reset a stream whose fate no longer matters; errors are expected here."""
    # The deadline on the shielded scope itself: a move_on_after outside the
    # shield could not cancel inside it, and a peer that stops reading would
    # hold this (and its caller's shutdown) for good
    # (docs/libp2p-traps.md#reset-can-block).
    with (
        trio.CancelScope(shield=True, deadline=trio.current_time() + ERROR_GRACE_S),
        contextlib.suppress(IOException),
    ):
        await stream.reset()


__all__ = [
    "ERROR_GRACE_S",
    "READ_SIZE",
    "ByteStream",
    "Machine",
    "close_quietly",
    "close_with_error",
    "next_event",
    "reset_quietly",
    "send",
]
