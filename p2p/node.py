"""The node: one libp2p host and the services that run on it (docs/architecture.md#the-node).

``open_node`` is the only way to get a :class:`Node`; ``p2pnode start``,
simnet and the tests all use it, with the same arguments. Everything the node
runs lives in the nursery that ``open_node`` owns: leaving the ``async with``
stops it all, cancellation included.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, closing, contextmanager
from functools import partial
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol

from p2pnode import logs
from p2pnode.inference import engine as enginelib
from p2pnode.inference.engine import Engine, Request
from p2pnode.p2p import audit as auditlib
from p2pnode.p2p import consumer as consumerlib
from p2pnode.p2p import control, nat, telemetry, upkeep
from p2pnode.p2p import discovery as discoverylib
from p2pnode.p2p import host as hostlib
from p2pnode.p2p import market as marketlib
from p2pnode.p2p import provider as providerlib
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p import reputation as reputationlib
from p2pnode.p2p.config import NodeConfig
from p2pnode.p2p.dialer import Dialer
from p2pnode.p2p.finder import Finder
from p2pnode.p2p.guard import Serve, StreamGuard
from p2pnode.p2p.offering import Offering
from p2pnode.protocols import dialback, infer, session, status
from p2pnode.protocols.status import service as status_service
from p2pnode.scopes import single_errors_ungrouped

__all__ = ["Node", "NodeConfig", "freeze_startup_heap", "open_node", "startup_heap_frozen"]


class Node:
    """A running p2pnode. Obtain one from :func:`open_node`.

    A composition (docs/architecture.md#the-node): each part receives what
    it uses, and the node is what the shim and the CLI talk to. Safe to use
    from any task of the trio run that opened it, until the ``async with``
    exits.
    """

    def __init__(
        self,
        config: NodeConfig,
        host: IHost,
        engines: Sequence[Engine] = (),
        wallet: marketlib.Wallet | None = None,
    ) -> None:
        self.config = config
        self.host = host
        self.peer_id: str = str(host.get_id())
        self.started_at = trio.current_time()
        self._scope: trio.CancelScope | None = None  # open_node's, once it runs
        # Every peer's misbehaviour, as this node saw it (bounded, decaying).
        self.reputation = reputationlib.Reputation(config.reputation)
        self.guard = StreamGuard(
            self.reputation,
            max_per_peer=config.max_streams_per_peer,
            max_total=config.max_streams,
        )
        self.markets = marketlib.Markets(config.market, wallet, serving=bool(engines))
        self.offering = Offering(
            engines,
            config.models,
            market=self.markets.provider,
            wallet=config.wallet,
            max_tokens_per_s=(config.discovery or discoverylib.Config()).offers.max_tokens_per_s,
        )
        self.discovery = (
            discoverylib.Discovery(
                host, config.discovery, lambda: self.offering.offer(self.peer_id, self.addrs)
            )
            if config.discovery is not None
            else None
        )
        if self.discovery is not None:
            self.offering.changed = self.discovery.offer_changed
        # Without discovery the book stays empty, but it is one book.
        self.offer_book = self.discovery.book if self.discovery else discoverylib.new_book()
        self.relay = relaylib.Relay(host, config.relay, reputation=self.reputation)
        self.dialer = Dialer(
            host,
            self.offer_book,
            self.relay,
            stream_timeout=config.status.timeout,
            dial_timeout=config.host.dial_timeout,
            upgraded=self.discovery.reattach if self.discovery is not None else lambda _p: None,
        )
        self.finder = Finder(
            self.discovery, self.offer_book, self.dialer, self.reputation, config.status
        )
        self.provider = (
            providerlib.Provider(
                config.provider,
                self.offering.engines,
                host.get_private_key(),
                self.offering.engine_for,
                self.markets.provider,
                self.reputation,
            )
            if self.offering.engines
            else None
        )
        self.consumer = consumerlib.Consumer(
            config.consumer,
            host=host,
            book=self.offer_book,
            finder=self.finder,
            dialer=self.dialer,
            reputation=self.reputation,
            local=self.offering.engine_for,
            market=self.markets.consumer,
        )
        self.auditor = (
            auditlib.Auditor(
                config.audit,
                # Our own copy of the weights first; else another provider's.
                auditlib.either(
                    auditlib.local_scorers(self.offering.engines),
                    *([self.consumer.remote_scorer] if config.audit.remote else []),
                ),
                self.consumer.caught,
                misled=self.consumer.misled,
            )
            if config.audit is not None
            else None
        )
        self.consumer.auditor = self.auditor
        # Dial-backs this node does for others, within its budgets.
        self.dialback_helper = nat.Helper(config.dialback)
        self.reachability = upkeep.Reachability(
            host,
            self.dialer,
            config.dialback,
            own_addrs=lambda: self.addrs,
            forced=config.reachability,
            first_s=config.reachability_first_s,
            every_s=config.reachability_every_s,
        )
        self.relay_keeping = upkeep.RelayKeeping(
            host,
            self.relay,
            self.reachability,
            self.discovery,
            check_s=config.relay_check_s,
            addrs_changed=self.offering.changed,
        )
        self.bootstrap = upkeep.Bootstrap(
            host,
            [hostlib.parse_peer_addr(a) for a in config.bootstrap],
            timeout=config.bootstrap_timeout,
            retry_s=config.bootstrap_retry_s,
        )
        auditor = self.auditor
        self.control = control.Answers(
            host,
            self.offer_book,
            self.reputation,
            self.status_info,
            paid=wallet is not None,
            audits=(lambda peer: auditor.records.get(peer)) if auditor else lambda _peer: None,
            audit_summary=self._audit_summary,
        )

    @property
    def addrs(self) -> list[str]:
        """What this node advertises: where it listens, or its relays' circuits while private."""
        return self.relay_keeping.addrs

    @property
    def running(self) -> bool:
        """False once the node stops: at exit, or when one of its tasks failed."""
        return self._scope is not None and not self._scope.cancel_called

    async def generate(
        self,
        request: Request,
        deliver: consumerlib.Deliver,
        *,
        only: Sequence[str] | None = None,
        logprobs: consumerlib.SeeLogprobs | None = None,
    ) -> consumerlib.Outcome:
        """Run a request here or through the network (see ``p2p/consumer.py``)."""
        return await self.consumer.generate(request, deliver, only=only, logprobs=logprobs)

    def list_models(self) -> list[tuple[str, str]]:
        """(model id, "local" or "network"): its own models first, then those on offer."""
        served = self.offering
        local = [m.model_id for m in served.models if served.engine_for(m.model_id) is not None]
        offered = {m.model_id for o in self.offer_book.offers() for m in o.models} - set(local)
        return [(m, "local") for m in local] + [(m, "network") for m in sorted(offered)]

    def recommended_sampling(self, model_id: str) -> tuple[float | None, float | None]:
        """The (temperature, top_p) recommended for ``model_id``: its own engine's
        when it serves the model, else, each on its own, the value most offers
        for it announce (the lower on a tie).

        Offers are cheap to make, so a flood of them could pick the value: a
        recommended temperature above OpenAI's default of 1 is not counted,
        which bounds what a flood can do to the default a client would have
        had anyway (docs/protocols.md#the-offer).
        """
        engine = self.offering.engine_for(model_id)
        if engine is not None:
            info = enginelib.info_of(engine, model_id)
            return (info.temperature, info.top_p) if info else (None, None)
        terms = [m for o in self.offer_book.offers(model_id) if (m := o.serves(model_id))]
        temperature = _most_said(
            m.temperature for m in terms if m.temperature is not None and m.temperature <= 1.0
        )
        return temperature, _most_said(m.top_p for m in terms if m.top_p is not None)

    async def has_model(self, model_id: str) -> bool:
        """Whether ``model_id`` is served here or on offer; asks the DHT if gossip has not said."""
        if self.offering.engine_for(model_id) is not None or self.offer_book.offers(model_id):
            return True
        return bool(await self.finder.discover(model_id))

    def _audit_summary(self) -> dict[str, int]:
        figures = self.auditor.summary() if self.auditor is not None else {}
        if self.provider is not None:
            figures["scored_for_others"] = self.provider.counters.scored
        return figures

    def status_info(self) -> status.StatusResponse:
        """This node's answer to a status request, as of now."""
        return telemetry.status_of(self)

    def metrics(self) -> telemetry.Metrics:
        """Every counter of this node, copied now (docs/architecture.md#metrics)."""
        return telemetry.metrics(self)

    def price_per_s(self, provider: str, model_id: str) -> int:
        """What ``provider`` offers ``model_id`` at a second; when ``provider`` is ""
        or its offer is gone, the highest price on offer for the model (the
        cautious guess); 0 in free mode, where no one is paid (what the shim
        charges a team key, docs/architecture.md#team-keys)."""
        if self.markets.consumer is None:
            return 0
        offer = self.offer_book.get(provider) if provider else None
        terms = offer.serves(model_id) if offer is not None else None
        if terms is not None:
            return terms.price_per_s
        prices = [
            t.price_per_s for o in self.offer_book.offers(model_id) if (t := o.serves(model_id))
        ]
        return max(prices, default=0)

    def dashboard(self) -> dict[str, Any]:
        """What the shim's dashboard shows (docs/architecture.md#the-dashboard)."""
        return telemetry.dashboard_state(self)

    def prometheus(self) -> bytes:
        """Every counter of this node now, in Prometheus' text format (``GET /metrics``)."""
        from p2pnode.p2p import exposition  # prometheus_client: only when scraped

        return exposition.prometheus_text(self.metrics())

    def connected_peers(self) -> list[str]:
        """Peer IDs this node has a live connection to."""
        return [str(p) for p in self.host.get_connected_peers()]

    def _register_handlers(self) -> None:
        answer = partial(status_service.serve, answer=self.status_info, cfg=self.config.status)
        handlers: list[tuple[str, Serve]] = [
            (status.PROTOCOL_ID, answer),
            (dialback.PROTOCOL_ID, self.dialback_helper.serve),
        ]
        if self.provider is not None:
            handlers += [
                (session.PROTOCOL_ID, self.provider.serve_session),
                (infer.PROTOCOL_ID, self.provider.serve_infer),
            ]
        for protocol, serve in handlers:
            self.host.set_stream_handler(TProtocol(protocol), self.guard.wrap(protocol, serve))


def freeze_startup_heap() -> None:
    """Leave what exists now out of every later garbage collection.

    Call once a process has started what it runs for (its nodes, engines,
    shim): those objects, and the ~240,000 of its imports (web3, the
    contracts, llama.cpp's bindings), live as long as the process. A full
    collection walked all of them again, 100-150 ms during which nothing in
    the process ran: in `p2pnode bench e2e`, a request that met one came
    ~168 ms later than its direct twin (docs/performance.md#garbage-collection).
    """
    gc.collect()
    gc.freeze()


@contextmanager
def startup_heap_frozen() -> Iterator[None]:
    """``freeze_startup_heap`` for a block; its objects are collectable again after."""
    freeze_startup_heap()
    try:
        yield
    finally:
        gc.unfreeze()


def _most_said(values: Iterable[float]) -> float | None:
    """The value said most often (the lowest on a tie), or None if none was."""
    said = Counter(values)
    if not said:
        return None
    most = max(said.values())
    return min(v for v, n in said.items() if n == most)


@asynccontextmanager
async def open_node(
    config: NodeConfig,
    *,
    key_pair: KeyPair,
    engines: Sequence[Engine] = (),
    host: IHost | None = None,
    wallet: marketlib.Wallet | None = None,
) -> AsyncIterator[Node]:
    """Start a node and yield it once it listens and has tried its bootstrap peers.

    ``engines`` are served as they are (the caller closes them after);
    ``host`` replaces the one built from ``config.host`` (another transport,
    for tests); paid mode (``config.market``) pays with ``wallet``. Raises
    :class:`ConfigError` before yielding if an address cannot be listened
    on or a bootstrap address is malformed; unreachable bootstrap peers are
    logged and retried.
    """
    host = host or hostlib.build(key_pair, config.host)
    # Discovery registers its handlers and its connection watcher before the
    # host listens, so no connection arrives before gossip can see it.
    node = Node(config, host, engines, wallet)
    # Every task started from here on stamps its log lines with this node.
    logs.NODE.set(node.peer_id)
    node._register_handlers()
    # The ledger closes after every task of the node has ended.
    with single_errors_ungrouped(), closing(node.markets):
        async with hostlib.running(host, config.host) as addrs:
            node.relay_keeping.listening(addrs)
            async with trio.open_nursery() as nursery:
                node._scope = nursery.cancel_scope
                node.dialer.start(nursery)
                if node.auditor is not None:
                    await nursery.start(node.auditor.run)
                await nursery.start(node.relay.run)
                if config.control_socket is not None:
                    await nursery.start(control.serve, config.control_socket, node.control)
                if node.discovery is not None:
                    await nursery.start(node.discovery.run)
                await node.markets.start(
                    nursery, node.offering.model_ids, node.offering.terms_changed
                )
                if node.offering.engines and config.measure_tokens > 0:
                    nursery.start_soon(node.offering.measure, config.measure_tokens)
                if config.bootstrap:
                    await nursery.start(node.bootstrap.run)
                if config.discovery is not None and config.reachability == "auto":
                    await nursery.start(node.reachability.run)
                if node.discovery is not None and config.relay.service:
                    nursery.start_soon(node.discovery.provide_relay)
                if config.reachability != "public":
                    await nursery.start(node.relay_keeping.run)
                try:
                    yield node
                finally:
                    nursery.cancel_scope.cancel()
                    await node.markets.stop()
