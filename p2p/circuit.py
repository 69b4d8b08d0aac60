"""py-libp2p's circuit relay v2 protocol behind our own HOP and STOP stream handlers.

Theory of operation. py-libp2p 0.8.1 implements the protocol (messages,
vouchers, piping a circuit's bytes, upgrading the STOP side's stream to a
connection) and :class:`Protocol` keeps all of that. What it replaces are
the two stream handlers, the boundary where a peer's bytes arrive, because
as shipped they:

- serve HOP whenever they are registered; the ``allow_hop`` flag only
  decides whether ``run()`` registers them (``Relay`` now registers HOP only
  for a node that offers the relay service, and the handler refuses too);
- reserve in the name of whatever peer id the RESERVE message carries, so
  one connection fills every slot with made-up ids. Here a reservation is
  for the peer that authenticated the connection, one per peer (another
  RESERVE renews it), and a message naming someone else is refused;
- count a reservation's slot until it expires (an hour) after its peer has
  gone, though the spec ties a reservation to a live connection
  (:class:`_Slots`);
- limit circuits only per reservation: nothing bounds circuits overall or
  per asking peer, bytes over all circuits, or an idle circuit's lifetime
  (py-libp2p checks the duration only when bytes flow). :class:`Budget`
  and :class:`_Metered` add those;
- answer a malformed or unexpected message and go on reading, without
  telling anyone who sent it. Here it ends that stream and is counted
  against the peer (``misbehaved``);
- run in the swarm's own task: an exception escaping a stream handler ends
  the whole node (measured with py-libp2p 0.8.1). Each handler here ends
  only its stream, whatever fails below it.

``run()`` of the library registers ``self._handle_hop_stream`` and
``self._handle_stop_stream``, so overriding those methods is what puts these
in place.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import trio
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from libp2p.abc import IHost, INetStream
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import IOException, MessageTooLarge
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, StopMessage
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol, _is_relayed_stream
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits, RelayResourceManager, Reservation
from libp2p.relay.circuit_v2.utils import maybe_consume_signed_record, read_delimited_msg

from p2pnode.errors import ErrorCode, RemoteProtocolError
from p2pnode.p2p import host as hostlib
from p2pnode.p2p.host import short
from p2pnode.protocols.stream import ERROR_GRACE_S, close_quietly, reset_quietly

logger = logging.getLogger(__name__)

Msg = TypeVar("Msg", bound=ProtoMessage)

# The protection a relay keeps on each peer holding a reservation slot.
RESERVATION_TAG = "p2pnode-reservation"


@dataclass
class Counters:
    """What the relay protocol did for and against others."""

    circuits: int = 0  # admitted by the budget
    circuits_refused: int = 0  # over a circuit limit, or the window's bytes spent
    circuits_cut: int = 0  # ended by the byte window or the duration
    bytes_relayed: int = 0  # both ways, over all circuits
    refused: int = 0  # HOP without the service, over a relay, or STOP from a non-relay
    malformed: int = 0  # messages that broke the protocol (counted against the sender)
    failed: int = 0  # handler failures that were not the peer's doing


class Budget:
    """What the relay service may spend on others, beyond py-libp2p's per-reservation limits.

    Circuits open at once, overall and per peer (a peer counts once for each
    circuit it is an end of: the asking side or the private node reached),
    and bytes relayed over all circuits per window: the count restarts every
    ``window_s`` seconds, and once it reaches ``window_bytes`` circuits are
    cut and new ones refused until then. Pure: callers pass ``now``.
    """

    def __init__(
        self, *, max_circuits: int, max_circuits_per_peer: int, window_bytes: int, window_s: float
    ) -> None:
        self.max_circuits = max_circuits
        self.max_circuits_per_peer = max_circuits_per_peer
        self.window_bytes = window_bytes
        self.window_s = window_s
        self.open: Counter[ID] = Counter()
        self.circuits = 0
        self._window_start: float | None = None
        self._spent = 0

    def open_circuit(self, src: ID, dst: ID, now: float) -> bool:
        """Take a circuit slot for ``src`` → ``dst`` if every limit allows; pair with close."""
        full = (
            self.circuits >= self.max_circuits
            or self.open[src] >= self.max_circuits_per_peer
            or self.open[dst] >= self.max_circuits_per_peer
            or self.remaining(now) <= 0
        )
        if full:
            return False
        self.circuits += 1
        self.open[src] += 1
        self.open[dst] += 1
        return True

    def close_circuit(self, src: ID, dst: ID) -> None:
        """Give back the slot :meth:`open_circuit` took."""
        self.circuits -= 1
        for peer in (src, dst):
            self.open[peer] -= 1
            if self.open[peer] <= 0:
                del self.open[peer]

    def remaining(self, now: float) -> int:
        """Bytes left in the current window."""
        if self._window_start is None or now - self._window_start >= self.window_s:
            self._window_start, self._spent = now, 0
        return self.window_bytes - self._spent

    def spend(self, n: int, now: float) -> bool:
        """Count ``n`` relayed bytes if the window has room for them.

        If it has not, the window is spent: nothing more until it restarts
        (a circuit cut for want of room would otherwise be followed by new
        ones that fit a few bytes each).
        """
        if n > self.remaining(now):
            self._spent = self.window_bytes
            return False
        self._spent += n
        return True


class _Slots(RelayResourceManager):
    """Reservation slots held while their peer is connected (and a short grace after).

    Circuit v2 spec: a reservation is valid only while its peer keeps a
    connection to the relay. py-libp2p 0.8.1 ignores a gone peer's
    reservation for circuits but counts its slot until it expires, so peers
    that reserve and leave would keep every private node out for an hour.
    Here a gone peer's slot is freed ``grace_s`` after it left: a private
    node whose connection dropped (a reset, a simultaneous dial) finds its
    slot again when it comes back, instead of a squatter in it (seen in the
    hostile scenario). While a peer holds a slot it is protected from the
    swarm's trimming, so the relay's own pruning does not free it either.
    """

    def __init__(self, limits: RelayLimits, host: IHost, grace_s: float) -> None:
        super().__init__(limits, host)
        self.grace_s = grace_s
        self._gone_since: dict[ID, float] = {}

    def create_reservation(self, peer_id: ID) -> Reservation:
        hostlib.protect(self._host, peer_id, RESERVATION_TAG)
        return super().create_reservation(peer_id)

    def can_accept_reservation(self, peer_id: ID) -> bool:
        now = trio.current_time()
        for peer in [p for p in self._reservations if p != peer_id]:
            if self._is_peer_connected(peer):
                self._gone_since.pop(peer, None)
            elif now - self._gone_since.setdefault(peer, now) >= self.grace_s:
                del self._reservations[peer]
                self._release(peer)
        return super().can_accept_reservation(peer_id)

    def _clean_expired(self) -> None:
        before = set(self._reservations)
        super()._clean_expired()
        for peer in before - set(self._reservations):
            self._release(peer)

    def _release(self, peer: ID) -> None:
        self._gone_since.pop(peer, None)
        hostlib.unprotect(self._host, peer, RESERVATION_TAG)

    @property
    def held(self) -> int:
        """Reservation slots held by peers now."""
        return len(self._reservations)

    @property
    def _host(self) -> IHost:
        assert self.host is not None  # always given here
        return self.host


class _Metered:
    """The asking side's stream of a circuit, charging each byte relayed (both ways) to the window.

    py-libp2p pipes a circuit by reading and writing this stream; when the
    window has no room left for a chunk, the circuit's cancel scope is
    cancelled before the chunk goes anywhere. Everything else is the
    stream's own (``__getattr__``).
    """

    def __init__(self, stream: INetStream, budget: Budget, counters: Counters) -> None:
        self.stream = stream
        self.scope = trio.CancelScope()
        self._budget = budget
        self._counters = counters

    async def read(self, n: int | None = None) -> bytes:
        data = await self.stream.read(n)
        await self._charge(len(data))
        return data

    async def write(self, data: bytes) -> None:
        await self._charge(len(data))
        await self.stream.write(data)

    async def _charge(self, n: int) -> None:
        if self._budget.spend(n, trio.current_time()):
            self._counters.bytes_relayed += n
            return
        self.scope.cancel()
        await trio.lowlevel.checkpoint()  # raises Cancelled: the circuit ends here

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class Protocol(CircuitV2Protocol):
    """The circuit v2 protocol with our HOP and STOP handlers (see the module docstring).

    ``is_our_relay(peer)`` tells whether this node holds a reservation on
    ``peer`` (only such a relay may open a STOP stream to it);
    ``misbehaved(peer)`` is told of each message that broke the protocol;
    a peer ``banned(peer)`` has its streams reset unread.
    """

    def __init__(
        self,
        host: IHost,
        limits: RelayLimits,
        *,
        allow_hop: bool,
        budget: Budget,
        slot_grace_s: float,
        is_our_relay: Callable[[ID], bool],
        misbehaved: Callable[[str], object],
        banned: Callable[[str], bool],
    ) -> None:
        super().__init__(host, limits=limits, allow_hop=allow_hop)
        self.resource_manager = self._slots = _Slots(limits, host, slot_grace_s)
        self.budget = budget
        self.counters = Counters()
        self._is_our_relay = is_our_relay
        self._misbehaved = misbehaved
        self._banned = banned

    def reservations(self) -> int:
        """Peers holding a reservation on this relay now."""
        return self._slots.held

    async def _handle_hop_stream(self, stream: INetStream) -> None:
        """Serve one HOP request (RESERVE or CONNECT), then end the stream."""
        await self._guarded(stream, "HOP", self._hop)

    async def _handle_stop_stream(self, stream: INetStream) -> None:
        """Accept one relayed connection from a relay this node reserved on."""
        await self._guarded(stream, "STOP", self._stop)

    async def _guarded(
        self,
        stream: INetStream,
        side: str,
        serve: Callable[[INetStream, ID], Awaitable[None]],
    ) -> None:
        """Run a handler so that whatever happens ends this stream only."""
        peer = stream.muxed_conn.peer_id
        if self._banned(str(peer)):
            self.counters.refused += 1
            await reset_quietly(stream)
            return
        try:
            await serve(stream, peer)
        except RemoteProtocolError as exc:
            self.counters.malformed += 1
            logger.info("relay %s from %s broke the protocol: %s", side, short(peer), exc)
            self._misbehaved(str(peer))
            await self._refuse(stream, side, StatusCode.MALFORMED_MESSAGE)
        except (IOException, ConnectionError, trio.TooSlowError) as exc:
            # The peer went away, or was too slow: routine.
            logger.debug("relay %s with %s ended: %r", side, short(peer), exc)
            await reset_quietly(stream)
        except Exception:
            # py-libp2p's code under this handler failed; only this stream pays.
            self.counters.failed += 1
            logger.exception("relay %s handler failed for %s", side, short(peer))
            await reset_quietly(stream)

    async def _hop(self, stream: INetStream, peer: ID) -> None:
        # The spec forbids serving HOP over a relayed connection (relay
        # chains); the test is py-libp2p's own, private in 0.8.1.
        if not self.allow_hop or _is_relayed_stream(stream):
            self.counters.refused += 1
            await self._refuse(stream, "HOP", StatusCode.PERMISSION_DENIED)
            return
        msg = await self._read(stream, HopMessage)
        if msg.HasField("senderRecord") and not maybe_consume_signed_record(msg, self.host, peer):
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, "a signed record not of its sender")
        if msg.type == HopMessage.RESERVE:
            await self._reserve(stream, msg, peer)
        elif msg.type == HopMessage.CONNECT:
            await self._connect(stream, msg, peer)
        else:
            raise RemoteProtocolError(ErrorCode.UNEXPECTED, f"HOP message of type {msg.type}")

    async def _reserve(self, stream: INetStream, msg: HopMessage, peer: ID) -> None:
        named = msg.peer.id if msg.HasField("peer") else b""
        if named and named != peer.to_bytes():
            # Only a squatter names another peer: refused, and remembered.
            self.counters.refused += 1
            logger.info("relay: %s asked to reserve for another peer", short(peer))
            self._misbehaved(str(peer))
            await self._refuse(stream, "HOP", StatusCode.PERMISSION_DENIED)
            return
        # The library takes the peer from the message, or from the connection
        # when the message names none: either way, the authenticated one.
        await super()._handle_reserve(stream, msg)
        await close_quietly(stream)

    async def _connect(self, stream: INetStream, msg: HopMessage, peer: ID) -> None:
        if not msg.HasField("peer") or not msg.peer.id:
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, "CONNECT names no peer")
        dst = ID(msg.peer.id)
        if not self.budget.open_circuit(peer, dst, trio.current_time()):
            self.counters.circuits_refused += 1
            await self._refuse(stream, "HOP", StatusCode.RESOURCE_LIMIT_EXCEEDED)
            return
        self.counters.circuits += 1
        metered = _Metered(stream, self.budget, self.counters)
        # The duration bounds the whole circuit: py-libp2p checks it only
        # between reads, so an idle circuit would hold its slot for ever.
        duration = self.limits.duration or math.inf
        try:
            with metered.scope, trio.move_on_after(duration) as timer:
                await super()._handle_connect(cast(INetStream, metered), msg)
            if metered.scope.cancelled_caught or timer.cancelled_caught:
                self.counters.circuits_cut += 1
                await self._cut(metered, peer, dst)
        finally:
            self.budget.close_circuit(peer, dst)

    async def _cut(self, metered: _Metered, src: ID, dst: ID) -> None:
        """Reset both streams of a circuit cancelled under py-libp2p's feet, and forget it."""
        for key in (src, dst):
            held = self._active_relays.get(key)
            if held is not None and held[0] is cast(INetStream, metered):
                del self._active_relays[key]
                if held[1] is not None:
                    await reset_quietly(held[1])
        await reset_quietly(metered.stream)

    async def _stop(self, stream: INetStream, relay: ID) -> None:
        # A STOP stream becomes a connection to us through its sender: only a
        # relay we hold a reservation on has a reason to open one.
        if not self._is_our_relay(relay):
            self.counters.refused += 1
            await self._refuse(stream, "STOP", StatusCode.PERMISSION_DENIED)
            return
        msg = await self._read(stream, StopMessage)
        if msg.type != StopMessage.CONNECT:
            raise RemoteProtocolError(ErrorCode.UNEXPECTED, f"STOP message of type {msg.type}")
        if not msg.HasField("peer") or not msg.peer.id:
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, "STOP CONNECT names no peer")
        await self._send_stop_status(stream, StatusCode.OK, "Connection established")
        await self.handle_incoming_connection(stream, msg.peer.id)

    async def _read(self, stream: INetStream, kind: type[Msg]) -> Msg:
        """One length-prefixed message (py-libp2p caps it at 64 KiB), bounded in time."""
        try:
            with trio.fail_after(self.read_timeout):
                return await read_delimited_msg(stream, kind)
        except (ParseError, MessageTooLarge, DecodeError) as exc:
            raise RemoteProtocolError(ErrorCode.MALFORMED, f"{kind.__name__}: {exc}") from exc

    async def _refuse(self, stream: INetStream, side: str, code: StatusCode) -> None:
        """Answer with a status (best effort), then end the stream."""
        with trio.move_on_after(ERROR_GRACE_S):
            if side == "HOP":
                await self._send_status(stream, code, code.name)
            else:
                await self._send_stop_status(stream, code, code.name)
        await close_quietly(stream)
