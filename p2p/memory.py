"""An in-process transport: hosts in one trio run that reach each other without sockets.

The whole stack above it is the real one (Noise, yamux, identify, gossipsub,
Kademlia, our protocols); only the bytes travel through memory instead of
the kernel's loopback. Tests use it with trio's ``MockClock`` (a timeout of
30 s then costs no wall time), and anything that wants many nodes cheaply
can too. Addresses are ``/memory/<n>``, unique within one
:class:`MemoryNetwork`; ``/memory/0`` picks a free one, like TCP port 0
(docs/architecture.md#testing-on-the-memory-transport).
"""

from __future__ import annotations

import itertools
import logging

import multiaddr
import trio
import trio.testing
from libp2p.abc import IListener, IRawConnection, ITransport
from libp2p.custom_types import THandler
from libp2p.io.abc import ReadWriteCloser
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.transport.exceptions import OpenConnectionError

PROTOCOL = "memory"

logger = logging.getLogger(__name__)


class MemoryNetwork:
    """The listeners of one in-process network, by address number.

    A host can be put behind a simulated NAT (:meth:`behind_nat`, named as
    such: a stand-in for the real NATs of tests/cli/test_nat_namespaces.py,
    which need root). Its dials go out as before, and each opens a mapping
    towards the host it dialled; a dial *to* it passes only through a mapping
    opened towards the dialler in the last ``mapping_s`` seconds, as a
    connection-tracking NAT lets in only what answers traffic it sent. Two
    such hosts meet only by dialling each other at about the same time (a
    hole punch).
    """

    def __init__(self, *, mapping_s: float = 5.0) -> None:
        self._listeners: dict[int, _Listener] = {}
        self._numbers = itertools.count(1)
        self.mapping_s = mapping_s
        self._natted: set[MemoryTransport] = set()
        # (inside, outside): when the inside host last dialled the outside one.
        self._mappings: dict[tuple[MemoryTransport, MemoryTransport], float] = {}

    def behind_nat(self, addr: str) -> None:
        """Put the host listening on ``addr`` (``/memory/<n>/...``) behind a NAT."""
        listener = self._listener(_number(multiaddr.Multiaddr(addr)))
        self._natted.add(listener.transport)

    def _through_nats(self, source: MemoryTransport, target: MemoryTransport) -> bool:
        """Record ``source``'s dial to ``target``; whether ``target``'s NAT lets it in."""
        now = trio.current_time()
        if source in self._natted:
            self._mappings[(source, target)] = now
        if target not in self._natted:
            return True
        opened = self._mappings.get((target, source))
        return opened is not None and now - opened <= self.mapping_s

    def transport(self) -> MemoryTransport:
        """A transport that dials and listens on this network."""
        return MemoryTransport(self)

    def _bind(self, number: int, listener: _Listener) -> int:
        if number == 0:
            number = next(n for n in self._numbers if n not in self._listeners)
        if number in self._listeners:
            raise OpenConnectionError(f"/memory/{number} is already in use")
        self._listeners[number] = listener
        return number

    def _unbind(self, number: int) -> None:
        self._listeners.pop(number, None)

    def _listener(self, number: int) -> _Listener:
        listener = self._listeners.get(number)
        if listener is None:
            raise OpenConnectionError(f"nothing listens on /memory/{number}")
        return listener


class _Stream(ReadWriteCloser):
    """One end of an in-memory byte pipe, with TCP's error behaviour.

    A peer that went away shows as ``ConnectionClosedError`` on write and as
    end-of-stream on read, as py-libp2p's TCP stream does, so yamux reacts
    to a dropped memory link as to a reset socket. Unlike TCP there is no
    backpressure: a write never waits for the reader, so a test of a slow
    reader (a full window, a blocked goodbye) belongs on TCP.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._read_lock = trio.Lock()
        self._write_lock = trio.Lock()

    async def write(self, data: bytes) -> None:
        async with self._write_lock:
            try:
                await self._stream.send_all(data)
            except trio.BrokenResourceError as exc:
                raise ConnectionClosedError(
                    f"memory link closed by peer: {exc}", transport=PROTOCOL
                ) from exc
            except trio.ClosedResourceError:
                return

    async def read(self, n: int | None = None) -> bytes:
        async with self._read_lock:
            if n == 0:
                return b""
            try:
                return await self._stream.receive_some(n)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""

    async def close(self) -> None:
        await self._stream.aclose()

    def get_remote_address(self) -> tuple[str, int] | None:
        return None


class _Listener(IListener):
    def __init__(
        self, network: MemoryNetwork, transport: MemoryTransport, handler: THandler
    ) -> None:
        self._network = network
        self.transport = transport  # the host's, for its NAT
        self._handler = handler
        self._numbers: list[int] = []
        self._nursery: trio.Nursery | None = None
        self._done = trio.Event()
        self._closed = False

    async def listen(self, maddr: multiaddr.Multiaddr) -> None:
        if self._closed:
            raise OpenConnectionError(f"cannot listen on {maddr}: the listener is closed")
        number = self._network._bind(_number(maddr), self)
        self._numbers.append(number)
        if self._nursery is None:
            ready = trio.Event()

            async def serve() -> None:
                # Accepted connections outlive the dial that made them, so
                # they run in the listener's own task, as TCP's do.
                try:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        ready.set()
                        await trio.sleep_forever()
                finally:
                    self._done.set()

            trio.lowlevel.spawn_system_task(serve)
            await ready.wait()

    def _accept(self, conn: ReadWriteCloser) -> None:
        if self._nursery is None:
            raise OpenConnectionError("the memory listener is closed")
        self._nursery.start_soon(self._serve, conn)

    async def _serve(self, conn: ReadWriteCloser) -> None:
        # As trio.serve_listeners does for TCP: a connection whose handler
        # ends (or is cancelled when the listener closes) is closed, so the
        # peer sees it go.
        try:
            await self._handler(conn)
        except Exception as exc:  # noqa: BLE001 - as TCP's listener: one bad connection never stops accepting
            logger.debug("memory connection ended: %s", exc)
        finally:
            with trio.CancelScope(shield=True):
                await conn.close()

    def get_addrs(self) -> tuple[multiaddr.Multiaddr, ...]:
        return tuple(multiaddr.Multiaddr(f"/memory/{n}") for n in self._numbers)

    async def close(self) -> None:
        self._closed = True
        for number in self._numbers:
            self._network._unbind(number)
        self._numbers.clear()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
            self._nursery = None
            await self._done.wait()


class MemoryTransport(ITransport):
    """Dial and listen on ``/memory/<n>`` addresses of one :class:`MemoryNetwork`."""

    def __init__(self, network: MemoryNetwork) -> None:
        self._network = network

    def protocols(self) -> list[str]:
        return [PROTOCOL]

    def can_dial(self, maddr: multiaddr.Multiaddr) -> bool:
        return _is_memory(maddr)

    def can_listen(self, maddr: multiaddr.Multiaddr) -> bool:
        return _is_memory(maddr)

    async def dial(self, maddr: multiaddr.Multiaddr) -> IRawConnection:
        await trio.lowlevel.checkpoint()  # a dial loop must let other tasks run
        listener = self._network._listener(_number(maddr))
        if not self._network._through_nats(self, listener.transport):
            raise OpenConnectionError(f"/memory/{_number(maddr)} is behind a NAT")
        ours, theirs = trio.testing.memory_stream_pair()
        target = multiaddr.Multiaddr(f"/memory/{_number(maddr)}")
        # The accepting side gets the bare stream, as TCP's handler does (the
        # swarm wraps it).
        listener._accept(_Stream(theirs))
        return RawConnection(_Stream(ours), True, addresses=[target])

    def create_listener(self, handler_function: THandler) -> IListener:
        return _Listener(self._network, self, handler_function)


def _is_memory(maddr: multiaddr.Multiaddr) -> bool:
    first = next(iter(maddr.protocols()), None)
    return (
        first is not None
        and first.name == PROTOCOL
        and "p2p-circuit" not in {p.name for p in maddr.protocols()}
    )


def _number(maddr: multiaddr.Multiaddr) -> int:
    try:
        return int(maddr.value_for_protocol(PROTOCOL))
    except (ValueError, TypeError) as exc:
        raise OpenConnectionError(f"not a memory address: {maddr}") from exc
