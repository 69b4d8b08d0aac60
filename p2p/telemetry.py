"""What a node tells about itself: its status answer and its metrics snapshot.

Each part of the node keeps its own counters dataclass (the consumer's
``Counters``, the provider's, the markets', the relay's); :func:`metrics`
copies them all into one frozen :class:`Metrics` at one moment, which the
CLI, simnet and the tests read by attribute (docs/architecture.md#metrics).
:func:`status` is the node's answer to the status protocol and to
``p2pnode status``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

import trio
from libp2p.abc import IHost

from p2pnode import __version__
from p2pnode.p2p import consumer as consumerlib
from p2pnode.p2p import control, nat, upkeep
from p2pnode.p2p import market as marketlib
from p2pnode.p2p import provider as providerlib
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p import reputation as reputationlib
from p2pnode.p2p.circuit import Counters as RelayServiceCounters
from p2pnode.p2p.discovery import Discovery
from p2pnode.p2p.finder import Finder
from p2pnode.p2p.guard import StreamGuard
from p2pnode.p2p.histograms import Distribution
from p2pnode.p2p.offering import Offering
from p2pnode.protocols import offers, status


class Parts(Protocol):
    """What these functions read of a node (``p2p/node.py:Node`` has it all)."""

    peer_id: str
    host: IHost
    started_at: float
    guard: StreamGuard
    offering: Offering
    offer_book: offers.OfferBook
    discovery: Discovery | None
    relay: relaylib.Relay
    reachability: upkeep.Reachability
    dialback_helper: nat.Helper
    consumer: consumerlib.Consumer
    provider: providerlib.Provider | None
    markets: marketlib.Markets
    control: control.Answers
    reputation: reputationlib.Reputation
    finder: Finder

    @property
    def addrs(self) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class Metrics:
    """Every counter of a node at one moment; the parts a node does not run are None."""

    peer_id: str
    uptime_s: float
    connected_peers: int
    direct_connections: int
    relayed_connections: int
    streams_refused: int  # inbound streams turned away (budgets, bans)
    offers_known: int
    offer_verdicts: dict[str, int]  # each gossiped or fetched offer's verdict
    consumer: consumerlib.Counters
    provider: providerlib.Counters | None
    billing: marketlib.BillingCounters | None  # as a provider, on chain
    stakes: marketlib.StakeCounters | None  # as a consumer, on chain
    upgrades: relaylib.Upgrades  # relayed connections this node dialled
    relay_service: RelayServiceCounters  # what it relayed for others
    dialback: nat.HelperCounters  # dial-backs it did for others
    time_to_first_token: Distribution  # seconds, of this node's requests
    reachability: str  # public, private or unknown
    upgraded_connections: int  # relayed connections upgraded to direct ones, now
    relays_held: int  # relays this node holds a reservation on
    reservations_served: int  # peers holding a reservation on this node's relay
    protocol_errors: dict[tuple[str, str], int]  # peers' violations by (protocol, code)
    offences: dict[str, int]  # peers' offences by kind, over the node's life
    misbehaving_peers: int  # peers with a misbehaviour score now
    banned_peers: int  # of those, banned now
    lookup_seconds: Distribution  # DHT lookups of a model's providers
    provider_refusals: dict[str, int]  # by error code (a node that serves: else empty)
    provider_time_to_first_token: Distribution | None  # seconds from admission
    provider_tokens_per_s: Distribution | None  # decoding speed per answer
    slots_total: int  # this node's engines' slots
    slots_free: int  # of those, free now
    queue_length: int  # requests waiting for one


def metrics(node: Parts) -> Metrics:
    """A copy of every counter now: later counting does not change it."""
    kinds = node.relay.connection_counts()
    provider, billing, stakes = node.provider, node.markets.provider, node.markets.consumer
    scored, banned = node.reputation.misbehaving(trio.current_time())
    load = node.offering.load()
    return Metrics(
        peer_id=node.peer_id,
        uptime_s=round(trio.current_time() - node.started_at, 3),
        connected_peers=len(node.host.get_connected_peers()),
        direct_connections=kinds["direct"],
        relayed_connections=kinds["relayed"],
        streams_refused=node.guard.refused,
        offers_known=len(node.offer_book.offers()),
        offer_verdicts={v.value: n for v, n in node.offer_book.verdicts.items()},
        consumer=replace(node.consumer.counters),
        provider=replace(provider.counters) if provider is not None else None,
        billing=replace(billing.counters) if billing is not None else None,
        stakes=replace(stakes.counters) if stakes is not None else None,
        upgrades=replace(node.relay.upgrades),
        relay_service=replace(node.relay.protocol.counters),
        dialback=replace(node.dialback_helper.counters),
        time_to_first_token=node.consumer.time_to_first_token.snapshot(),
        reachability=node.reachability.verdict.reachability.value,
        upgraded_connections=node.relay.upgraded,
        relays_held=len(node.relay.reservations),
        reservations_served=node.relay.protocol.reservations(),
        protocol_errors=dict(node.guard.violations),
        offences={o.value: n for o, n in node.reputation.totals.items()},
        misbehaving_peers=scored,
        banned_peers=banned,
        lookup_seconds=node.finder.lookups.snapshot(),
        provider_refusals=dict(provider.refusals) if provider is not None else {},
        provider_time_to_first_token=provider.time_to_first_token.snapshot() if provider else None,
        provider_tokens_per_s=provider.tokens_per_s.snapshot() if provider else None,
        slots_total=load.slots_total,
        slots_free=load.slots_free,
        queue_length=load.queue_len,
    )


# Paid sessions the dashboard lists, newest first; offers, cheapest first
# (strangers can make thousands: the page shows a screenful and the count).
DASHBOARD_SESSIONS: Final = 20
DASHBOARD_OFFERS: Final = 100


def dashboard_state(node: Parts) -> dict[str, Any]:
    """What the dashboard shows, as JSON (docs/architecture.md#the-dashboard): the
    control socket's answers, what this consumer measured of each provider, the
    sessions it holds, its recent paid sessions with their receipts, and the
    token counts the page turns into tokens/s."""
    offers_known = node.control({"op": "offers"})
    every = offers_known["offers"]
    every.sort(key=lambda o: (o["banned"], min((m["price_per_s"] for m in o["models"]), default=0)))
    offers_known["offers"], offers_known["total"] = every[:DASHBOARD_OFFERS], len(every)
    for offer in offers_known["offers"]:
        seen = node.consumer.stats.get(offer["peer_id"])
        offer["measured"] = {
            "rtt_ms": seen.rtt_ms if seen else None,
            "tokens_per_s": seen.tokens_per_s if seen else None,
        }
    ledger, provider = node.markets.ledger, node.provider
    return {
        "node": node.control({"op": "status"})
        | {"wallet": node.markets.wallet.account.address if node.markets.wallet else None},
        "providers": offers_known,
        "connections": node.control({"op": "peers"})["peers"],
        "sessions": {
            "held": node.consumer.held_sessions(),
            "paid": ledger.recent(DASHBOARD_SESSIONS) if ledger is not None else [],
        },
        "tokens": {
            "consumed": node.consumer.counters.completion_tokens,
            "served": provider.counters.completion_tokens if provider is not None else 0,
        },
        "requests": node.consumer.counters.requests,
    }


def status_of(node: Parts) -> status.StatusResponse:
    """The node's answer to a status request, as of now."""
    kinds = node.relay.connection_counts()
    return status.StatusResponse(
        peer_id=node.peer_id,
        version=__version__,
        addrs=tuple(node.addrs),
        connected_peers=len(node.host.get_connected_peers()),
        uptime_s=round(trio.current_time() - node.started_at, 3),
        models=node.offering.models,
        load=node.offering.load(),
        offer=node.discovery.current_offer if node.discovery is not None else b"",
        reachability=node.reachability.verdict.reachability.value,
        relays=tuple(node.relay.reservations),
        direct_connections=kinds["direct"],
        relayed_connections=kinds["relayed"],
        upgraded_connections=node.relay.upgraded,
    )
