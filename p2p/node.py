"""The node: one libp2p host and the services that run on it (docs/architecture.md#the-node).

``open_node`` is the only way to get a :class:`Node`; ``p2pnode start``,
simnet and the tests all use it, with the same arguments. Everything the node
runs lives in the nursery that ``open_node`` owns: leaving the ``async with``
stops it all, cancellation included.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import PeerStoreError

from p2pnode import __version__
from p2pnode.errors import (
    BrokenStreamError,
    ConfigError,
    EngineError,
    NetworkError,
    RemoteProtocolError,
)
from p2pnode.inference.engine import Engine, Params, Request, tokens_per_second
from p2pnode.p2p import consumer as consumerlib
from p2pnode.p2p import control, nat
from p2pnode.p2p import discovery as discoverylib
from p2pnode.p2p import host as hostlib
from p2pnode.p2p import market as marketlib
from p2pnode.p2p import provider as providerlib
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p import reputation as reputationlib
from p2pnode.p2p.host import short
from p2pnode.protocols import dialback, infer, offers, session, status
from p2pnode.protocols.status import service as status_service
from p2pnode.protocols.stream import reset_quietly
from p2pnode.scopes import single_errors_ungrouped

logger = logging.getLogger(__name__)
_RANDOM = secrets.SystemRandom()

# How long addresses learnt from an offer stay in the peerstore (offers are
# re-sent every ~10 s; a provider silent for 35 s is forgotten anyway).
OFFER_ADDR_TTL_S = 600
# The protocols whose streams a relayed connection must finish before it is
# closed for a direct one.
OWN_PROTOCOLS = frozenset(
    {session.PROTOCOL_ID, infer.PROTOCOL_ID, status.PROTOCOL_ID, dialback.PROTOCOL_ID}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """Everything a node needs to know at start; composed of subsystem configs."""

    host: hostlib.Config = field(default_factory=hostlib.Config)
    status: status.Config = field(default_factory=status.Config)
    # None: no DHT, no gossip (a throwaway client such as `p2pnode status`).
    discovery: discoverylib.Config | None = field(default_factory=discoverylib.Config)
    # Models this node announces. The inference engines fill this from what
    # they really serve; a config may announce models for testing discovery.
    models: tuple[offers.ModelOffer, ...] = ()
    # Wallet address carried in offers (None in free mode without a wallet).
    wallet: str | None = None
    # Unix socket for `p2pnode offers` / `peers` (None: no local control).
    control_socket: Path | None = None
    # Full multiaddrs (with /p2p/<id>) of peers to join the network through.
    bootstrap: tuple[str, ...] = ()
    # Bound on the first attempt to reach each bootstrap peer at start; the
    # node starts regardless and keeps trying in the background.
    bootstrap_timeout: float = 5.0
    # How often lost bootstrap peers are tried again. Seconds, not faster:
    # a bootstrap peer that is down should not cost the network much.
    bootstrap_retry_s: float = 30.0
    # At start, each served model generates this many tokens once so that
    # offers carry a measured tokens/s (0 skips it; ~0.7 s for SmolLM2).
    measure_tokens: int = 32
    # Sessions and requests this node serves (when it has engines) ...
    provider: providerlib.Config = field(default_factory=providerlib.Config)
    # ... and those it asks of others.
    consumer: consumerlib.Config = field(default_factory=consumerlib.Config)
    # The chain and this node's account on it (None: free mode, nobody pays).
    market: marketlib.Config | None = None
    dialback: dialback.Config = field(default_factory=dialback.Config)
    # "auto": measured by dial-back; "public"/"private": as configured.
    reachability: str = "auto"
    # The first check waits for the node's start-up (connections, identify,
    # gossip: ~10 s of CPU in a 50-node simnet) to be over; then it repeats,
    # since addresses and NATs change.
    reachability_first_s: float = 30.0
    reachability_every_s: float = 300.0
    # Circuit relay v2: the service this node offers others, and the relays a
    # private node reserves on.
    relay: relaylib.Config = field(default_factory=relaylib.Config)
    relay_check_s: float = 30.0
    # What the node remembers of peers' misbehaviour, and when it bans.
    reputation: reputationlib.Config = field(default_factory=reputationlib.Config)
    # Inbound streams of our protocols running at once, per peer and overall;
    # a stream beyond is reset on arrival. A consumer runs a few requests at
    # once; hundreds from one peer are an attack.
    max_streams_per_peer: int = 64
    max_streams: int = 1024


class Node:
    """A running p2pnode. Obtain one from :func:`open_node`.

    Safe to use from any task of the trio run that opened it, until the
    ``async with`` exits.
    """

    def __init__(self, config: NodeConfig, host: IHost, engines: Sequence[Engine] = ()) -> None:
        self.config = config
        self.host = host
        self.engines = list(engines)
        self.peer_id: str = str(host.get_id())
        self.addrs: list[str] = []
        self.started_at = trio.current_time()
        # Every peer's misbehaviour, as this node saw it (bounded, decaying).
        self.reputation = reputationlib.Reputation(config.reputation)
        # Inbound streams of ours running now, per peer.
        self._streams: collections.Counter[str] = collections.Counter()
        self.refused_streams = 0
        # Served models first (tokens/s measured at start), then any announced
        # by configuration only.
        self.models: tuple[offers.ModelOffer, ...] = (
            tuple(
                offers.ModelOffer(
                    model_id=m.model_id, gguf_sha256=m.gguf_sha256, context_length=m.context_length
                )
                for engine in self.engines
                for m in engine.models()
            )
            + config.models
        )
        self.discovery = (
            discoverylib.Discovery(host, config.discovery, self._offer)
            if config.discovery is not None
            else None
        )
        # Without discovery the book stays empty, but it is one book.
        self._book = (
            self.discovery.book
            if self.discovery is not None
            else offers.OfferBook(
                offers.Config(), discoverylib.verify_peer_signature, hostlib.dials_peer
            )
        )
        market = config.market
        self.ledger = marketlib.Ledger(market.sessions_db) if market is not None else None
        self.provider_market = (
            marketlib.ProviderMarket(market, self.ledger)
            if market is not None and self.ledger is not None and self.engines
            else None
        )
        self.consumer_market = (
            marketlib.ConsumerMarket(market, self.ledger)
            if market is not None and self.ledger is not None
            else None
        )
        self.provider = (
            providerlib.Provider(
                config.provider,
                self.engines,
                host.get_private_key(),
                self.engine_for,
                self.provider_market,
                self.reputation,
            )
            if self.engines
            else None
        )
        self.consumer = consumerlib.Consumer(
            self, config.consumer, self.reputation, self.consumer_market
        )
        # Relay messages that break the protocol count against their sender;
        # a banned peer's relay streams are turned away like any other.
        self.relay = relaylib.Relay(
            host,
            config.relay,
            misbehaved=lambda peer: self.reputation.record(
                peer, reputationlib.Offence.PROTOCOL, trio.current_time()
            ),
            banned=lambda peer: self.reputation.banned(peer, trio.current_time()),
        )
        # Dial-backs this node does for others, within its budgets.
        self.dialback_helper = nat.Helper(config.dialback)
        self.direct_addrs: list[str] = []
        # open_node's nursery, for work a call starts and that outlives it.
        self._nursery: trio.Nursery | None = None
        self.reachability = nat.Verdict()
        if config.reachability != "auto":
            self.reachability = nat.Verdict(nat.Reachability(config.reachability), forced=True)

    @property
    def offer_book(self) -> offers.OfferBook:
        """What this node knows of providers (empty if discovery is off)."""
        return self._book

    def _offer(self) -> offers.Offer | None:
        # Unsigned: discovery sets peer_id, seq, timestamp and the signature.
        if not self.models:
            return None
        load = self.load()
        return offers.Offer(
            peer_id=self.peer_id,
            addrs=tuple(self.addrs),
            models=self.models,
            slots_free=load.slots_free,
            queue_len=load.queue_len,
            seq=0,
            timestamp=0.0,
            wallet=self.provider_market.address if self.provider_market else self.config.wallet,
        )

    def load(self) -> status.Load:
        """Slots and queue over every engine, right now."""
        return status.Load(
            slots_total=sum(e.slots_total for e in self.engines),
            slots_free=sum(e.slots_free for e in self.engines),
            queue_len=sum(e.queue_len for e in self.engines),
        )

    def engine_for(self, model_id: str) -> Engine | None:
        """The engine that serves ``model_id`` here, if any."""
        for engine in self.engines:
            if any(m.model_id == model_id for m in engine.models()):
                return engine
        return None

    async def measure_engines(self) -> None:
        """Measure each served model's generation speed and announce it.

        Tokens per second of generation proper (first token to last), from a
        short greedy completion; an engine that fails is logged and keeps 0.
        """
        measured = {}
        for engine in self.engines:
            for info in engine.models():
                request = Request(
                    model_id=info.model_id,
                    kind="completion",
                    prompt="The history of the printing press",
                    params=Params(max_tokens=self.config.measure_tokens, temperature=0.0),
                )
                try:
                    measured[info.model_id] = await tokens_per_second(engine, request)
                except EngineError as exc:
                    logger.warning("cannot measure %s: %s", info.model_id, exc)
        self.set_models(
            tuple(
                replace(m, tokens_per_s=measured.get(m.model_id, m.tokens_per_s))
                for m in self.models
            )
        )

    def set_models(self, models: tuple[offers.ModelOffer, ...]) -> None:
        """Change what this node announces; the new offer goes out at once."""
        if self.provider_market is not None:
            models = self.provider_market.offer_terms(models)
        self.models = models
        if self.discovery is not None:
            self.discovery.offer_changed()

    async def find_providers(self, model_id: str) -> list[str]:
        """Peer IDs that serve ``model_id`` according to the DHT (one lookup)."""
        if self.discovery is None:
            return []
        return await self.discovery.find_providers(model_id)

    async def refresh_offer(self, peer: str) -> offers.Offer | None:
        """Ask a provider directly: its signed offer and live load go into the OfferBook.

        The offer is admitted by the same rules as a gossiped one; the load
        it reports now replaces what gossip said. Returns the offer held
        afterwards (None if the peer offers nothing). Raises NetworkError
        or RemoteProtocolError if the peer cannot be asked.
        """
        answer = await self.status_of(peer)
        book = self.offer_book
        now = time.time()
        if answer.offer:
            book.consider(answer.offer, source=peer, now=now)
        load = answer.load
        book.update_load(peer, slots_free=load.slots_free, queue_len=load.queue_len, now=now)
        return book.get(peer)

    async def discover(self, model_id: str) -> list[offers.Offer]:
        """Offers for ``model_id``: the OfferBook, completed from the DHT and the providers.

        Providers the DHT names that gossip has not brought yet are asked
        directly (concurrently, each bounded by the status timeout); one that
        cannot be reached is left out.
        """
        named = await self.find_providers(model_id)
        now = trio.current_time()
        missing = [
            p
            for p in named
            if self.offer_book.get(p) is None and not self.reputation.banned(p, now)
        ]
        # DHT records are anyone's word: ask a bounded few, not every peer named.
        missing = missing[: discoverylib.MAX_DHT_CANDIDATES]

        async def ask(peer: str) -> None:
            try:
                await self.refresh_offer(peer)
            except (NetworkError, RemoteProtocolError) as exc:
                self.reputation.record(peer, reputationlib.Offence.FAILED, trio.current_time())
                logger.info("provider %s named by the DHT did not answer: %s", short(peer), exc)

        async with trio.open_nursery() as nursery:
            for peer in missing:
                nursery.start_soon(ask, peer)
        return self.offer_book.offers(model_id)

    async def generate(
        self,
        request: Request,
        deliver: consumerlib.Deliver,
        *,
        only: Sequence[str] | None = None,
    ) -> consumerlib.Outcome:
        """Run a request here or through the network (see ``p2p/consumer.py``)."""
        return await self.consumer.generate(request, deliver, only=only)

    def list_models(self) -> list[tuple[str, str]]:
        """(model id, "local" or "network"): its own models first, then those on offer."""
        local = [m.model_id for m in self.models if self.engine_for(m.model_id) is not None]
        offered = {m.model_id for o in self.offer_book.offers() for m in o.models} - set(local)
        return [(m, "local") for m in local] + [(m, "network") for m in sorted(offered)]

    async def has_model(self, model_id: str) -> bool:
        """Whether ``model_id`` is served here or on offer; asks the DHT if gossip has not said."""
        if self.engine_for(model_id) is not None or self.offer_book.offers(model_id):
            return True
        return bool(await self.discover(model_id))

    # --- what the node tells others -------------------------------------

    def status_info(self) -> status.StatusResponse:
        """This node's answer to a status request, as of now."""
        kinds = self.relay.connection_counts()
        return status.StatusResponse(
            peer_id=self.peer_id,
            version=__version__,
            addrs=tuple(self.addrs),
            connected_peers=len(self.host.get_connected_peers()),
            uptime_s=round(trio.current_time() - self.started_at, 3),
            models=tuple(
                status.ServedModel(
                    model_id=m.model_id,
                    gguf_sha256=m.gguf_sha256,
                    context_length=m.context_length,
                    tokens_per_s=m.tokens_per_s,
                )
                for m in self.models
            ),
            load=self.load(),
            offer=self.discovery.current_offer if self.discovery is not None else b"",
            reachability=self.reachability.reachability.value,
            relays=tuple(self.relay.reservations),
            direct_connections=kinds["direct"],
            relayed_connections=kinds["relayed"],
            upgraded_connections=self.relay.upgraded,
        )

    def connected_peers(self) -> list[str]:
        """Peer IDs this node has a live connection to."""
        return [str(p) for p in self.host.get_connected_peers()]

    # --- reaching other nodes --------------------------------------------

    async def connect(self, addr: str) -> str:
        """Connect to the peer at a full multiaddr; returns its peer ID.

        Bounded by the host's dial timeout; raises :class:`NetworkError`.
        """
        info = hostlib.parse_peer_addr(addr)
        await hostlib.connect(self.host, info, self.config.host.dial_timeout)
        return str(info.peer_id)

    async def status_of(self, peer: str) -> status.StatusResponse:
        """Ask a peer (a peer ID we can reach, or a full multiaddr) for its status."""
        if peer.startswith("/"):
            peer = await self.connect(peer)
        stream = await self._open_stream(ID.from_base58(peer), status.PROTOCOL_ID)
        return await status_service.request(stream, self.config.status)

    def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer a local control request (see ``p2p/control.py``)."""
        op = request.get("op")
        if op == "offers":
            model = request.get("model")
            if model is not None and not isinstance(model, str):
                return {"error": "model must be a string"}
            now, clock = time.time(), trio.current_time()
            held = self.offer_book.offers(model)
            return {
                "offers": [
                    control.describe_offer(o, now, self.reputation.standing(o.peer_id, clock))
                    for o in held
                ],
                # Paid mode: an offer without a bid is not free but unpayable here.
                "paid": self.consumer_market is not None,
            }
        if op == "peers":
            peerstore = self.host.get_peerstore()
            return {
                "peers": [
                    {
                        "peer_id": str(p),
                        "addrs": [str(a) for a in peerstore.addrs(p)],
                        "connections": [
                            "relayed" if relaylib.is_relayed(c) else "direct"
                            for c in relaylib.connections(self.host, p)
                        ],
                    }
                    for p in self.host.get_connected_peers()
                ]
            }
        if op == "status":
            # JSON carries no bytes; the signed offer is for remote askers.
            answer = self.status_info().to_wire()
            del answer["offer"]
            return answer
        return {"error": f"unknown op {op!r}"}

    async def _open_stream(self, peer_id: ID, protocol: str) -> INetStream:
        timeout = self.config.status.timeout
        circuits = self._learn_addrs(peer_id)
        offer = self.offer_book.get(str(peer_id))
        # Only relayed addresses on offer: the peer is private; go through its relay.
        private = offer is not None and all(relaylib.is_circuit(a) for a in offer.addrs)
        # Live connections only: a circuit the relay cut (its limits) stays
        # listed, closed, until the swarm notices.
        if circuits and private and not relaylib.connections(self.host, peer_id):
            await self.relay.dial(circuits[0])
            if self.relay.cfg.hole_punch and self._nursery is not None:
                # This stream goes through the relay now; later ones go direct
                # if the upgrade works.
                self._nursery.start_soon(self._upgrade, peer_id)
        try:
            with trio.fail_after(timeout):
                return await self.host.new_stream(peer_id, [TProtocol(protocol)])
        except trio.TooSlowError as exc:
            raise NetworkError(
                f"no {protocol} stream to {short(peer_id)} within {timeout:g} s"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - StreamFailure, SwarmException, negotiation errors
            raise NetworkError(f"cannot open {protocol} to {short(peer_id)}: {exc}") from exc

    async def _upgrade(self, peer_id: ID) -> None:
        if await self.relay.upgrade(peer_id, own=OWN_PROTOCOLS) and self.discovery is not None:
            self.discovery.reattach(peer_id)

    async def check_reachability(self, helpers: int = 3) -> nat.Verdict:
        """Ask up to ``helpers`` connected peers to dial this node back; keep the verdict."""
        if self.reachability.forced:
            return self.reachability
        own = nat.dialable(self.addrs)
        answers = []

        async def ask(peer: ID) -> None:
            try:
                stream = await self._open_stream(peer, dialback.PROTOCOL_ID)
                answers.append(await nat.ask(stream, own, self.config.dialback))
            except (NetworkError, RemoteProtocolError) as exc:
                logger.debug("dial-back by %s failed: %s", short(peer), exc)

        async with trio.open_nursery() as nursery:
            # A random few, not the first to connect: peers that rush to
            # connect first cannot decide together what we believe.
            connected = list(self.host.get_connected_peers())
            for peer in _RANDOM.sample(connected, min(helpers, len(connected))):
                nursery.start_soon(ask, peer)
        self.reachability = nat.judge(answers)
        logger.info(
            "reachability: %s (%d helpers)", self.reachability.reachability.value, len(answers)
        )
        return self.reachability

    async def _keep_checking_reachability(self) -> None:
        await trio.sleep(self.config.reachability_first_s)
        while True:
            await self.check_reachability()
            await trio.sleep(self.config.reachability_every_s)

    async def _keep_relayed(self, nursery: trio.Nursery) -> None:
        """While private: hold reservations on the configured relays, advertise through them."""
        while True:
            if self.reachability.reachability is nat.Reachability.PRIVATE:
                for relay_id in list(self.relay.reservations):
                    if ID.from_base58(relay_id) not in self.host.get_connected_peers():
                        logger.warning("relay %s is gone; reserving elsewhere", short(relay_id))
                        self.relay.forget(relay_id)
                discovered: list[str] = []
                short_of = len(self.relay.reservations) < self.relay.cfg.want
                if short_of and self.discovery is not None:
                    configured = {hostlib.parse_peer_addr(a).peer_id for a in self.relay.cfg.relays}
                    discovered = [
                        a
                        for a in await self.discovery.find_relays()
                        if hostlib.parse_peer_addr(a).peer_id not in configured
                    ]
                circuits = await self.relay.reserve_all(nursery, discovered)
                # A private node's own addresses are no use to others.
                addrs = circuits or self.direct_addrs
                if addrs != self.addrs:
                    self.addrs = addrs
                    if self.discovery is not None:
                        self.discovery.offer_changed()
            await trio.sleep(self.config.relay_check_s)

    def _learn_addrs(self, peer_id: ID) -> list[str]:
        """Where a provider listens, from its signed offer, if the peerstore does not know.

        Returns the offer's circuit addresses (to dial through their relay).
        """
        peerstore = self.host.get_peerstore()
        offer = self.offer_book.get(str(peer_id))
        circuits = [a for a in offer.addrs if relaylib.is_circuit(a)] if offer else []
        try:
            if peerstore.addrs(peer_id):
                return circuits
        except PeerStoreError:  # 0.8.1 raises for a peer it has never heard of
            pass
        if offer is None or not offer.addrs:
            return circuits
        addrs = []
        for text in offer.addrs:
            if relaylib.is_circuit(text):
                continue
            with contextlib.suppress(ValueError, ConfigError):
                addrs.append(hostlib.parse_peer_addr(text).addrs[0])
        if addrs:
            peerstore.add_addrs(peer_id, addrs, OFFER_ADDR_TTL_S)
        return circuits

    # --- serving ---------------------------------------------------------

    def _handle(
        self, protocol: str, serve: Callable[[INetStream], Awaitable[None]]
    ) -> Callable[[INetStream], Awaitable[None]]:
        """Wrap a stream handler so that no peer can take the node down.

        This is the boundary that can act on a stream: a protocol violation
        is counted against the peer and logged; a broken stream is routine;
        anything else is our bug, logged with its traceback, and only that
        stream is reset.
        """

        async def handler(stream: INetStream) -> None:
            peer = str(stream.muxed_conn.peer_id)
            now = trio.current_time()
            over = (
                self._streams[peer] >= self.config.max_streams_per_peer
                or sum(self._streams.values()) >= self.config.max_streams
            )
            if over or self.reputation.banned(peer, now):
                # Turned away before a byte is read: a banned or greedy peer
                # costs us one reset.
                self.refused_streams += 1
                await reset_quietly(stream)
                return
            self._streams[peer] += 1
            try:
                await serve(stream)
            except RemoteProtocolError as exc:
                score = self.reputation.record(
                    peer, reputationlib.Offence.PROTOCOL, trio.current_time()
                )
                logger.info(
                    "%s: %s broke the protocol: %s (score %.1f)", protocol, short(peer), exc, score
                )
            except (BrokenStreamError, NetworkError) as exc:
                logger.debug("%s: stream with %s ended: %s", protocol, short(peer), exc)
            except Exception:
                logger.exception("%s: handler failed for %s (a bug)", protocol, short(peer))
                await reset_quietly(stream)
            finally:
                self._streams[peer] -= 1
                if self._streams[peer] <= 0:
                    del self._streams[peer]

        return handler

    async def _serve_dialback(self, stream: INetStream) -> None:
        await self.dialback_helper.serve(stream)

    async def _serve_status(self, stream: INetStream) -> None:
        await status_service.serve(stream, self.status_info, self.config.status)

    async def _settle_at_stop(self) -> None:
        """Close the paid sessions this node opened (a consumer's second transaction)."""
        if self.consumer_market is not None:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 30):
                await self.consumer_market.close_all()
        if self.ledger is not None:
            self.ledger.close()

    async def _keep_bootstrapped(self, peers: list[PeerInfo]) -> None:
        """Reconnect to bootstrap peers we are not connected to, forever."""
        while True:
            await trio.sleep(self.config.bootstrap_retry_s)
            await self._dial_bootstrap(peers)

    async def _dial_bootstrap(self, peers: list[PeerInfo]) -> None:
        connected = set(self.host.get_connected_peers())

        async def dial(info: PeerInfo) -> None:
            try:
                await hostlib.connect(self.host, info, self.config.bootstrap_timeout)
                logger.info("connected to bootstrap peer %s", short(info.peer_id))
            except NetworkError as exc:
                logger.warning("bootstrap peer %s: %s", short(info.peer_id), exc)

        async with trio.open_nursery() as nursery:
            for info in peers:
                if info.peer_id not in connected:
                    nursery.start_soon(dial, info)


@asynccontextmanager
async def open_node(
    config: NodeConfig, *, key_pair: KeyPair, engines: Sequence[Engine] = ()
) -> AsyncIterator[Node]:
    """Start a node and yield it once it listens and has tried its bootstrap peers.

    ``engines`` are served as they are (the caller opened them and closes
    them after). Raises :class:`ConfigError` before yielding if an address
    cannot be listened on or a bootstrap address is malformed. Unreachable bootstrap
    peers do not stop the start: they are logged and retried.
    """
    bootstrap = [hostlib.parse_peer_addr(a) for a in config.bootstrap]
    host = hostlib.build(key_pair, config.host)
    # Discovery registers its handlers and its connection watcher before the
    # host listens, so no connection arrives before gossip can see it.
    node = Node(config, host, engines)
    host.set_stream_handler(
        TProtocol(status.PROTOCOL_ID), node._handle(status.PROTOCOL_ID, node._serve_status)
    )
    host.set_stream_handler(
        TProtocol(dialback.PROTOCOL_ID), node._handle(dialback.PROTOCOL_ID, node._serve_dialback)
    )
    if node.provider is not None:
        for protocol, serve in (
            (session.PROTOCOL_ID, node.provider.serve_session),
            (infer.PROTOCOL_ID, node.provider.serve_infer),
        ):
            host.set_stream_handler(TProtocol(protocol), node._handle(protocol, serve))
    with single_errors_ungrouped():
        async with hostlib.running(host, config.host) as addrs:
            node.addrs = addrs
            node.direct_addrs = list(addrs)
            async with trio.open_nursery() as nursery:
                node._nursery = nursery
                await nursery.start(node.relay.run)
                if config.control_socket is not None:
                    await nursery.start(control.serve, config.control_socket, node._control)
                if node.discovery is not None:
                    await nursery.start(node.discovery.run)
                market_cfg = config.market
                if market_cfg is not None:
                    await marketlib.check_contract(market_cfg.chain)
                if node.provider_market is not None:
                    node.provider_market.served = tuple(m.model_id for m in node.models)
                    node.provider_market.on_bids_changed = lambda: node.set_models(node.models)
                    await node.provider_market.load_bids(list(node.provider_market.served))
                    node.set_models(node.models)
                    nursery.start_soon(node.provider_market.run)
                if node.consumer_market is not None:
                    await node.consumer_market.prepare()
                    nursery.start_soon(node.consumer_market.run)
                if node.engines and config.measure_tokens > 0:
                    nursery.start_soon(node.measure_engines)
                if bootstrap:
                    await node._dial_bootstrap(bootstrap)
                    nursery.start_soon(node._keep_bootstrapped, bootstrap)
                if config.discovery is not None and config.reachability == "auto":
                    nursery.start_soon(node._keep_checking_reachability)
                if node.discovery is not None and config.relay.service:
                    nursery.start_soon(node.discovery.provide_relay)
                if config.reachability != "public":
                    nursery.start_soon(node._keep_relayed, nursery)
                try:
                    yield node
                finally:
                    nursery.cancel_scope.cancel()
                    await node._settle_at_stop()
