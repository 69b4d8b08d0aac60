"""Opening a stream to a peer: which address, which relay, and when to go direct.

A peer is reached at the addresses the peerstore knows, else at those of
its signed offer. A private provider (only circuit addresses on offer) is
reached through its relay, and the relayed connection is then upgraded to a
direct one in the background (a direct dial, then DCUtR), so that later
streams go direct (docs/architecture.md#reaching-a-peer).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable

import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStoreError

from p2pnode.errors import ConfigError, NetworkError, UnreachableError
from p2pnode.p2p import host as hostlib
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p.host import short
from p2pnode.p2p.locks import KeyedLocks
from p2pnode.protocols import dialback, infer, offers, session, status

# How long addresses learnt from an offer stay in the peerstore (offers are
# re-sent every ~10 s; a provider silent for 35 s is forgotten anyway).
OFFER_ADDR_TTL_S = 600
# Peers whose failed dial the dialer remembers (to lift the swarm's block
# once they announce themselves again).
MAX_FAILED_PEERS = 4096
# The protocols whose streams a relayed connection must finish before it is
# closed for a direct one.
OWN_PROTOCOLS = frozenset(
    {session.PROTOCOL_ID, infer.PROTOCOL_ID, status.PROTOCOL_ID, dialback.PROTOCOL_ID}
)


class Dialer:
    """Streams and connections to other nodes, each bounded in time.

    ``upgraded(peer)`` is told when a relayed connection to ``peer`` became
    direct (gossip moves its stream to the new connection). Upgrades run in
    ``nursery`` once :meth:`start` has given one; before that, none is tried.
    """

    def __init__(
        self,
        host: IHost,
        book: offers.OfferBook,
        relay: relaylib.Relay,
        *,
        stream_timeout: float,
        dial_timeout: float,
        upgraded: Callable[[ID], None] = lambda _peer: None,
    ) -> None:
        self._host = host
        self._book = book
        self._relay = relay
        self._stream_timeout = stream_timeout
        self._dial_timeout = dial_timeout
        self._upgraded = upgraded
        self._nursery: trio.Nursery | None = None
        # Peers we failed to reach, with the sequence number of the offer we
        # held then, most recent last (bounded: peer ids cost nothing).
        self._failed: collections.OrderedDict[ID, int] = collections.OrderedDict()
        self._dialing: KeyedLocks[ID] = KeyedLocks()  # circuits being dialled, per peer

    def start(self, nursery: trio.Nursery) -> None:
        """Run upgrades in ``nursery`` from now on (the node's own)."""
        self._nursery = nursery

    async def connect(self, addr: str) -> str:
        """Connect to the peer at a full multiaddr; returns its peer ID.

        Bounded by the host's dial timeout; raises :class:`NetworkError`.
        """
        info = hostlib.parse_peer_addr(addr)
        await hostlib.connect(self._host, info, self._dial_timeout)
        return str(info.peer_id)

    def connected(self, peer: ID | str) -> bool:
        """Whether a live connection to ``peer`` is open.

        A connection whose yamux session is shutting down counts as gone: a
        closed connection wakes its streams' readers before it marks itself
        closed, so a reader that just saw its stream end may otherwise still
        find the connection "open".
        """
        peer_id = ID.from_base58(peer) if isinstance(peer, str) else peer
        return any(not _shutting_down(c) for c in relaylib.connections(self._host, peer_id))

    async def open_stream(self, peer: ID | str, protocol: str) -> INetStream:
        """A new stream of ``protocol`` to ``peer``.

        Raises :class:`UnreachableError` when none came up in time (slow, not
        refused: the peer may be fine and we the ones short of CPU), and
        :class:`NetworkError` when the dial or the negotiation failed.
        """
        peer_id = ID.from_base58(peer) if isinstance(peer, str) else peer
        timeout = self._stream_timeout
        circuits = self._learn_addrs(peer_id)
        offer = self._book.get(str(peer_id))
        # Only relayed addresses on offer: the peer is private; go through its relay.
        private = offer is not None and all(relaylib.is_circuit(a) for a in offer.addrs)
        # Live connections only: a circuit the relay cut (its limits) stays
        # listed, closed, until the swarm notices.
        if circuits and private:
            await self._through_relay(peer_id, circuits[0])
        hostlib.forget_closed(self._host, peer_id)
        try:
            with trio.fail_after(timeout):
                return await self._host.new_stream(peer_id, [TProtocol(protocol)])
        except trio.TooSlowError as exc:
            raise UnreachableError(
                f"no {protocol} stream to {short(peer_id)} within {timeout:g} s"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - StreamFailure, SwarmException, negotiation errors
            self._note_failed(peer_id, offer)
            raise NetworkError(f"cannot open {protocol} to {short(peer_id)}: {exc}") from exc

    def _note_failed(self, peer_id: ID, offer: offers.Offer | None) -> None:
        self._failed[peer_id] = offer.seq if offer is not None else -1
        self._failed.move_to_end(peer_id)
        while len(self._failed) > MAX_FAILED_PEERS:
            self._failed.popitem(last=False)

    async def _through_relay(self, peer_id: ID, circuit: str) -> None:
        """Reach a private peer through its relay, unless a connection is open.

        One circuit per peer: streams opened at once (a status call beside a
        handshake) wait for the first one's circuit instead of each dialling
        their own.
        """
        async with self._dialing.hold(peer_id):
            if relaylib.connections(self._host, peer_id):
                return
            await self._relay.dial(circuit)
            if self._relay.cfg.hole_punch and self._nursery is not None:
                # This stream goes through the relay now; later ones go
                # direct if the upgrade works.
                self._nursery.start_soon(self._upgrade, peer_id)

    async def _upgrade(self, peer_id: ID) -> None:
        if await self._relay.upgrade(peer_id, own=OWN_PROTOCOLS):
            self._upgraded(peer_id)

    def _learn_addrs(self, peer_id: ID) -> list[str]:
        """Where a provider listens, from its signed offer; returns the offer's
        circuit addresses (to dial through their relay).

        An offer naming direct addresses the peerstore does not hold means the
        provider moved (restarted on another port, another host): while no
        connection to it is open, its addresses become the offer's, and the
        swarm forgets that the old ones failed, which would otherwise refuse
        every dial to it for a minute
        (docs/libp2p-traps.md#a-restarted-peer-and-the-negative-dial-cache).
        So it does when the provider we failed to reach has announced itself
        since (a newer offer: restarted at the same address).
        """
        peerstore = self._host.get_peerstore()
        offer = self._book.get(str(peer_id))
        if offer is None:
            return []
        circuits = [a for a in offer.addrs if relaylib.is_circuit(a)]
        failed = self._failed.get(peer_id)
        if (
            failed is not None
            and offer.seq > failed
            and not relaylib.connections(self._host, peer_id)
        ):
            # It announced itself after we failed to reach it (restarted, at
            # its old address or a new one): the swarm's block is out of date.
            del self._failed[peer_id]
            _unblock(self._host, peer_id)
        direct = []
        for text in offer.addrs:
            if relaylib.is_circuit(text):
                continue
            with contextlib.suppress(ValueError, ConfigError):
                direct.append(hostlib.parse_peer_addr(text).addrs[0])
        try:
            known = {str(a) for a in peerstore.addrs(peer_id)}
        except PeerStoreError:  # 0.8.1 raises for a peer it has never heard of
            known = set()
        if not direct or {str(a) for a in direct} <= known:
            return circuits
        if known and not relaylib.connections(self._host, peer_id):
            peerstore.clear_addrs(peer_id)  # addresses it left: each costs a dial attempt
        peerstore.add_addrs(peer_id, direct, OFFER_ADDR_TTL_S)
        _unblock(self._host, peer_id)
        return circuits


def _shutting_down(conn: INetConn) -> bool:
    event = getattr(conn.muxed_conn, "event_shutting_down", None)  # yamux's; mplex has none
    return event is not None and event.is_set()


def _unblock(host: IHost, peer_id: ID) -> None:
    """Lift the swarm's refusal to dial a peer whose every address recently failed."""
    unblock = getattr(host.get_network(), "unblock_peer", None)
    if unblock is not None:  # (py-libp2p 0.8.1's swarm; a host without one never blocks)
        unblock(peer_id)
