"""Who serves which model: DHT provider records and signed gossipsub offers.

Wire formats: docs/protocols.md#offers-gossip-and-dht.

Two channels, because neither is enough alone:

- **DHT provider records** (py-libp2p's Kademlia, its wire protocol and record
  store) answer "who serves model X?" for a node that just joined and heard no
  gossip. We do not run KadDHT's own maintenance service: it refreshes the
  routing table the moment it starts, and 50 nodes doing that in one process
  saturate the loop (docs/libp2p-traps.md#dht-refresh-storm). Instead routing
  tables are seeded from connections (the DHT does not learn them itself:
  docs/libp2p-traps.md#dht-routing-table-not-fed), provider records are
  re-announced on our own schedule, and lookups are our own single iterative
  walk: py-libp2p's ``find_providers`` first walks to the closest peers and
  only then asks them for providers, two walks where one suffices.
- **Offers on gossipsub** carry price and load, signed by the provider. The
  topic validator is :meth:`OfferBook.consider`, so forged, stale, replayed
  and oversized offers are neither kept nor relayed. Gossip can drop
  messages (docs/libp2p-traps.md#gossip-drops), so offers are re-announced
  every period and at once on change, and consumers confirm with a status
  call before trusting one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

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
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from p2pnode.p2p.host import dials_peer, short
from p2pnode.protocols import offers
from p2pnode.protocols.stream import close_quietly, reset_quietly
from p2pnode.protocols.wire import encode_frame

# trio.TaskStatus exists, but the trio-stubs that py-libp2p pulls in (trio-typing)
# predate it and shadow trio's own types for mypy.
TaskStatus = Any


logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Discovery settings; defaults are for a network of tens to thousands of nodes."""

    offers: offers.Config = field(default_factory=offers.Config)
    # Gossipsub heartbeat: go-libp2p uses 1 s, py-libp2p defaults to 120 s,
    # which leaves a fresh mesh unformed for two minutes
    # (docs/libp2p-traps.md#gossip-drops).
    heartbeat_s: float = 1.0
    # Mesh degree D and its bounds, as go-libp2p's defaults.
    mesh_degree: int = 6
    mesh_low: int = 4
    mesh_high: int = 12
    # After start, offers go out at these delays before settling on
    # offers.period_s: a joining node's mesh forms within ~1-3 heartbeats,
    # and an offer published before it would reach nobody; a network that
    # starts together keeps forming for several seconds.
    fast_start_s: tuple[float, ...] = (0.5, 1.0, 1.0, 2.0, 2.0, 2.0)
    # Kademlia lookup: peers asked at once, and how long one may take.
    lookup_alpha: int = 3
    lookup_query_timeout: float = 2.0
    # Provider records live 24 h in py-libp2p stores; re-announce well inside.
    reprovide_s: float = 3600.0
    # Records are also re-placed when the routing table has doubled (the
    # closest peers have changed), but not more often than this: a network
    # that is still filling would otherwise cause a walk per joiner, and each
    # walk dials peers (handshakes on both sides).
    reprovide_min_s: float = 5.0
    # How often expired offers and provider records are swept.
    sweep_s: float = 2.0
    # Keys this node holds provider records for (a model each, the relay
    # key): anyone may ADD_PROVIDER under any key, so the table is bounded.
    max_record_keys: int = 4096


def _replay_heartbeats(cfg: Config) -> int:
    return math.ceil(cfg.offers.period_s / cfg.heartbeat_s) + 2


def dht_key(model_id: str) -> bytes:
    """The DHT key of a model: sha256 of ``p2pnode/model/<id>`` (the chain names
    models by ``chain/client.py:model_key``, a keccak: another key, another place).

    See docs/libp2p-traps.md#dht-keys-from-text.
    """
    return hashlib.sha256(f"p2pnode/model/{model_id}".encode()).digest()


RELAY_KEY = hashlib.sha256(b"p2pnode/relay/circuit-v2").digest()
# How long closing a DHT stream may take when shielded from cancellation.
CLOSE_S = 5.0
"""Nodes that offer the relay service put a provider record under this key."""


def verify_peer_signature(peer_id: str, payload: bytes, signature: bytes) -> bool:
    """Whether the key embedded in an Ed25519/secp256k1 peer ID signed ``payload``."""
    try:
        key = ID.from_base58(peer_id).extract_public_key()
    except ValueError:
        return False
    if key is None:  # RSA peer IDs hash their key; we do not accept them here
        return False
    try:
        return bool(key.verify(payload, signature))
    except ValueError:
        return False


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


OfferSource = Callable[[], offers.Offer | None]
"""Returns this node's current offer (unsigned; seq and time are set here), or None."""


def new_book(cfg: offers.Config | None = None) -> offers.OfferBook:
    """An offer book that checks offers' signatures and addresses as gossip's does."""
    return offers.OfferBook(cfg or offers.Config(), verify_peer_signature, dials_peer)


class Discovery:
    """One node's discovery: its DHT, its gossip, its OfferBook. Use :meth:`run`."""

    def __init__(self, host: IHost, cfg: Config, own_offer: OfferSource) -> None:
        self.host = host
        self.cfg = cfg
        self.peer_id = str(host.get_id())
        self._own_offer = own_offer
        self.book = new_book(cfg.offers)
        self.dht = KadDHT(host, DHTMode.SERVER, enable_random_walk=False)
        _bound_provider_store(self.dht, self.book, cfg.max_record_keys)
        # py-libp2p 0.8.1 answers DHT streams in 12 handler slots shared by
        # every peer, each reading with no time bound: 12 idle streams from
        # one peer shut the node out of the DHT (found by the fuzzer). Its
        # streams go through a handler that bounds both
        # (docs/libp2p-traps.md#dht-inbound-slots).
        self._kad_streams: dict[ID, int] = {}
        host.set_stream_handler(KAD_PROTOCOL_ID, self._serve_kad)
        self.router = GossipSub(
            protocols=[PROTOCOL_ID_V11],
            degree=cfg.mesh_degree,
            degree_low=cfg.mesh_low,
            degree_high=cfg.mesh_high,
            heartbeat_interval=cfg.heartbeat_s,  # type: ignore[arg-type]  # annotated int, used as seconds
            heartbeat_initial_delay=0.1,
            # py-libp2p replays the messages of the last gossip_window
            # heartbeats to every peer that subscribes; spanning one offer
            # period means a node that joins hears every provider's latest
            # offer at once instead of at its next re-announcement.
            gossip_window=_replay_heartbeats(cfg),
            gossip_history=_replay_heartbeats(cfg),
        )
        self.pubsub = Pubsub(host, self.router, strict_signing=True)
        # py-libp2p 0.8.1's pubsub handler lets a protobuf DecodeError escape
        # (one junk RPC from any peer ended the node; found by the fuzzer):
        # its streams go through a handler that ends only that stream
        # (docs/libp2p-traps.md#pubsub-decodeerror).
        for protocol in self.router.get_protocols():
            host.set_stream_handler(protocol, self._serve_pubsub)
        self.pubsub.set_topic_validator(offers.TOPIC, self._validate, False)
        # Sequence numbers start at the wall clock (ms) so a restarted
        # provider's offers still count as newer than its old ones.
        self._seq = int(time.time() * 1000)
        self._changed = trio.Event()
        self.current_offer = b""  # signed body of the last offer published
        self._provided: set[str] = set()
        self._provided_addrs: tuple[str, ...] = ()
        self._relaying = False
        self._provided_at_size = 0
        self._provided_at = -float("inf")
        self._new_peers: trio.MemorySendChannel[ID]
        self._new_peers, self._new_peers_rx = trio.open_memory_channel[ID](256)
        host.get_network().register_notifee(_ConnectionWatcher(self._peer_connected))

    # --- running ---------------------------------------------------------

    async def run(self, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Run gossip, the routing-table feeder, announcements and sweeps until cancelled."""
        async with (
            background_trio_service(self.pubsub),
            background_trio_service(self.router),
            trio.open_nursery() as nursery,
        ):
            await self.pubsub.wait_until_ready()
            subscription = await self.pubsub.subscribe(offers.TOPIC)
            nursery.start_soon(self._drain, subscription)
            nursery.start_soon(self._feed_routing_table)
            nursery.start_soon(self._announce)
            nursery.start_soon(self._sweep)
            for peer in self.host.get_connected_peers():
                self._peer_connected(peer)
            task_status.started()
            await trio.sleep_forever()

    def offer_changed(self) -> None:
        """Tell discovery this node's offer changed: it is re-announced at once."""
        self._changed.set()

    # --- gossip ------------------------------------------------------------

    async def _serve_pubsub(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            await self.pubsub.stream_handler(stream)
        except (DecodeError, BaseLibp2pError, ValueError) as exc:
            logger.debug("gossip stream of %s broke: %s", short(peer), exc)
            await reset_quietly(stream)
            self.pubsub._handle_dead_peer(peer)
        except Exception:
            logger.exception("gossip stream of %s failed (a bug in pubsub or ours)", short(peer))
            await reset_quietly(stream)
            self.pubsub._handle_dead_peer(peer)

    async def _serve_kad(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        held = self._kad_streams.get(peer, 0)
        if held >= KAD_STREAMS_PER_PEER:
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

    def _validate(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        # Runs for every offer before it is delivered or relayed, inside
        # py-libp2p's pubsub task: an exception escaping here ends pubsub and
        # with it the node. Anything the book does not sort into a verdict is
        # our bug: logged as such, and the message is dropped.
        try:
            return self._judge(forwarder, msg)
        except Exception:
            logger.exception("offer validator failed (a bug): message from %s dropped", forwarder)
            return False

    def _judge(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        # Pubsub's strict signing has already checked that from_id signed the message.
        try:
            source = str(ID(msg.from_id))
        except ValueError:
            return False
        verdict = self.book.consider(msg.data, source=source, now=time.time())
        if verdict is offers.Verdict.ACCEPTED:
            held = self.book.get(source)
            assert held is not None
            self.cache_provider_records(held)
        if not verdict.relay:
            logger.debug("offer from %s via %s: %s", short(source), short(forwarder), verdict.value)
        return verdict.relay

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

    def _drop_provider_records(self, offer: offers.Offer) -> None:
        for model in offer.models:
            held = self.dht.provider_store.providers.get(dht_key(model.model_id), {})
            held.pop(offer.peer_id, None)

    async def _drain(self, subscription: object) -> None:
        # The validator already stored what it accepted; the subscription
        # queue only needs emptying so pubsub never blocks on it.
        get = subscription.get  # type: ignore[attr-defined]
        while True:
            await get()

    async def _announce(self) -> None:
        delays = list(self.cfg.fast_start_s)
        while True:
            await self.publish_offer()
            wait = delays.pop(0) if delays else self.cfg.offers.period_s
            with trio.move_on_after(wait):
                await self._changed.wait()
            self._changed = trio.Event()

    async def publish_offer(self) -> offers.Offer | None:
        """Sign and publish this node's current offer; provide new models in the DHT."""
        unsigned = self._own_offer()
        if unsigned is None:
            return None
        self._seq = max(self._seq + 1, int(time.time() * 1000))
        offer = replace(unsigned, peer_id=self.peer_id, seq=self._seq, timestamp=time.time())
        offer = replace(offer, signature=self.host.get_private_key().sign(offer.signing_bytes()))
        self.current_offer = offers.GOSSIP_CODEC.encode_body(offer)
        await self.pubsub.publish(offers.TOPIC, self.current_offer)
        new = {m.model_id for m in offer.models} - self._provided
        # New addresses (a private node's relayed ones) make the records stale.
        moved = offer.addrs != self._provided_addrs
        if new or moved or self._should_reprovide():
            self._provided |= new
            self._provided_addrs = offer.addrs
            for model_id in sorted(self._provided):
                await self._provide(model_id)
        return offer

    async def _provide(self, model_id: str) -> None:
        await self._provide_key(dht_key(model_id), model_id)

    async def provide_relay(self) -> None:
        """Announce in the DHT that this node relays (and keep announcing it)."""
        self._relaying = True
        await self._provide_key(RELAY_KEY, "the relay service")

    async def find_relays(self) -> list[str]:
        """Full multiaddrs of nodes that announced the relay service (one walk)."""
        found, _ = await self._walk(RELAY_KEY, stop_when_found=True)
        out: list[str] = []
        # Records are unverified (anyone can name anyone): try a random few,
        # so that a flood of fake relays cannot keep us busy or pick our relay.
        for peer in _RANDOM.sample(sorted(found), min(len(found), MAX_DHT_CANDIDATES)):
            pid = ID.from_base58(peer)
            if pid == self.host.get_id():
                continue
            out.extend(f"{addr}/p2p/{peer}" for addr in self._known_addrs(pid)[:1])
        return out

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
        offer = self._own_offer()
        if offer is not None and offer.addrs:
            return [Multiaddr(a) for a in offer.addrs]
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

    async def _sweep(self) -> None:
        while True:
            await trio.sleep(self.cfg.sweep_s)
            for offer in self.book.expire(time.time()):
                logger.info("offer of %s expired", short(offer.peer_id))
                self._drop_provider_records(offer)
            self.dht.provider_store.cleanup_expired()
            due = trio.current_time() - self._provided_at >= self.cfg.reprovide_s
            if (self._provided or self._relaying) and (due or self._should_reprovide()):
                for model_id in sorted(self._provided):
                    await self._provide(model_id)
                if self._relaying:
                    await self._provide_key(RELAY_KEY, "the relay service")

    # --- DHT -----------------------------------------------------------------

    def reattach(self, peer: ID) -> None:
        """Re-open gossip with ``peer`` if its stream was on a connection since closed.

        After a relayed connection is retired for a direct one, py-libp2p's
        pubsub still holds its outbound stream on the closed connection (it
        notices only at its next write, and drops a peer only when the last
        connection goes). Handing it the peer as dead makes it open a new
        stream on the live connection at once.
        """
        stream = self.pubsub.peers.get(peer)
        conn = getattr(stream, "muxed_conn", None) if stream is not None else None
        if conn is not None and conn.is_closed:
            self.pubsub._handle_dead_peer(peer)

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

    async def find_providers(self, model_id: str) -> list[str]:
        """Peer IDs with a provider record for ``model_id``, from one iterative walk.

        Records this node holds itself count too. Like any DHT lookup the
        answer may be incomplete (docs/libp2p-traps.md#dht-lookups-are-incomplete);
        gossip fills the rest.
        """
        found: set[str] = set()
        # A walk is bounded in rounds by k, but peers may answer slowly round
        # after round (each up to the query timeout): bound the whole lookup.
        with trio.move_on_after(self.cfg.lookup_query_timeout * _MAX_WALK_ROUNDS):
            found, _ = await self._walk(dht_key(model_id), stop_when_found=True)
        return sorted(found)

    async def _walk(self, key: bytes, *, stop_when_found: bool) -> tuple[set[str], list[ID]]:
        """Iterative GET_PROVIDERS walk toward ``key``.

        Asks the ``lookup_alpha`` closest known peers at once, learns closer
        peers from their answers, and stops when the k closest peers known
        have all been asked or, with ``stop_when_found``, after the first
        round that names a provider.
        Returns the providers found and the peers that answered, closest
        first. A peer that fails or is slow is skipped, not retried.
        """
        store = self.dht.provider_store
        found = {str(p.peer_id) for p in store.get_providers(key)}
        me = self.host.get_id()
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

            async def ask(peer: ID, learned: list[ID] = learned) -> None:
                asked.add(peer)
                with trio.move_on_after(self.cfg.lookup_query_timeout):
                    reply = await self._get_providers(peer, key)
                    if reply is None:
                        return
                    answered.add(peer)
                    providers, closer = reply
                    # Not kept in our own store: we would hand unverified
                    # records on to whoever asks us.
                    found.update(str(info.peer_id) for info in providers)
                    learned.extend(closer)

            async with trio.open_nursery() as nursery:
                for peer in batch:
                    nursery.start_soon(ask, peer)
            known = set(candidates)
            candidates = sort_peer_ids_by_distance(
                key, candidates + [p for p in learned if p not in known and p != me]
            )
            # Every node caches the providers it has verified offers from, so
            # the first peer that names any usually names them all: stop
            # there (gossip fills in what it missed:
            # docs/libp2p-traps.md#dht-lookups-are-incomplete).
            if stop_when_found and found:
                break
            # Kademlia's end: the k closest peers known have all been asked.
            # Stopping at the alpha closest would settle for a local minimum
            # on sparse routing tables, and records would land off target.
            if all(p in asked for p in candidates[:BUCKET_SIZE]):
                break
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
        providers = _peer_infos(response.providerPeers, _MAX_PEERS_PER_ANSWER)
        closer = _peer_infos(response.closerPeers, _MAX_PEERS_PER_ANSWER)
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


def _peer_infos(protos: Iterable[kad_pb.Message.Peer], limit: int) -> list[PeerInfo]:
    """The well-formed peers of a DHT answer (at most ``limit``); junk is skipped."""
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
            except Exception:  # noqa: BLE001, S112 - multiaddr raises many types on junk
                continue
            if _has(addr, "ip4") or _has(addr, "ip6"):
                addrs.append(addr)
        out.append(PeerInfo(peer, addrs))
    return out


def _has(addr: Multiaddr, proto: str) -> bool:
    try:
        return addr.value_for_protocol(proto) is not None
    except Exception:  # noqa: BLE001 - ProtocolLookupError when absent
        return False
