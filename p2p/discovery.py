"""Who serves which model: signed gossipsub offers, and DHT provider records.

Wire formats: docs/protocols.md#offers-gossip-and-dht.

Two channels, because neither is enough alone:

- **DHT provider records** (``p2p/kademlia.py``) answer "who serves model
  X?" for a node that just joined and heard no gossip.
- **Offers on gossipsub** (here) carry price and load, signed by the
  provider. The topic validator is :meth:`OfferBook.consider`, so forged,
  stale, replayed and oversized offers are neither kept nor relayed. Gossip
  can drop messages (docs/libp2p-traps.md#gossip-drops), so offers are
  re-announced every period and at once on change, and consumers confirm
  with a status call before trusting one. A verified offer also stands for
  its provider's DHT records, which this node then holds and hands out.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final

import trio
from google.protobuf.message import DecodeError
from libp2p.abc import IHost, INetStream
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.pubsub import gossipsub as _gossipsub_module
from libp2p.pubsub import pubsub as _pubsub_module
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.utils import maybe_consume_signed_record
from libp2p.tools.anyio_service import background_trio_service

from p2pnode.p2p.host import dials_peer, short
from p2pnode.p2p.kademlia import MAX_DHT_CANDIDATES, RELAY_KEY, Kademlia, dht_key
from p2pnode.protocols import offers
from p2pnode.protocols.stream import reset_quietly

# trio.TaskStatus exists, but the trio-stubs that py-libp2p pulls in (trio-typing)
# predate it and shadow trio's own types for mypy.
TaskStatus = Any


logger = logging.getLogger(__name__)

__all__ = [
    "MAX_DHT_CANDIDATES",
    "RELAY_KEY",
    "Config",
    "Discovery",
    "dht_key",
    "consume_record_once",
    "new_book",
    "own_record",
    "verify_peer_signature",
]


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
    # After start, offers may go out at these delays before settling on
    # offers.period_s. None by default: each peer that subscribes later is
    # sent the newest offers at once (OfferGossip), and a neighbour that was
    # there first hears through the mesh or the heartbeat's IHAVE. Early
    # repeats (six in the first 8.5 s, before) kept a 50-node network busy
    # for seconds after start-up (docs/performance.md#start-up).
    fast_start_s: tuple[float, ...] = ()
    # Kademlia lookup: peers asked at once, and how long one may take.
    lookup_alpha: int = 3
    lookup_query_timeout: float = 2.0
    # Provider records live 24 h in py-libp2p stores; re-announce well inside.
    reprovide_s: float = 3600.0
    # Records are also re-placed when the routing table has doubled (the
    # closest peers have changed), but not more often than this: a network
    # that is still filling would otherwise cause a walk per joiner, and each
    # walk dials peers (handshakes on both sides). Every node that holds a
    # provider's offer answers for its records anyway
    # (Kademlia.cache_provider_records), so moving them can wait: at 5 s,
    # the walks of a starting 50-node network opened ~190 connections at
    # once and held the loop busy for seconds (docs/performance.md#start-up).
    reprovide_min_s: float = 60.0
    # How often expired offers and provider records are swept.
    sweep_s: float = 2.0
    # Keys this node holds provider records for (a model each, the relay
    # key): anyone may ADD_PROVIDER under any key, so the table is bounded.
    max_record_keys: int = 4096


def _replay_heartbeats(cfg: Config) -> int:
    return math.ceil(cfg.offers.period_s / cfg.heartbeat_s) + 2


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


# py-libp2p 0.8.1 puts this node's signed peer record in every pubsub RPC it
# sends, and rebuilds it for each one (its listen addresses as multiaddrs,
# then the cached record's, to compare them); it checks the record in every
# RPC it reads (twice when the RPC has a control part): an Ed25519
# verification, multiaddr parsing and an address-book rewrite per RPC. At
# 200 nodes on two cores that was ~15% of each busy loop after start-up
# (docs/libp2p-traps.md#a-signed-peer-record-on-every-rpc). A sent record is
# reused for a second while it is still the host's record (identify issues a
# newer one when the addresses change, and a peer holding that one refuses
# an RPC with the older); a received one is checked again only when it
# changes, or after ten minutes, which keeps the address book's two-hour
# TTL fresh as the library's every-RPC refresh did.
_RECORD_REUSE_S: Final = 1.0
_RECORD_RECHECK_S: Final = 600.0
# Peers whose last checked record a host remembers, least recently seen
# forgotten first; a digest each, as a record may be as large as an RPC.
_RECORDS_KEPT: Final = 4096
_sent_records: weakref.WeakKeyDictionary[IHost, tuple[float, object, bytes]] = (
    weakref.WeakKeyDictionary()
)
_checked_records: weakref.WeakKeyDictionary[IHost, OrderedDict[ID, tuple[bytes, float]]] = (
    weakref.WeakKeyDictionary()
)


def _fresh(since: float, now: float, limit: float) -> bool:
    # Times are one trio run's clock: one from another run never counts.
    return 0.0 <= now - since < limit


def own_record(host: IHost) -> tuple[bytes, bool]:
    """``env_to_send_in_RPC``, rebuilt at most once a second while the host's record stands."""
    now = trio.current_time()
    held = _sent_records.get(host)
    current = host.get_peerstore().get_local_record()
    if held is not None and held[1] is current and _fresh(held[0], now, _RECORD_REUSE_S):
        return held[2], False
    envelope, new = env_to_send_in_RPC(host)
    _sent_records[host] = (now, host.get_peerstore().get_local_record(), envelope)
    return envelope, new


def consume_record_once(msg: rpc_pb2.RPC, host: IHost, peer_id: ID) -> bool:
    """``maybe_consume_signed_record``, skipped for the record this peer last had accepted.

    The sender is the authenticated peer of the connection, so the same
    bytes from the same peer were checked and stored already. A record the
    library refuses is never remembered.
    """
    if not msg.HasField("senderRecord"):
        return True
    digest = hashlib.blake2b(msg.senderRecord, digest_size=16).digest()
    checked = _checked_records.get(host)
    if checked is None:
        checked = _checked_records[host] = OrderedDict()
    now = trio.current_time()
    held = checked.get(peer_id)
    if held is not None and held[0] == digest and _fresh(held[1], now, _RECORD_RECHECK_S):
        checked.move_to_end(peer_id)
        return True
    if not maybe_consume_signed_record(msg, host, peer_id):
        return False
    checked.pop(peer_id, None)
    checked[peer_id] = (digest, now)
    while len(checked) > _RECORDS_KEPT:
        checked.popitem(last=False)
    return True


for _module in (_pubsub_module, _gossipsub_module):
    _module.env_to_send_in_RPC = own_record  # type: ignore[attr-defined]
    _module.maybe_consume_signed_record = consume_record_once  # type: ignore[attr-defined]


# Verdicts on this node's own offer that mean every peer would refuse it too.
_OWN_OFFER_BROKEN: Final = frozenset(
    {offers.Verdict.INVALID, offers.Verdict.OVERSIZE, offers.Verdict.MALFORMED}
)


class OfferGossip(GossipSub):
    """Gossipsub whose catch-up for a new peer is each sender's newest message, batched.

    py-libp2p 0.8.1 replays every message of its gossip window, one RPC
    each, to every peer that subscribes. An offer supersedes its sender's
    earlier ones, so all but the newest are rejected as replays on arrival:
    in a starting network, where every DHT walk opens connections and every
    provider re-announces quickly, that was most of the CPU after start-up
    (docs/libp2p-traps.md#replay-on-subscribe).

    A peer gets the same catch-up when it first enters our mesh for the
    topic: gossipsub forwards only to mesh peers, so a peer that subscribed
    before we held an offer and was grafted after we forwarded it heard of
    it only at the sender's next announcement (a whole period: 50-node
    simnets over two processes were ready after ~10 s instead of ~1.5 s in
    two runs of three). Once per peer and topic while it stays connected,
    not on every re-graft of the mesh's upkeep: at 200 nodes that extra
    traffic slowed discovery.
    """

    # Topics in which each peer has had its catch-up on entering our mesh.
    _meshed: dict[ID, set[str]]
    # When each message py-libp2p keeps for its equivocation check came, oldest first.
    _equivocation_kept: deque[tuple[float, bytes]]
    # How long it keeps one: twice an offer's maximum age (the node sets its own).
    equivocation_window_s: float = 2 * offers.Config().max_age_s

    def attach(self, pubsub: Pubsub) -> None:
        super().attach(pubsub)
        self._meshed = {}
        self._equivocation_kept = deque()

    def _check_equivocation(self, msg: rpc_pb2.Message) -> bool:
        # py-libp2p keeps every message it sees for this check, whole, and
        # trims the map only past 1,000 per node: at 5 providers announcing
        # every ~10 s that is half an hour of linear growth per node (a soak's
        # memory "leak"; docs/libp2p-traps.md#every-message-kept-for-the-equivocation-check).
        # A copy older than an offer's maximum age is refused as stale
        # anyway, so the map keeps what came within twice that.
        now = trio.current_time()
        kept = self._equivocation_kept
        while kept and kept[0][0] < now - self.equivocation_window_s:
            self.equivocation_detection.pop(kept.popleft()[1], None)
        key = msg.from_id + msg.seqno
        new = key not in self.equivocation_detection
        honest = super()._check_equivocation(msg)
        if new and key in self.equivocation_detection:
            kept.append((now, key))
        return honest

    def _adapt_heartbeat_parameters(self, health: float) -> None:
        # py-libp2p 0.8.1 "adapts" the heartbeat to its mesh-health score
        # (recomputed every 30 s) with bounds written for its 120 s default:
        # from our 1 s it goes to 30 s when health dips below 0.4 and to 60 s
        # below 0.7. The message cache shifts once per heartbeat, so its
        # twelve-heartbeat window then held up to twelve minutes of offers,
        # which catch-ups and IWANT answers sent out: 3,040 offers 300-700 s
        # old, rejected as stale from the seventh minute of a 12-minute
        # soak, and the cache's memory growing with them
        # (docs/libp2p-traps.md#the-adaptive-heartbeat-slows-to-a-minute).
        # The heartbeat stays as configured.
        self.heartbeat_interval = self.heartbeat_interval_base

    def _notify_mesh_peer_added(self, peer_id: ID, topic: str) -> None:
        super()._notify_mesh_peer_added(peer_id, topic)
        topics = self._meshed.setdefault(peer_id, set())
        if self.pubsub is not None and topic not in topics:
            topics.add(topic)
            self.pubsub.manager.run_task(self.send_recent_messages, peer_id, topic)

    def remove_peer(self, peer_id: ID) -> None:
        super().remove_peer(peer_id)
        self._meshed.pop(peer_id, None)

    async def send_recent_messages(self, peer_id: ID, topic: str) -> None:
        pubsub = self.pubsub
        if pubsub is None or peer_id not in pubsub.peers:
            return
        newest: dict[bytes, rpc_pb2.Message] = {}
        for mid in self.mcache.window(topic):
            msg = self.mcache.get(mid)
            if msg is None:
                continue
            held = newest.get(msg.from_id)
            if held is None or msg.seqno > held.seqno:  # 8-byte big-endian counters
                newest[msg.from_id] = msg
        envelope = own_record(pubsub.host)[0]
        # Written directly, as py-libp2p's own catch-up and flush do (the
        # peer's send queue may not exist yet: it drops what it cannot
        # queue). Each RPC stays within one yamux frame, so a write of
        # another task on the same stream cannot come between its pieces.
        batch: list[rpc_pb2.Message] = []
        size = 0
        for msg in [*newest.values(), None]:
            if batch and (msg is None or size + msg.ByteSize() > _CATCH_UP_BYTES):
                rpc = rpc_pb2.RPC(publish=batch)
                rpc.senderRecord = envelope
                try:
                    await pubsub.write_msg(pubsub.peers[peer_id], rpc)
                except Exception as exc:  # noqa: BLE001 - as the method it replaces: a failed write ends nothing
                    logger.debug("catch-up for %s failed: %s", short(peer_id), exc)
                    return
                batch, size = [], 0
            if msg is not None:
                batch.append(msg)
                size += msg.ByteSize()


_JITTER = secrets.SystemRandom()
_PENDING_TTL_S = 2.0
# Bytes of offers per catch-up RPC: well inside one yamux frame (64 KiB),
# with room for the sender record; a single offer is at most 8 KiB.
_CATCH_UP_BYTES = 32 * 1024


OfferSource = Callable[[], offers.Offer | None]
"""Returns this node's current offer (unsigned; seq and time are set here), or None."""


def new_book(cfg: offers.Config | None = None) -> offers.OfferBook:
    """An offer book that checks offers' signatures and addresses as gossip's does."""
    return offers.OfferBook(cfg or offers.Config(), verify_peer_signature, dials_peer)


class Discovery:
    """One node's discovery: its gossip, its OfferBook, its DHT. Use :meth:`run`."""

    def __init__(self, host: IHost, cfg: Config, own_offer: OfferSource) -> None:
        self.host = host
        self.cfg = cfg
        self.peer_id = str(host.get_id())
        self._own_offer = own_offer
        self.book = new_book(cfg.offers)
        self.kademlia = Kademlia(host, cfg, self.book, self._offer_addrs)
        self.router = OfferGossip(
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
            # py-libp2p queues each message for a connected peer whose
            # subscription it has not seen, for 30 s, and sends the queue when
            # it has: offers up to 30 s old, past their maximum age, rejected
            # as stale and counted by the scorer against the honest sender
            # (11,318 in a 30-minute soak). A peer that subscribes gets each
            # sender's newest offer anyway (OfferGossip), so the queue only
            # needs to bridge the moments of a connection's set-up.
            pending_messages_ttl=_PENDING_TTL_S,
        )
        self.router.equivocation_window_s = 2 * cfg.offers.max_age_s
        self.pubsub = Pubsub(host, self.router, strict_signing=True)
        # Message ids are the sender and its counter, which py-libp2p starts
        # at the wall clock in seconds: a provider announcing on every load
        # change runs ahead of it, and restarted, numbered its new offers as
        # its old ones, which every peer then dropped as seen for two minutes
        # (docs/libp2p-traps.md#a-restarted-peer-reuses-its-message-ids).
        # Nanoseconds, as go-libp2p starts it.
        self.pubsub.counter = time.time_ns()
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

    def _offer_addrs(self) -> tuple[str, ...]:
        offer = self._own_offer()
        return offer.addrs if offer is not None else ()

    # --- running ---------------------------------------------------------

    async def run(self, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Run gossip, the DHT's routing-table feeder, announcements and sweeps until cancelled."""
        async with (
            background_trio_service(self.pubsub),
            background_trio_service(self.router),
            trio.open_nursery() as nursery,
        ):
            await self.pubsub.wait_until_ready()
            subscription = await self.pubsub.subscribe(offers.TOPIC)
            nursery.start_soon(self._drain, subscription)
            await nursery.start(self.kademlia.run)
            nursery.start_soon(self._announce)
            nursery.start_soon(self._sweep)
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
            self.kademlia.cache_provider_records(held)
        if source == self.peer_id and verdict in _OWN_OFFER_BROKEN:
            # Our own offer goes through these checks before pubsub sends it:
            # refused here, it reaches nobody, and nothing else would say so
            # (an old one of ours coming back stale is no news).
            logger.error(
                "this node's own offer was refused (%s): peers would drop it", verdict.value
            )
        elif not verdict.relay:
            logger.debug("offer from %s via %s: %s", short(source), short(forwarder), verdict.value)
        return verdict.relay

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
            # Jittered below the period: providers that started together
            # would otherwise announce together for ever, a burst of work
            # on every node each period.
            period = self.cfg.offers.period_s * _JITTER.uniform(0.8, 1.0)
            wait = delays.pop(0) if delays else period
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
        await self.kademlia.provide_models((m.model_id for m in offer.models), offer.addrs)
        return offer

    async def _sweep(self) -> None:
        while True:
            await trio.sleep(self.cfg.sweep_s)
            for offer in self.book.expire(time.time()):
                logger.info("offer of %s expired", short(offer.peer_id))
                self.kademlia.drop_provider_records(offer)
            due = trio.current_time() - self.kademlia.provided_at >= self.cfg.reprovide_s
            await self.kademlia.sweep(due)

    # --- delegated to the DHT ------------------------------------------------

    async def find_providers(self, model_id: str) -> list[str]:
        """Peer IDs with a provider record for ``model_id`` (``p2p/kademlia.py``)."""
        return await self.kademlia.find_providers(model_id)

    async def find_relays(self) -> list[str]:
        """Full multiaddrs of nodes that announced the relay service."""
        return await self.kademlia.find_relays()

    async def provide_relay(self) -> None:
        """Announce in the DHT that this node relays (and keep announcing it)."""
        await self.kademlia.provide_relay()

    # --- connections -----------------------------------------------------------

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
