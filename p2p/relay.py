"""Circuit relay v2 for private nodes, on py-libp2p's implementation.

Wire side: docs/protocols.md#circuit-relay-and-hole-punching.

Theory of operation. Every node runs the circuit v2 protocol's STOP side and
its transport, so it can accept relayed connections (from the relays it
reserved on) and dial ``/p2p-circuit`` addresses. Only a node started with
``relay_service`` runs the HOP side, within budgets (``p2p/circuit.py``:
reservations, circuits overall and per peer, bytes per circuit and per
window, circuit duration): any public node can be a relay, none is special,
and none relays for others unless told to. A node that is private (by its
dial-back check or by configuration) and knows relays (``--relay``) connects
to them, reserves a slot once identify has run (earlier, py-libp2p caches
"not a relay" for good: docs/libp2p-traps.md#relay-discovery-race), and
advertises ``<relay>/p2p-circuit/p2p/<itself>`` in its offers; the transport
renews the reservations. A consumer that finds only circuit addresses in an
offer dials them through the relay transport (``host.connect`` ignores them:
docs/libp2p-traps.md#circuit-addresses-need-the-relay-transport).

Hole punching (DCUtR). Right after a relayed dial the dialling node tries to
upgrade the connection: first a plain dial to the peer's direct addresses
(enough when the peer is reachable after all), then the DCUtR exchange over
the relayed connection: both sides swap the addresses they are seen at, and
dial each other at the same moment from their listen ports, so each NAT sees
an outgoing connection and lets the other side's packets in (TCP
simultaneous open). New streams prefer the direct connection (py-libp2p's
"best" connection choice); streams already on the relayed one finish there,
and the relayed connection is closed once none of ours is left on it. If the
upgrade fails, everything keeps going through the relay. py-libp2p's DCUtR
service is not run as a service: its auto-drive loop punches every relayed
peer every 2 s (relay-to-relay connections included), which in our tests
left nodes busy and unconverged; we start one attempt where we know it helps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, IMuxedConn, INetConn, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL_ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID, STOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from p2pnode.errors import NetworkError
from p2pnode.p2p import circuit
from p2pnode.p2p import host as hostlib
from p2pnode.p2p.host import short
from p2pnode.p2p.reputation import Offence, Reputation
from p2pnode.protocols.stream import close_quietly, reset_quietly

logger = logging.getLogger(__name__)

CIRCUIT = "/p2p-circuit"
TaskStatus = Any  # trio.TaskStatus is shadowed by the trio-typing stubs


@dataclass
class Upgrades:
    """Relayed connections this node dialled, and what became of them."""

    direct: int = 0  # a plain dial replaced it
    punched: int = 0  # DCUtR's hole punch replaced it
    failed: int = 0  # still relayed


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Relay service limits (when this node relays for others) and relays to use."""

    # Relay for others (HOP): off unless configured, as it spends this
    # node's bandwidth on strangers.
    service: bool = False
    # Reservations held at once, over all peers. Each peer holds at most one
    # (a reservation is for the peer that authenticated the connection) and
    # only while connected.
    max_reservations: int = 16
    # A peer that left keeps its slot this long, then others may take it:
    # a private node whose connection dropped comes back within its relay
    # check (30 s) and finds its slot, not a squatter in it.
    slot_grace_s: float = 60.0
    # Circuits open at once, over all peers and per peer (as either end: a
    # private provider reached by several consumers counts each).
    max_circuits: int = 32
    max_circuits_per_peer: int = 8
    # One circuit: how long it may stay open (idle or not), and the bytes it
    # may carry, both ways (inference is light: 20,000 streamed tokens are
    # ~80 KiB).
    circuit_duration_s: int = 3600
    circuit_bytes: int = 1 << 30
    # Bytes relayed over all circuits per window; once spent, circuits are
    # cut and new ones refused until the window restarts. 4 GiB an hour is a
    # 10 Mbit/s uplink busy all the time.
    total_bytes: int = 4 << 30
    total_window_s: int = 3600
    reservation_ttl_s: int = 3600
    # Relays this node reserves on when it is private (full multiaddrs);
    # without any, it finds relays in the DHT.
    relays: tuple[str, ...] = ()
    # Reservations a private node keeps (several: a relay may die).
    want: int = 2
    reserve_timeout_s: float = 10.0
    # Try to upgrade relayed connections this node dials to direct ones.
    hole_punch: bool = True
    # One attempt: a direct dial, then up to 3 DCUtR rounds of 5 s each.
    hole_punch_timeout_s: float = 30.0
    # How often a retired relayed connection is checked for streams of ours.
    retire_check_s: float = 1.0


def is_circuit(addr: str) -> bool:
    return CIRCUIT in addr


def is_relayed(conn: INetConn | IMuxedConn) -> bool:
    """Whether a connection runs through a relay (either end of it).

    Takes a swarm connection, or a stream's ``muxed_conn``.
    """
    if conn.get_connection_type() is ConnectionType.RELAYED:
        return True
    return any(is_circuit(str(a)) for a in conn.get_transport_addresses())


def connections(host: IHost, peer: ID) -> list[INetConn]:
    """The host's live connections to a peer."""
    held = host.get_network().get_connections(peer)
    return [c for c in held if not c.is_closed]


# The protection a private node keeps on the relays it holds reservations on.
RESERVED_ON_TAG = "p2pnode-reserved-on"

# How much later than the peer the side that started the exchange dials.
RESPONDER_HEAD_START_S = 0.5


@contextmanager
def protected(host: IHost, peer: ID, tag: str) -> Iterator[None]:
    """Keep the swarm from trimming ``peer``'s connections while inside.

    py-libp2p keeps one connection per peer (max_connections_per_peer=1):
    when a direct one arrives it closes the older relayed one, streams and
    all (docs/libp2p-traps.md#connection-trim). ``tag`` names who protects,
    so that one role's exit does not lift another's protection of the same
    peer.
    """
    hostlib.protect(host, peer, tag)
    try:
        yield
    finally:
        hostlib.unprotect(host, peer, tag)


async def hold_until_direct_only(host: IHost, peer: ID, check_s: float) -> None:
    """Keep ``peer`` protected until no relayed connection to it is left.

    Also ends when no direct connection is left (the upgrade did not hold).
    """
    with protected(host, peer, "p2pnode-upgrade-answered"):
        while True:
            held = connections(host, peer)
            if not any(is_relayed(c) for c in held) or all(is_relayed(c) for c in held):
                return
            await trio.sleep(check_s)


class _HolePunch(DCUtRProtocol):
    """py-libp2p's DCUtR, telling how an upgrade came about, with a head start.

    Step 0 of the spec (a plain dial to the peer's direct addresses) needs no
    punching; counting it apart keeps ``punched`` honest on loopback, where
    every "private" address is dialable.

    The head start: py-libp2p's initiator dials half an RTT after its SYNC
    and upgrades its dial as the *responder* (right when the two SYNs meet in
    a TCP simultaneous open). If its SYN is first and reaches a listener
    instead (no NAT in between, or a SYNC slowed by a busy relay), that
    listener also takes the responder side and the two wait on each other
    until the round times out: seen in simnet. Dialling 0.5 s after the
    responder fixes both cases: with NATs, the responder's SYN opens its own
    NAT (ours drops it; TCP sends it again after 1 s) and ours then passes
    into that opening; without, the responder's dial simply connects to our
    listener and ours is not needed.
    """

    def __init__(self, host: IHost, check_s: float) -> None:
        super().__init__(host)
        # Peers whose last upgrade a plain dial made (step 0).
        self.unilateral: set[ID] = set()
        self._check_s = check_s
        # Relay.run's nursery, for the protection that outlives an answer.
        self.tasks: trio.Nursery | None = None

    async def _handle_dcutr_stream(self, stream: INetStream) -> None:
        """Answer a peer's hole punch, keeping our relayed connection to it until it retires it."""
        peer = stream.muxed_conn.peer_id
        try:
            with protected(self.host, peer, "p2pnode-upgrade-answering"):
                await super()._handle_dcutr_stream(stream)
        except Exception:
            # The handler runs in the swarm's task: an exception escaping it
            # would end the node (docs/libp2p-traps.md#handler-exceptions-end-the-node).
            # Only this stream pays.
            logger.exception("hole punch answer to %s failed", short(peer))
            await reset_quietly(stream)
        finally:
            if self.tasks is not None:
                # The peer closes the relayed connection once its streams on it
                # are done; until then, no trim.
                self.tasks.start_soon(hold_until_direct_only, self.host, peer, self._check_s)

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        done = await super()._try_unilateral_upgrade(peer_id)
        if done:
            self.unilateral.add(peer_id)
        return done

    async def _perform_hole_punch(
        self, peer_id: ID, addrs: list[multiaddr.Multiaddr], as_responder: bool = False
    ) -> bool:
        if as_responder:  # we started the exchange: let the peer's SYN go first
            await trio.sleep(RESPONDER_HEAD_START_S)
        return await super()._perform_hole_punch(peer_id, addrs, as_responder)


class Relay:
    """The circuit v2 protocol, transport and this node's reservations."""

    def __init__(
        self,
        host: IHost,
        cfg: Config,
        *,
        reputation: Reputation,
    ) -> None:
        """A relay message that breaks the protocol counts against its sender
        in ``reputation``; a banned peer's HOP and STOP streams are reset."""
        self.cfg = cfg
        self._host = host
        limits = RelayLimits(
            duration=cfg.circuit_duration_s,
            data=cfg.circuit_bytes,
            max_circuit_conns=cfg.max_circuits_per_peer,
            max_reservations=cfg.max_reservations,
            reservation_ttl=cfg.reservation_ttl_s,
        )
        budget = circuit.Budget(
            max_circuits=cfg.max_circuits,
            max_circuits_per_peer=cfg.max_circuits_per_peer,
            window_bytes=cfg.total_bytes,
            window_s=cfg.total_window_s,
        )
        roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if cfg.service else RelayRole(0))
        self.protocol = circuit.Protocol(
            host,
            limits,
            allow_hop=cfg.service,
            budget=budget,
            slot_grace_s=cfg.slot_grace_s,
            is_our_relay=lambda peer: str(peer) in self.reservations,
            misbehaved=lambda peer: reputation.record(peer, Offence.PROTOCOL, trio.current_time()),
            banned=lambda peer: reputation.banned(peer, trio.current_time()),
        )
        self.transport = CircuitV2Transport(
            host, self.protocol, RelayConfig(roles=roles, limits=limits)
        )
        # relay peer id -> the circuit address it gives this node
        self.reservations: dict[str, str] = {}
        # Upgrades of relayed connections: "direct" (a plain dial did it),
        # "punched" (DCUtR did it), "failed" (still relayed).
        self.upgrades = Upgrades()
        self._punch = _HolePunch(host, cfg.retire_check_s)
        self._upgrading: set[ID] = set()
        # Before the host listens, so no stream comes before its handler.
        # HOP only for the service: py-libp2p's HOP handler does not look at
        # allow_hop itself, so registering it would make every node a relay.
        if cfg.service:
            host.set_stream_handler(TProtocol(PROTOCOL_ID), self.protocol._handle_hop_stream)
        host.set_stream_handler(TProtocol(STOP_PROTOCOL_ID), self.protocol._handle_stop_stream)
        # Answering a peer's hole punch costs little: always on.
        host.set_stream_handler(DCUTR_PROTOCOL_ID, self._punch._handle_dcutr_stream)

    async def run(self, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Run the protocol service until cancelled."""
        async with background_trio_service(self.protocol), trio.open_nursery() as tasks:
            self._punch.tasks = tasks
            task_status.started()
            await trio.sleep_forever()

    async def reserve_all(self, nursery: trio.Nursery, discovered: Sequence[str] = ()) -> list[str]:
        """Reserve on the relays not yet reserved; returns the circuit addresses.

        The configured relays first, then ``discovered`` ones (from the DHT)
        until ``want`` reservations are held.
        """
        for addr in [*self.cfg.relays, *discovered]:
            if len(self.reservations) >= self.cfg.want:
                break
            info = hostlib.parse_peer_addr(addr)
            if str(info.peer_id) in self.reservations:
                continue
            try:
                await self.reserve(addr, nursery)
            except NetworkError as exc:
                logger.warning("no reservation on relay %s: %s", short(info.peer_id), exc)
        return list(self.reservations.values())

    async def reserve(self, relay_addr: str, nursery: trio.Nursery) -> str:
        """Reserve a slot on one relay; returns this node's circuit address through it."""
        info = hostlib.parse_peer_addr(relay_addr)
        relay = info.peer_id
        try:
            with trio.fail_after(self.cfg.reserve_timeout_s):
                await hostlib.connect(self._host, info, self.cfg.reserve_timeout_s)
                await self._identified(relay)
                stream = await self._host.new_stream(relay, [TProtocol(PROTOCOL_ID)])
                try:
                    ok = await self.transport.reserve(stream, relay, nursery)
                finally:
                    # py-libp2p leaves the first RESERVE stream open for good
                    # (its renewals close theirs): one idle stream per relay.
                    await close_quietly(stream)
        except trio.TooSlowError as exc:
            raise NetworkError(f"relay {short(relay)} did not answer in time") from exc
        except NetworkError:
            raise
        except Exception as exc:  # noqa: BLE001 - py-libp2p's stream and relay errors
            raise NetworkError(f"relay {short(relay)}: {exc}") from exc
        if not ok:
            raise NetworkError(f"relay {short(relay)} refused the reservation")
        base = relay_addr.split("/p2p/")[0]
        circuit = f"{base}/p2p/{relay}{CIRCUIT}/p2p/{self._host.get_id()}"
        self.reservations[str(relay)] = circuit
        hostlib.protect(self._host, relay, RESERVED_ON_TAG)
        logger.info("reserved on relay %s: %s", short(relay), circuit)
        return circuit

    def forget(self, relay_id: str) -> None:
        """Drop the reservation held on ``relay_id`` (its connection is gone)."""
        if self.reservations.pop(relay_id, None) is not None:
            hostlib.unprotect(self._host, ID.from_base58(relay_id), RESERVED_ON_TAG)

    async def _identified(self, peer: ID) -> None:
        """Wait until identify has told us the peer's protocols.

        See docs/libp2p-traps.md#relay-discovery-race.
        """
        peerstore = self._host.get_peerstore()
        while True:
            try:
                if peerstore.get_protocols(peer):
                    return
            except Exception:  # noqa: BLE001, S110 - unknown peer: not yet identified
                pass
            await trio.sleep(0.02)

    def connection_counts(self) -> dict[str, int]:
        """Live connections of this host: how many direct, how many relayed."""
        counts = {"direct": 0, "relayed": 0}
        for peer in self._host.get_connected_peers():
            for conn in connections(self._host, peer):
                counts["relayed" if is_relayed(conn) else "direct"] += 1
        return counts

    async def upgrade(self, peer: ID, *, own: frozenset[str]) -> bool:
        """Try once to replace the relayed connection to ``peer`` by a direct one.

        Returns whether a direct connection exists afterwards. On success the
        relayed connection is closed once it carries no stream whose protocol
        is in ``own`` (streams already on it finish there first, so this
        returns only then); on failure it stays, and the node keeps using it.
        The punch is bounded by ``hole_punch_timeout_s``; a second call for a
        peer being upgraded returns False at once.
        """
        if peer in self._upgrading:
            return False
        self._upgrading.add(peer)
        try:
            with protected(self._host, peer, "p2pnode-upgrade"):
                return await self._upgrade(peer, own)
        finally:
            self._punch.unilateral.discard(peer)
            self._upgrading.discard(peer)

    async def _upgrade(self, peer: ID, own: frozenset[str]) -> bool:
        def direct() -> bool:
            return any(not is_relayed(c) for c in connections(self._host, peer))

        ok = False
        already = direct()
        with trio.move_on_after(self.cfg.hole_punch_timeout_s):
            # Returns at once if a direct connection is already there.
            ok = await self._punch.initiate_hole_punch(peer)
        # The peer's own dial may have made it even where ours had no address
        # to try (py-libp2p then reports failure).
        if not (ok or direct()):
            self.upgrades.failed += 1
            logger.info("connection to %s stays relayed: hole punch failed", short(peer))
            return False
        dialled = already or peer in self._punch.unilateral
        if dialled:
            self.upgrades.direct += 1
        else:
            self.upgrades.punched += 1
        logger.info(
            "connection to %s upgraded (%s)", short(peer), "direct" if dialled else "punched"
        )
        # Not bounded by the punch's timeout: a long generation may still be
        # streaming over the relay.
        await self._retire_relayed(peer, own)
        return True

    @property
    def upgraded(self) -> int:
        """Relayed connections this node made direct (by either way)."""
        return self.upgrades.direct + self.upgrades.punched

    async def _retire_relayed(self, peer: ID, own: frozenset[str]) -> None:
        """Close the relayed connections to ``peer`` once none of our streams uses them.

        Only ``own`` protocols (and streams still negotiating theirs) are
        waited for: py-libp2p's long-lived streams (gossipsub) reopen on the
        direct connection (see ``Discovery.reattach``).
        """
        while True:
            held = connections(self._host, peer)
            relayed = [c for c in held if is_relayed(c)]
            if not relayed or len(relayed) == len(held):
                return
            busy = False
            for conn in relayed:
                # A stream still negotiating has no protocol yet: it may be ours.
                protocols = {s.get_protocol() for s in conn.get_streams()}
                if None in protocols or protocols & own:
                    busy = True
                    continue
                await conn.close()
            if not busy:
                return
            await trio.sleep(self.cfg.retire_check_s)

    async def dial(self, circuit_addr: str) -> None:
        """Connect to a peer through the relay in its circuit address."""
        try:
            await self.transport.dial(multiaddr.Multiaddr(circuit_addr))
        except Exception as exc:  # noqa: BLE001 - ConnectionError and relay errors
            raise NetworkError(f"cannot dial {circuit_addr} through its relay: {exc}") from exc
