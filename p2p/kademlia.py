"""The Kademlia DHT as discovery uses it: provider records, one iterative walk, bounded serving.

py-libp2p brings the wire protocol, the routing table and the record store;
we do not run its maintenance service (it refreshes the routing table the
moment it starts, and 50 nodes doing that in one process saturate the
loop: docs/libp2p-traps.md#dht-refresh-storm). Instead:

- routing tables are fed from connections (the DHT does not learn them
  itself: docs/libp2p-traps.md#dht-routing-table-not-fed);
- our provider records (a model each, and the relay service's) are placed
  at the k closest peers on our own schedule, with the addresses we
  advertise (:meth:`Kademlia.provide_models`, :meth:`Kademlia.provide_relay`);
- a verified offer's provider records are held here too, so any node
  answers GET_PROVIDERS for every provider it has an offer from
  (:meth:`Kademlia.cache_provider_records`);
- a lookup is one iterative GET_PROVIDERS walk (py-libp2p's
  ``find_providers`` walks twice), walked again only when no peer answered
  at all, and what strangers answer is bounded and unverified;
- the record store is bounded, verified providers first, and inbound DHT
  streams are bounded per peer and in idle time
  (docs/libp2p-traps.md#dht-inbound-slots).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import trio
from google.protobuf.message import DecodeError
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.exceptions import BaseLibp2pError
from libp2p.kad_dht.common import BUCKET_SIZE
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb import kademlia_pb2 as kad_pb
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import PeerStoreError, env_to_send_in_RPC
from libp2p.utils.varint import read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from p2pnode.p2p.host import short
from p2pnode.protocols import offers
from p2pnode.protocols.stream import close_quietly, reset_quietly
from p2pnode.protocols.wire import encode_frame

logger = logging.getLogger(__name__)

# trio.TaskStatus exists, but the trio-stubs that py-libp2p pulls in (trio-typing)
# predate it and shadow trio's own types for mypy.
TaskStatus = Any


def dht_key(model_id: str) -> bytes:
    """The DHT key of a model: sha256 of ``p2pnode/model/<id>`` (the chain names
    models by ``chain/client.py:model_key``, a keccak: another key, another place).

    See docs/libp2p-traps.md#dht-keys-from-text.
    """
    return hashlib.sha256(f"p2pnode/model/{model_id}".encode()).digest()


RELAY_KEY = hashlib.sha256(b"p2pnode/relay/circuit-v2").digest()
"""Nodes that offer the relay service put a provider record under this key."""
# How long closing a DHT stream may take when shielded from cancellation.
CLOSE_S = 5.0


# A peer's DHT streams answered at once (py-libp2p opens one per query, a few
# at a time), and how long one may sit without a message before it is reset.
KAD_STREAMS_PER_PEER = 4
KAD_IDLE_S = 10.0


class _IdleBounded:
    """A stream whose reads fail after ``idle_s`` without data (py-libp2p's DHT handler
    then resets it, as on any read error); everything else is the stream's own."""

    def __init__(self, stream: INetStream, idle_s: float) -> None:
        self._stream = stream
        self._idle_s = idle_s

    async def read(self, n: int | None = None) -> bytes:
        with trio.fail_after(self._idle_s):
            return await self._stream.read(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _ConnectionWatcher(INotifee):
    """Feeds newly connected peers to the DHT routing table.

    See docs/libp2p-traps.md#dht-routing-table-not-fed.
    """

    def __init__(self, on_connect: Callable[[ID], None]) -> None:
        self._on_connect = on_connect

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._on_connect(conn.muxed_conn.peer_id)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


class Settings(Protocol):
    """What the DHT reads of discovery's config (``p2p/discovery.py:Config``)."""

    @property
    def lookup_alpha(self) -> int: ...
    @property
    def lookup_query_timeout(self) -> float: ...
    @property
    def reprovide_s(self) -> float: ...
    @property
    def reprovide_min_s(self) -> float: ...
    @property
    def max_record_keys(self) -> int: ...


class Kademlia:
    """One node's DHT: its records, its lookups, its DHT server. Run :meth:`run`.

    ``advertised()`` gives the addresses this node's records carry (its
    offer's: the relayed ones when private); ``book`` says which providers
    are verified (their signed offer is held).
    """

    def __init__(
        self,
        host: IHost,
        cfg: Settings,
        book: offers.OfferBook,
        advertised: Callable[[], Sequence[str]],
    ) -> None:
        self.host = host
        self.cfg = cfg
        self._advertised_addrs = advertised
        self.dht = KadDHT(host, DHTMode.SERVER, enable_random_walk=False)
        _bound_provider_store(self.dht, book, cfg.max_record_keys)
        # py-libp2p 0.8.1 answers DHT streams in 12 handler slots shared by
        # every peer, each reading with no time bound: 12 idle streams from
        # one peer shut the node out of the DHT (found by the fuzzer). Its
        # streams go through a handler that bounds both
        # (docs/libp2p-traps.md#dht-inbound-slots).
        self._kad_streams: dict[ID, int] = {}
        self.streams_refused = 0  # beyond a peer's share
        host.set_stream_handler(KAD_PROTOCOL_ID, self._serve_kad)
        self._provided: set[str] = set()
        self._provided_addrs: tuple[str, ...] = ()
        self._relaying = False
        self._provided_at_size = 0
        self._provided_at = -float("inf")
        self._new_peers: trio.MemorySendChannel[ID]
        self._new_peers, self._new_peers_rx = trio.open_memory_channel[ID](256)
        host.get_network().register_notifee(_ConnectionWatcher(self._peer_connected))

    async def run(self, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Feed the routing table from connections until cancelled."""
        for peer in self.host.get_connected_peers():
            self._peer_connected(peer)
        task_status.started()
        await self._feed_routing_table()

    # --- our records ---------------------------------------------------------

    async def provide_models(self, model_ids: Iterable[str], addrs: tuple[str, ...]) -> None:
        """Place records for the models an offer names, if new, moved or due to be re-placed."""
        new = set(model_ids) - self._provided
        # New addresses (a private node's relayed ones) make the records stale.
        moved = addrs != self._provided_addrs
        if new or moved or self._should_reprovide():
            self._provided |= new
            self._provided_addrs = addrs
            for model_id in sorted(self._provided):
                await self._provide(model_id)

    async def sweep(self, reprovide_due: bool) -> None:
        """Drop expired records; re-place ours when due or when the network has grown."""
        self.dht.provider_store.cleanup_expired()
        if (self._provided or self._relaying) and (reprovide_due or self._should_reprovide()):
            for model_id in sorted(self._provided):
                await self._provide(model_id)
            if self._relaying:
                await self._provide_key(RELAY_KEY, "the relay service")

    @property
    def provided_at(self) -> float:
        """When our records were last placed (trio clock)."""
        return self._provided_at

    async def _provide(self, model_id: str) -> None:
        await self._provide_key(dht_key(model_id), model_id)

    async def provide_relay(self) -> None:
        """Announce in the DHT that this node relays (and keep announcing it)."""
        self._relaying = True
        await self._provide_key(RELAY_KEY, "the relay service")

    async def _provide_key(self, key: bytes, label: str) -> None:
        """Store our provider record at the k closest peers to ``key``.

        The same walk as a lookup finds them (py-libp2p's provide() runs its
        own, slower, closest-peers walk first).
        """
        store = self.dht.provider_store
        addrs = self._advertised()
        store.add_provider(key, PeerInfo(self.host.get_id(), addrs))
        store.providing_keys.add(key)
        self._provided_at_size = self.dht.get_routing_table_size()
        self._provided_at = trio.current_time()
        closest: list[ID] = []
        with trio.move_on_after(self.cfg.lookup_query_timeout * 3):
            _, closest = await self._walk(key, stop_when_found=False)
            async with trio.open_nursery() as nursery:
                for peer in closest[:BUCKET_SIZE]:
                    nursery.start_soon(self._send_add_provider, peer, key, addrs)
        logger.debug("provided %s at %d peers", label, min(len(closest), BUCKET_SIZE))

    def _advertised(self) -> list[Multiaddr]:
        """The addresses this node gives out: its offer's (its relayed ones when private)."""
        addrs = self._advertised_addrs()
        if addrs:
            return [Multiaddr(a) for a in addrs]
        return list(self.host.get_addrs())

    async def _send_add_provider(self, peer: ID, key: bytes, addrs: list[Multiaddr]) -> None:
        """One ADD_PROVIDER (Kademlia spec), fire-and-forget as Kubo and py-libp2p send it.

        py-libp2p's own sends ``host.get_addrs()``: for a private node, listen
        addresses nobody can dial. This sends the ones the node advertises.
        """
        message = kad_pb.Message(type=kad_pb.Message.MessageType.ADD_PROVIDER, key=key)
        envelope = env_to_send_in_RPC(self.host)[0]
        message.senderRecord = envelope
        provider = message.providerPeers.add()
        provider.id = self.host.get_id().to_bytes()
        provider.addrs.extend(a.to_bytes() for a in addrs)
        provider.signedRecord = envelope
        try:
            stream = await self.host.new_stream(peer, [KAD_PROTOCOL_ID])
            try:
                await stream.write(encode_frame(message.SerializeToString()))
            finally:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_S):
                    await close_quietly(stream)
        except BaseLibp2pError as exc:
            logger.debug("ADD_PROVIDER to %s failed: %s", short(peer), exc)

    def _should_reprovide(self) -> bool:
        # Records placed while the network was small sit at peers that are no
        # longer the closest to the key; re-place them once it has doubled.
        if trio.current_time() - self._provided_at < self.cfg.reprovide_min_s:
            return False
        return self.dht.get_routing_table_size() >= max(2, 2 * self._provided_at_size)

    # --- others' records ------------------------------------------------------

    def cache_provider_records(self, offer: offers.Offer) -> None:
        """Hold the provider records a verified ``offer`` stands for (see below)."""
        # A provider's verified offer tells this node what a provider record
        # would: who serves which model, at which addresses. Holding it lets
        # this node answer GET_PROVIDERS itself, so a node that just joined
        # learns every provider from the first peer it asks (Kademlia's
        # caching along the lookup path, fed by signed gossip). The record
        # leaves with the offer.
        # The book admitted the offer only if every address parses and names
        # its provider.
        info = PeerInfo(ID.from_base58(offer.peer_id), [Multiaddr(a) for a in offer.addrs])
        for model in offer.models:
            self.dht.provider_store.add_provider(dht_key(model.model_id), info)

    def drop_provider_records(self, offer: offers.Offer) -> None:
        """Let go of the records a verified offer stood for (it expired)."""
        for model in offer.models:
            held = self.dht.provider_store.providers.get(dht_key(model.model_id), {})
            held.pop(offer.peer_id, None)

    # --- serving --------------------------------------------------------------

    async def _serve_kad(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        held = self._kad_streams.get(peer, 0)
        if held >= KAD_STREAMS_PER_PEER:
            self.streams_refused += 1
            await reset_quietly(stream)
            return
        self._kad_streams[peer] = held + 1
        try:
            await self.dht.handle_stream(_IdleBounded(stream, KAD_IDLE_S))  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - py-libp2p's handler is meant to catch all itself
            logger.exception("DHT stream of %s failed (a bug in py-libp2p or ours)", short(peer))
            await reset_quietly(stream)
        finally:
            left = self._kad_streams.pop(peer, 1) - 1
            if left:
                self._kad_streams[peer] = left

    # --- routing table and lookups ----------------------------------------------

    def _peer_connected(self, peer: ID) -> None:
        # A burst beyond 256 pending is dropped; the walks fill the table too.
        with contextlib.suppress(trio.WouldBlock):
            self._new_peers.send_nowait(peer)

    def _known_addrs(self, peer: ID) -> list[Multiaddr]:
        try:
            return list(self.host.get_peerstore().addrs(peer))
        except PeerStoreError:  # py-libp2p raises for a peer it never saw
            return []

    async def _feed_routing_table(self) -> None:
        async with trio.open_nursery() as nursery:
            async for peer in self._new_peers_rx:
                nursery.start_soon(self._add_when_addressable, peer)

    async def _add_when_addressable(self, peer: ID) -> None:
        """Add a newly connected peer to the routing table once we can dial it.

        An inbound peer's listen addresses reach the peerstore only when
        identify completes, and py-libp2p signals that to no one; the
        routing table refuses a peer without addresses. So look again with
        a backoff, for a few seconds at most.
        """
        for delay in _ADDRESSABLE_BACKOFF_S:
            if self._known_addrs(peer):
                # Adding may ping the oldest bucket entry: never on the notifee path.
                await self.dht.add_peer(peer, skip_server_mode_check=True)
                return
            await trio.sleep(delay)

    async def find_relays(self) -> list[str]:
        """Full multiaddrs of nodes that announced the relay service (one walk)."""
        found = await self._lookup(RELAY_KEY)
        out: list[str] = []
        # Records are unverified (anyone can name anyone): try a few, named by
        # the most peers first and at random among equals (``_walk``), so that
        # a flood of fake relays cannot keep us busy or pick our relay.
        for peer in found[:MAX_DHT_CANDIDATES]:
            pid = ID.from_base58(peer)
            if pid == self.host.get_id():
                continue
            out.extend(f"{addr}/p2p/{peer}" for addr in self._known_addrs(pid)[:1])
        return out

    async def find_providers(self, model_id: str) -> list[str]:
        """Peer IDs with a provider record for ``model_id``, from one iterative walk.

        Records this node holds itself count too. Like any DHT lookup the
        answer may be incomplete (docs/libp2p-traps.md#dht-lookups-are-incomplete);
        gossip fills the rest.
        """
        return await self._lookup(dht_key(model_id))

    async def _lookup(self, key: bytes) -> list[str]:
        """A walk that stops when found, walked again while no peer answered.

        When every peer asked failed or timed out at once, the likelier cause
        is a busy loop (ours or theirs) than a network of dead peers; one more
        walk within the same bound costs little, where giving up leaves a
        joining node without DHT answers until its next lookup.
        """
        found: list[str] = []
        # A walk is bounded in rounds by k, but peers may answer slowly round
        # after round (each up to the query timeout): bound the whole lookup.
        with trio.move_on_after(self.cfg.lookup_query_timeout * _MAX_WALK_ROUNDS):
            for _ in range(_WALKS_WHEN_NONE_ANSWER):
                found, answered = await self._walk(key, stop_when_found=True)
                if answered or not self.dht.routing_table.get_peer_ids():
                    break
        return found

    async def _walk(self, key: bytes, *, stop_when_found: bool) -> tuple[list[str], list[ID]]:
        """Iterative GET_PROVIDERS walk toward ``key``.

        Asks the ``lookup_alpha`` closest known peers at once, learns closer
        peers from their answers, and stops when the k closest peers known
        have all been asked or, with ``stop_when_found``, after the first
        round in which two peers (or this node's own store and a peer) have
        named providers: one liar answering first cannot end a walk with
        made-up records.
        Returns the providers found, named by the most peers first, then by
        the best place any peer gave them, at random among equals (so that
        one peer naming twenty cannot push out the provider the others
        name); and the peers that answered, closest first. A peer that fails
        or is slow is skipped, not retried.
        """
        store = self.dht.provider_store
        me = self.host.get_id()
        # provider -> the peers that named it, and the best place it was given;
        # and the peers that named any.
        named_by: dict[str, set[ID]] = {}
        place: dict[str, int] = {}
        namers: set[ID] = set()

        def name(providers: Sequence[ID], namer: ID) -> None:
            if providers:
                namers.add(namer)
            for i, provider in enumerate(providers):
                peer = str(provider)
                named_by.setdefault(peer, set()).add(namer)
                place[peer] = min(place.get(peer, i), i)

        name([p.peer_id for p in store.get_providers(key)], me)
        candidates = sort_peer_ids_by_distance(
            key, [p for p in self.dht.routing_table.get_peer_ids() if p != me]
        )
        asked: set[ID] = set()
        answered: set[ID] = set()
        alpha = self.cfg.lookup_alpha
        while True:
            batch = [p for p in candidates if p not in asked][:alpha]
            if not batch:
                break
            learned: list[ID] = []
            round_scope = trio.CancelScope()

            async def ask(
                peer: ID, learned: list[ID] = learned, round_scope: trio.CancelScope = round_scope
            ) -> None:
                asked.add(peer)
                with trio.move_on_after(self.cfg.lookup_query_timeout):
                    reply = await self._get_providers(peer, key)
                    if reply is None:
                        return
                    answered.add(peer)
                    providers, closer = reply
                    # Not kept in our own store: we would hand unverified
                    # records on to whoever asks us.
                    name([info.peer_id for info in providers], peer)
                    learned.extend(closer)
                    # Enough peers have named providers: the round's slower
                    # queries cannot change the answer, only delay it (one
                    # busy peer held whole lookups for its full timeout).
                    # Peers, not our own store: a liar answering first must
                    # not cut off the honest answers of its round.
                    if stop_when_found and len(namers - {me}) >= _NAMERS_TO_STOP:
                        round_scope.cancel()

            with round_scope:
                async with trio.open_nursery() as nursery:
                    for peer in batch:
                        nursery.start_soon(ask, peer)
            known = set(candidates)
            candidates = sort_peer_ids_by_distance(
                key, candidates + [p for p in learned if p not in known and p != me]
            )
            # Every node caches the providers it has verified offers from, so
            # the first peers that name any usually name them all: stop there
            # (gossip fills in what they missed:
            # docs/libp2p-traps.md#dht-lookups-are-incomplete).
            if stop_when_found and len(namers) >= _NAMERS_TO_STOP:
                break
            # Kademlia's end: the k closest peers known that did not fail
            # have all been asked. Stopping at the alpha closest would settle
            # for a local minimum on sparse routing tables, and records would
            # land off target; counting peers that failed would let a liar end
            # the walk with k made-up peers closer than any honest one.
            live = [p for p in candidates if p not in asked or p in answered]
            if all(p in asked for p in live[:BUCKET_SIZE]):
                break
        tie = {peer: _RANDOM.random() for peer in named_by}
        found = sorted(named_by, key=lambda p: (-len(named_by[p]), place[p], tie[p]))
        return found, [p for p in candidates if p in answered]

    async def _get_providers(self, peer: ID, key: bytes) -> tuple[list[PeerInfo], list[ID]] | None:
        """One GET_PROVIDERS exchange (Kademlia spec); None if the peer failed.

        py-libp2p 0.8.1's own query drops the addresses of the closer peers
        in the answer, so a walk cannot go past the first hop; this keeps them
        (in the peerstore, where the next dial looks).
        """
        request = kad_pb.Message(type=kad_pb.Message.MessageType.GET_PROVIDERS, key=key)
        request.senderRecord = env_to_send_in_RPC(self.host)[0]
        peerstore = self.host.get_peerstore()
        try:
            stream = await self.host.new_stream(peer, [KAD_PROTOCOL_ID])
            try:
                await stream.write(encode_frame(request.SerializeToString()))
                raw = await read_varint_prefixed_bytes_limited(stream, _MAX_KAD_MESSAGE)
            except BaseException:
                # Cancelled or failed mid-exchange: reset, so the answering
                # node's handler (12 slots in py-libp2p) is freed at once.
                await reset_quietly(stream)
                raise
            # Shielded: a query cancelled right here must still release the
            # peer's slot, or slow walks leak slots until the peer refuses all.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_S):
                await close_quietly(stream)
            response = kad_pb.Message()
            response.ParseFromString(raw)
        except (BaseLibp2pError, DecodeError, ValueError) as exc:
            logger.debug("GET_PROVIDERS to %s failed: %s", short(peer), exc)
            return None
        # What a DHT peer says of others is unverified: keep a bounded number
        # of well-formed entries, each with a few addresses. A provider named
        # here is only believed once it answers for itself (a signed offer).
        dialable = _dialable(self.host)
        providers = _peer_infos(response.providerPeers, _MAX_PEERS_PER_ANSWER, dialable)
        closer = _peer_infos(response.closerPeers, _MAX_PEERS_PER_ANSWER, dialable)
        for info in [*providers, *closer]:
            if info.addrs:
                peerstore.add_addrs(info.peer_id, info.addrs, _PEER_ADDR_TTL_S)
        # It answered a DHT query, so it is a DHT server we can reach: the
        # routing table learns from the walk as Kademlia intends.
        await self.dht.add_peer(peer, skip_server_mode_check=True)
        return providers, [c.peer_id for c in closer if c.peer_id != self.host.get_id()]


# Identify completes within ~10-100 ms of a connection on a busy loop; past a
# few seconds the peer is gone or does not identify, and gets no entry.
_ADDRESSABLE_BACKOFF_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
# Our records are tiny; the cap only bounds a hostile answer.
_MAX_KAD_MESSAGE = 256 * 1024
# Addresses learned in a lookup stay long enough to dial them for a session.
_PEER_ADDR_TTL_S = 600
# Rounds of queries one lookup may wait for in all.
_MAX_WALK_ROUNDS = 5
# Walks one lookup may take while no peer answers (within the rounds above).
_WALKS_WHEN_NONE_ANSWER = 3
# Peers (this node's own store counts as one) whose records end a lookup early.
_NAMERS_TO_STOP = 2
MAX_DHT_CANDIDATES = 8
"""Peers named by DHT records that one lookup goes on to ask or dial (records are unverified)."""
_RANDOM = secrets.SystemRandom()
# Kademlia answers carry k = 20 peers; a few addresses each (listen + circuit).
_MAX_PEERS_PER_ANSWER = BUCKET_SIZE
_MAX_ADDRS_PER_PEER = 4


def _bound_provider_store(dht: KadDHT, book: offers.OfferBook, max_keys: int) -> None:
    """Make the DHT's provider store bounded, and verified providers first.

    py-libp2p keeps up to k = 20 records per key, first come first served,
    for any key anyone names: twenty Sybils announcing a model first would
    keep every honest provider's record out, and a flood of keys grows
    without bound. Here a provider whose signed offer this node holds
    replaces an unverified record when the key is full, and new keys beyond
    ``max_keys`` are refused unless their provider is verified.
    """
    store = dht.provider_store
    add = store.add_provider

    def add_bounded(key: bytes, provider: PeerInfo) -> None:
        peer = str(provider.peer_id)
        verified = peer == str(dht.local_peer_id) or book.get(peer) is not None
        held = store.providers.get(key)
        if held is None:
            if len(store.providers) >= max_keys and not verified:
                return
        elif len(held) >= BUCKET_SIZE and peer not in held:
            if not verified:
                return
            strangers = [p for p in held if book.get(p) is None]
            if not strangers:
                return
            del held[min(strangers, key=lambda p: held[p].timestamp)]
        add(key, provider)

    store.add_provider = add_bounded  # type: ignore[method-assign]


def _dialable(host: IHost) -> Callable[[Multiaddr], bool]:
    """Whether an address is of a kind ``host`` dials: IP (TCP, WebSocket, relayed) or memory."""
    kinds = {"ip4", "ip6"}
    # The memory transport (p2p/memory.py) says so; asked by name, so that a
    # real node never imports it.
    manager: Any = getattr(host.get_network(), "transport_manager", None)
    if manager is not None and any(
        "memory" in getattr(t, "protocols", list)() for t in manager.get_transports()
    ):
        kinds.add("memory")

    def dialable(addr: Multiaddr) -> bool:
        try:
            first = next(iter(addr.protocols()), None)
        except Exception:  # noqa: BLE001 - a peer's junk bytes parse lazily, raising any of a zoo of types
            return False
        return first is not None and first.name in kinds

    return dialable


def _peer_infos(
    protos: Iterable[kad_pb.Message.Peer], limit: int, dialable: Callable[[Multiaddr], bool]
) -> list[PeerInfo]:
    """The well-formed peers of a DHT answer (at most ``limit``); junk is skipped.

    Addresses no transport of ours can dial are dropped here, before they
    reach the peerstore.
    """
    out: list[PeerInfo] = []
    for proto in protos:
        if len(out) >= limit:
            break
        try:
            peer = ID(proto.id)
            peer.to_base58()
        except Exception:  # noqa: BLE001, S112 - not a peer id: skip the entry
            continue
        addrs = []
        for raw in proto.addrs[:_MAX_ADDRS_PER_PEER]:
            try:
                addr = Multiaddr(raw)
                # Parsed lazily: read it all now, or junk after a good first
                # protocol would raise later wherever the address is printed.
                str(addr)
            except Exception:  # noqa: BLE001, S112 - multiaddr raises many types on junk
                continue
            if dialable(addr):
                addrs.append(addr)
        out.append(PeerInfo(peer, addrs))
    return out
