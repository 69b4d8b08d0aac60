"""Scenarios: plain functions that drive a simnet through the nodes' public interface.

Each returns a JSON-ready report. Figures are measured on the wall clock of one
process that runs every node, so they include the cost of sharing its cores;
they are reported, never asserted (docs/architecture.md#conventions).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import trio
from libp2p.peer.id import ID

from p2pnode.errors import P2PNodeError
from p2pnode.inference.engine import Engine, Params, Request
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p.node import Node, NodeConfig
from p2pnode.p2p.reputation import Offence
from p2pnode.protocols import offers
from p2pnode.simnet.harness import (
    SIMNET_MODEL,
    Simnet,
    Topology,
    add_node,
    node_process,
    open_simnet,
    rss_mb,
)

# How often a scenario looks at the nodes while it waits for an outcome. Fine
# enough for millisecond figures, coarse enough to cost the loop nothing.
POLL_S = 0.01


async def wait_until(predicate: Callable[[], bool], bound_s: float) -> float | None:
    """Seconds until ``predicate()`` held, or None if it did not within ``bound_s``."""
    start = time.perf_counter()
    with trio.move_on_after(bound_s) as scope:
        # Sampling on purpose: nodes expose no event for "every book holds X",
        # and a benchmark must not change what it measures.
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(POLL_S)
    return None if scope.cancelled_caught else time.perf_counter() - start


async def note_when(
    nodes: Sequence[Node], holds: Callable[[Node], bool], bound_s: float
) -> dict[str, float]:
    """When (``time.monotonic()``, one clock for every process of the machine)
    each of ``nodes`` was first seen to satisfy ``holds``, within ``bound_s``:
    nodes that never did are missing."""
    at: dict[str, float] = {}

    def every() -> bool:
        now = time.monotonic()
        for node in nodes:
            if node.peer_id not in at and holds(node):
                at[node.peer_id] = now
        return len(at) == len(nodes)

    await wait_until(every, bound_s)
    return at


def knows_all(node: Node, provider_ids: Collection[str]) -> bool:
    """Whether ``node`` holds an offer from each of ``provider_ids`` (but itself)."""
    held = {o.peer_id for o in node.offer_book}
    return set(provider_ids) - {node.peer_id} <= held


def sees_price(node: Node, provider_id: str, price: int) -> bool:
    """Whether ``node`` holds ``provider_id``'s offer at ``price`` (an offer round's marker)."""
    offer = node.offer_book.get(provider_id)
    return offer is not None and offer.models[0].price_per_s == price


def offer_round(seen_at: dict[str, float], of: int, start: float) -> dict[str, Any]:
    """An offer round of the report: who of ``of`` peers saw the change, and when
    (``seen_at`` and ``start`` on one clock)."""
    last = max(seen_at.values(), default=start)
    return {
        "delivered": len(seen_at),
        "of": of,
        "all_ms": round((last - start) * 1000, 1) if len(seen_at) == of else None,
        "seen_ms": sorted(round((t - start) * 1000, 1) for t in seen_at.values()),
    }


async def discovery(
    topology: Topology,
    *,
    lookups: int = 10,
    rounds: int = 5,
    bound_s: float = 30.0,
) -> dict[str, Any]:
    """Start a network, then measure offer spread, DHT lookups and offer rounds.

    - ``ready_s``: from the first node's start until every node's OfferBook
      holds every provider; ``ready_ms``: when each node did.
    - lookups: ``find_providers`` from nodes that join afterwards through one
      consumer (cold, connected to no provider), with how many each found.
    - ``offer_rounds``: a provider changes its offer; how many of the other
      peers saw the change, when each did (``seen_ms``) and the last one.
    """
    errors: list[str] = []
    rss_before = rss_mb()
    started = time.monotonic()
    async with open_simnet(topology) as (net, nursery):
        start_s = time.monotonic() - started
        # When each node first held every offer.
        ready_at = await note_when(net.nodes, lambda n: knows_all(n, net.provider_ids), bound_s)
        missing = len(net.nodes) - len(ready_at)
        ready_s = max(ready_at.values()) - started if not missing else None
        if missing:
            errors.append(f"{missing} nodes never held every provider's offer")
        rss_after = rss_mb()
        links = sum(len(n.connected_peers()) for n in net.nodes) // 2
        peers = list(net.nodes)
        # Lookups first: offer rounds then measure gossip in a running
        # network, not the start-up backlog that ready_s already shows.
        lookup_ms, lookup_found = await _late_lookups(net, nursery, lookups, errors)
        offer_rounds = await _offer_rounds(net, peers, rounds, bound_s=5.0)
        protocol_errors = sum(n.reputation.totals[Offence.PROTOCOL] for n in net.nodes)
        rejected = {
            v.value: sum(n.offer_book.verdicts[v] for n in net.nodes)
            for v in offers.Verdict
            if not v.relay
        }
    if protocol_errors:
        errors.append(f"{protocol_errors} protocol errors between nodes")
    return discovery_report(
        topology,
        spread={"workers": 1, "nodes_per_worker": [topology.peers]},
        start_s=start_s,
        ready_s=ready_s,
        lookup_ms=lookup_ms,
        lookup_found=lookup_found,
        ready_ms=[(t - started) * 1000 for t in ready_at.values()],
        offer_rounds=offer_rounds,
        links=links,
        rss_mb_per_peer=(rss_after - rss_before) / topology.peers,
        rejected=rejected,
        errors=errors,
    )


def discovery_report(
    topology: Topology,
    *,
    spread: dict[str, Any],
    start_s: float,
    ready_s: float | None,
    lookup_ms: list[float],
    lookup_found: list[int],
    ready_ms: list[float],
    offer_rounds: list[dict[str, Any]],
    links: int,
    rss_mb_per_peer: float,
    rejected: dict[str, int],
    errors: list[str],
) -> dict[str, Any]:
    """The discovery scenario's report, in one process or over workers (simnet/workers.py);
    ``spread`` says how the nodes were spread over processes."""
    return {
        "scenario": "discovery",
        "peers": topology.peers,
        "providers": topology.providers,
        "fanout": topology.fanout,
        **spread,
        "start_s": round(start_s, 3),
        "ready_s": None if ready_s is None else round(ready_s, 3),
        "lookup_ms_median": round(statistics.median(lookup_ms), 1) if lookup_ms else None,
        "lookup_ms_max": round(max(lookup_ms), 1) if lookup_ms else None,
        "lookup_ms": [round(x, 1) for x in lookup_ms],
        "lookup_found": lookup_found,
        "ready_ms": sorted(round(ms, 1) for ms in ready_ms),
        "offer_rounds": offer_rounds,
        "links": links,
        "rss_mb_per_peer": round(rss_mb_per_peer, 2),
        "offers_rejected": rejected,
        "errors": errors,
    }


async def _late_lookups(
    net: Simnet, nursery: trio.Nursery, count: int, errors: list[str]
) -> tuple[list[float], list[int]]:
    """Nodes join late through one consumer and look providers up in the DHT, cold.

    This is the user's case: a node that heard no gossip yet and is
    connected to no provider. Each joiner asks once.
    """
    rng = random.Random(net.topology.seed + 1)  # noqa: S311 - topology, not cryptography
    consumers = net.consumers
    times: list[float] = []
    found: list[int] = []
    for _ in range(count):
        entry = rng.choice(consumers)
        joiner = await add_node(net, nursery, NodeConfig(bootstrap=(entry.addrs[0],)))
        if net.provider_ids & set(joiner.connected_peers()):
            errors.append("a late joiner was connected to a provider before its lookup")
        start = time.perf_counter()
        providers: list[str] = []
        with trio.move_on_after(10) as scope:
            providers = await joiner.finder.find_providers(SIMNET_MODEL)
        if scope.cancelled_caught:
            errors.append(f"lookup from {joiner.peer_id[-8:]} took over 10 s")
            continue
        times.append((time.perf_counter() - start) * 1000)
        found.append(len(set(providers) & net.provider_ids))
    if found and min(found) < len(net.provider_ids):
        errors.append(f"some lookups found fewer than all providers: {found}")
    return times, found


async def _offer_rounds(
    net: Simnet, everyone: list[Node], rounds: int, bound_s: float
) -> list[dict[str, Any]]:
    """Each round, one provider re-prices; count who of ``everyone`` sees it, and when."""
    results: list[dict[str, Any]] = []
    providers = net.providers
    for r in range(rounds):
        provider = providers[r % len(providers)]
        marker = 1_000 + r  # a price no earlier offer carried
        provider.offering.set_models(
            tuple(replace(m, price_per_s=marker) for m in provider.offering.models)
        )
        others = [n for n in everyone if n is not provider]
        start = time.monotonic()
        sees = partial(sees_price, provider_id=provider.peer_id, price=marker)
        seen_at = await note_when(others, sees, bound_s)
        results.append(offer_round(seen_at, len(others), start))
    return results


async def market(
    topology: Topology,
    *,
    consumers: int = 8,
    requests: int = 2,
    max_tokens: int = 8,
    settle_s: float = 10.0,
    bound_s: float = 120.0,
) -> dict[str, Any]:
    """Paid sessions on one embedded chain: consumers chat, sessions settle, escrow balances.

    Every provider registers on chain (its peer ID), bids on the bundled
    model at its own price and serves it from one shared engine; ``consumers``
    nodes each send ``requests`` chats through ``Node.generate`` (one paid
    session each, reused), then close it. Reports sessions opened and closed,
    the escrow invariant (escrowed = paid + refunded once everything is
    closed), amounts, the time to open a session (stream, handshake and the
    on-chain open) and the gas of open and close. Chats start ``settle_s``
    after every consumer knows every provider: for ~10 s after a simnet
    starts, py-libp2p's connection set-up keeps the core busy (see the
    discovery scenario), and a session opened then measures that instead.
    """
    from p2pnode.chain.client import AsyncChain
    from p2pnode.chain.embedded import MIN_PROVIDER_STAKE, open_embedded
    from p2pnode.inference.engine import ChatMessage
    from p2pnode.inference.llamacpp import (
        BUNDLED_MODEL_ID,
        Config,
        bundled_model_path,
        open_llamacpp,
    )
    from p2pnode.p2p import market as marketlib

    errors: list[str] = []
    embedded = await trio.to_thread.run_sync(open_embedded)
    chain = AsyncChain(embedded.chain)
    provider_at = set(topology.provider_indices())
    accounts = {}
    for i in range(topology.peers):
        accounts[i] = await chain.run(embedded.new_account)
    for i in sorted(provider_at):
        account = accounts[i]
        await chain.run(
            embedded.chain.register_provider, account, f"simnet-{i}", MIN_PROVIDER_STAKE
        )
        if i == min(provider_at):
            await chain.run(embedded.chain.register_model, account, BUNDLED_MODEL_ID, None)
        price = 10**15 * (1 + len(accounts) % 3 + i % 4)
        await chain.run(embedded.chain.post_bid, account, BUNDLED_MODEL_ID, price)

    def config_for(index: int, is_provider: bool) -> NodeConfig:
        return NodeConfig(measure_tokens=0, market=marketlib.Config(session_seconds=300))

    def wallet_for(index: int) -> marketlib.Wallet:
        return marketlib.Wallet(chain, accounts[index])

    request = Request(
        model_id=BUNDLED_MODEL_ID,
        kind="chat",
        messages=(ChatMessage(role="user", content="Name a colour."),),
        params=Params(max_tokens=max_tokens, temperature=0.0),
    )
    engine_cfg = Config(
        model_path=bundled_model_path(), model_id=BUNDLED_MODEL_ID, n_threads=1, slots=2
    )
    chats_ok = 0
    async with (
        open_llamacpp(engine_cfg) as engine,
        open_simnet(topology, config_for, engines=[engine], wallet_for=wallet_for) as (
            net,
            _nursery,
        ),
    ):
        buyers = net.consumers[:consumers]
        ready = await wait_until(
            lambda: all(knows_all(n, net.provider_ids) for n in buyers), bound_s
        )
        if ready is None:
            errors.append("consumers never held every provider's offer")
        await trio.sleep(settle_s)

        async def chat(node: Node) -> None:
            nonlocal chats_ok

            async def ignore(_text: str, _tokens: int) -> None:
                return None

            for _ in range(requests):
                try:
                    await node.generate(request, ignore)
                    chats_ok += 1
                except P2PNodeError as exc:
                    errors.append(f"{node.peer_id[-8:]}: {exc}")
            assert node.markets.consumer is not None
            await node.markets.consumer.close_all()

        # One consumer after another: open_ms then measures a session's
        # opening, not eight nodes queueing for the one chain thread.
        with trio.move_on_after(bound_s) as scope:
            for node in buyers:
                await chat(node)
        if scope.cancelled_caught:
            errors.append(f"chats did not finish within {bound_s:g} s")
        markets = [n.markets.consumer for n in buyers if n.markets.consumer is not None]
        open_ms = [ms for n in buyers for ms in n.consumer.open_ms]
        chain_open_ms = [ms for m in markets for ms in m.open_ms]
        gas_open = [g for m in markets for g in m.gas["open"]]
        gas_close = [g for m in markets for g in m.gas["close"]]
        held_stakes = [s for n in buyers if (s := n.metrics().stakes) is not None]
        opened = sum(s.opened for s in held_stakes)
        closed = sum(s.closed for s in held_stakes)
        settled = sum(b.settled for n in net.providers if (b := n.metrics().billing) is not None)
    escrowed, paid_wei, refunded_wei = embedded.chain.totals()
    held = embedded.chain.balance(embedded.chain.market.address)
    stakes = len(provider_at) * MIN_PROVIDER_STAKE
    return {
        "scenario": "market",
        "peers": topology.peers,
        "providers": topology.providers,
        "consumers": len(buyers),
        "chats_ok": chats_ok,
        "chats": len(buyers) * requests,
        "sessions_opened": opened,
        "sessions_closed": closed + settled,
        "escrow_invariant_ok": escrowed == paid_wei + refunded_wei and held == stakes,
        "escrowed_wei": escrowed,
        "paid_wei": paid_wei,
        "refunded_wei": refunded_wei,
        "open_ms_median": round(statistics.median(open_ms), 1) if open_ms else None,
        "open_ms": [round(x, 1) for x in open_ms],
        "chain_open_ms": [round(x, 1) for x in chain_open_ms],
        "gas_open": round(statistics.median(gas_open)) if gas_open else None,
        "gas_close": round(statistics.median(gas_close)) if gas_close else None,
        "errors": errors,
    }


async def relay(
    topology: Topology,
    *,
    rounds: int = 8,
    model_tokens: int = 64,
    tokens: int = 20_000,
    settle_s: float = 10.0,
    bound_s: float = 60.0,
) -> dict[str, Any]:
    """Private providers reachable only through a relay; relayed vs direct token streams.

    A public node outside the simnet (and this process) offers the relay service; half the
    providers (rounded up) are private: they reserve on it and advertise only
    their circuit address. Providers serve the bundled model and a synthetic
    engine. A consumer that knows providers only from gossip, with hole
    punching off, asks a private and a public provider in turn, ``rounds``
    times, for the same greedy ``model_tokens``-token completion:
    ``relayed_ok`` (requests that reached a private provider, through the relay) and
    ``relayed_tokens_per_s_ratio`` (median of per-round relayed ÷ direct,
    time to first token included, measured ``settle_s`` after start-up):
    what a user of the relay gets. Then the
    same with ``tokens`` synthetic tokens, which no model produces this fast:
    ``relayed_capacity_ratio``, what the relayed path can carry at most (the
    relay runs ``p2pnode start --relay-service`` in a process of its own, as
    on a machine of its own; the other nodes share this process's core).

    A second consumer, with hole punching on, reaches every private provider
    through the relay and upgrades: ``dcutr_upgrades`` (relayed connections
    that became direct; ``dcutr_punched`` of them by the DCUtR exchange, the
    rest by a plain dial; ``dcutr_failed``) and ``upgraded_capacity_ratio``
    (synthetic streams afterwards ÷ direct). On loopback there is no NAT to
    punch through: this exercises the exchange and the switch of streams, not
    NAT behaviour (the namespace test does).
    """
    from p2pnode.inference import llamacpp
    from p2pnode.inference.synthetic import SyntheticEngine

    errors: list[str] = []
    provider_at = topology.provider_indices()
    private_at = set(provider_at[: (len(provider_at) + 1) // 2])
    synthetic = Request(
        model_id="synthetic", kind="completion", prompt="x", params=Params(max_tokens=tokens)
    )
    model = Request(
        model_id=llamacpp.BUNDLED_MODEL_ID,
        kind="completion",
        prompt="The history of the printing press",
        params=Params(max_tokens=model_tokens, temperature=0.0),
    )
    # The last node that is not a provider measures the relay (no upgrade).
    measuring_at = max(set(range(topology.peers)) - set(provider_at))
    engine_cfg = llamacpp.Config(
        model_path=llamacpp.bundled_model_path(), model_id=llamacpp.BUNDLED_MODEL_ID
    )
    # The relay in a process of its own, as a real relay is on a machine of
    # its own: in this one, every relayed byte cost the one core twice more
    # (the relay decrypts and re-encrypts it), which capped the relayed
    # capacity at ~0.6 of direct whatever the path did.
    async with (
        llamacpp.open_llamacpp(engine_cfg) as engine,
        node_process("--relay-service", "--reachability", "public") as relay_node,
    ):

        def config_for(index: int, is_provider: bool) -> NodeConfig:
            if index in private_at:
                return NodeConfig(
                    reachability="private",
                    relay=relaylib.Config(relays=(relay_node["addrs"][0],)),
                    relay_check_s=1.0,
                )
            if index == measuring_at:
                return NodeConfig(relay=relaylib.Config(hole_punch=False))
            return NodeConfig()

        engines: list[Engine] = [engine, SyntheticEngine()]
        direct_anyway: list[str] = []
        async with open_simnet(topology, config_for, engines=engines) as (net, _nursery):
            private = [n for n in net.providers if n.config.relay.relays]
            public = [n for n in net.providers if n not in private]
            consumer = next(n for n in net.consumers if not n.config.relay.hole_punch)
            puncher = next(n for n in reversed(net.consumers) if n.config.relay.hole_punch)

            def offers_known(node: Node = consumer) -> bool:
                reserved = all(relaylib.is_circuit(n.addrs[0]) for n in private)
                return reserved and all(
                    (o := node.offer_book.get(n.peer_id)) is not None
                    and tuple(o.addrs) == tuple(n.addrs)
                    for n in net.providers
                )

            if await wait_until(offers_known, bound_s) is None:
                errors.append("the consumer never held every provider's current offer")
            # Measure after the start-up storm (see ``market``).
            await trio.sleep(settle_s)
            if not private or not public:
                errors.append("need at least one private and one public provider")
                users = capacity = _Comparison()
            else:
                users = await _compare(consumer, private, public, model, rounds, errors)
                capacity = await _compare(consumer, private, public, synthetic, rounds, errors)
            if await wait_until(lambda: offers_known(puncher), bound_s) is None:
                held = sum(puncher.offer_book.get(n.peer_id) is not None for n in net.providers)
                errors.append(f"the puncher held {held} of the providers' current offers")
            upgraded = await _upgrade_all(
                puncher, private, public, synthetic, bound_s, errors, direct_anyway
            )
            upgrades = puncher.metrics().upgrades
    return {
        "scenario": "relay",
        "peers": topology.peers,
        "providers": topology.providers,
        "private_providers": len(private_at),
        "relayed_ok": users.relayed_ok + capacity.relayed_ok,
        "rounds": rounds,
        "model_tokens_per_request": model_tokens,
        "relayed_tokens_per_s": [round(x, 1) for x in users.relayed],
        "direct_tokens_per_s": [round(x, 1) for x in users.direct],
        "relayed_tokens_per_s_ratio": users.ratio(),
        "synthetic_tokens_per_request": tokens,
        "relayed_capacity_tokens_per_s": [round(x) for x in capacity.relayed],
        "direct_capacity_tokens_per_s": [round(x) for x in capacity.direct],
        "relayed_capacity_ratio": capacity.ratio(),
        "dcutr_upgrades": puncher.relay.upgraded,
        "dcutr_punched": upgrades.punched,
        "dcutr_failed": upgrades.failed,
        "dcutr_direct_without_upgrade": len(direct_anyway),
        "upgraded_capacity_ratio": upgraded,
        "errors": errors,
    }


@dataclass
class _Comparison:
    """Tokens/s of relayed and direct requests, round by round."""

    relayed: list[float] = field(default_factory=list)
    direct: list[float] = field(default_factory=list)
    relayed_ok: int = 0

    def ratio(self) -> float | None:
        """Median of the per-round relayed ÷ direct ratios."""
        ratios = [r / d for r, d in zip(self.relayed, self.direct, strict=True)]
        return round(statistics.median(ratios), 3) if ratios else None


async def _compare(
    consumer: Node,
    private: list[Node],
    public: list[Node],
    request: Request,
    rounds: int,
    errors: list[str],
) -> _Comparison:
    """Ask a private (relayed) and a public provider in turn, ``rounds`` times.

    Each provider is asked once before the rounds, so that connections
    (through the relay or not) and sessions are open and rounds time
    generation and token streams only.
    """
    out = _Comparison()

    async def rate(node: Node) -> float:
        if node in private:
            await _through_relay(consumer, node)
        start = time.perf_counter()
        outcome = await consumer.generate(request, _ignore, only=(node.peer_id,))
        return outcome.completion_tokens / (time.perf_counter() - start)

    small = replace(request, params=replace(request.params, max_tokens=4))
    for node in private + public:
        try:
            if node in private:
                await _through_relay(consumer, node)
            await consumer.generate(small, _ignore, only=(node.peer_id,))
        except P2PNodeError as exc:
            errors.append(f"warm-up with {node.peer_id[-8:]}: {exc}")
    for r in range(rounds):
        target = private[r % len(private)]
        try:
            # Alternate which goes first: a load that fades during the run
            # would otherwise always weigh on the same side.
            if r % 2 == 0:
                relayed = await rate(target)
                direct = await rate(public[r % len(public)])
            else:
                direct = await rate(public[r % len(public)])
                relayed = await rate(target)
        except P2PNodeError as exc:
            errors.append(f"{request.model_id} round {r}: {exc}")
            continue
        held = relaylib.connections(consumer.host, ID.from_base58(target.peer_id))
        if not all(relaylib.is_relayed(c) for c in held):
            errors.append(f"{request.model_id} round {r}: a direct connection appeared")
            continue
        out.relayed_ok += 1
        out.relayed.append(relayed)
        out.direct.append(direct)
    return out


async def _through_relay(node: Node, private: Node, *, dial: bool = True) -> None:
    """Leave ``node`` connected to a private provider through the relay only.

    On loopback a "private" node is dialable after all, and py-libp2p's
    auto-connector and DHT walks dial whatever the peerstore holds; behind a
    real NAT those dials fail. Closing them, and dialling through the relay
    if no relayed connection is left, makes the next stream take the relay,
    as it would there, with its connection already up (as a direct one is).
    """
    peer = ID.from_base58(private.peer_id)
    for conn in relaylib.connections(node.host, peer):
        if not relaylib.is_relayed(conn):
            await conn.close()
    if dial and not relaylib.connections(node.host, peer):
        await node.relay.dial(private.addrs[0])


async def _upgrade_all(
    puncher: Node,
    private: list[Node],
    public: list[Node],
    request: Request,
    bound_s: float,
    errors: list[str],
    direct: list[str],
) -> float | None:
    """Reach every private provider through the relay, wait for the upgrades, then measure.

    ``direct`` gets the private providers reached directly without any upgrade.

    Returns the median of (a stream from a private provider after the
    upgrade ÷ one from a public provider), or None if nothing was measured.
    """
    small = replace(request, params=Params(max_tokens=8))
    for node in private + public:
        if node in private:
            # Without a connection, its own next stream dials the relay and
            # starts the upgrade.
            await _through_relay(puncher, node, dial=False)
        try:
            await puncher.generate(small, _ignore, only=(node.peer_id,))
        except P2PNodeError as exc:
            kind = "private" if node in private else "public"
            errors.append(f"hole-punch warm-up with {kind} {node.peer_id[-8:]}: {exc}")

    def direct_only(node: Node) -> bool:
        held = relaylib.connections(puncher.host, ID.from_base58(node.peer_id))
        return bool(held) and not any(relaylib.is_relayed(c) for c in held)

    def settled() -> bool:
        # Upgraded and the relayed connection retired, or given up.
        done = sum(direct_only(n) for n in private)
        return done + puncher.relay.upgrades.failed >= len(private)

    if await wait_until(settled, bound_s) is None:
        errors.append(f"upgrades did not settle: {puncher.relay.upgrades}")
    # On loopback a "private" node is dialable: py-libp2p's own dials (the
    # auto-connector, DHT walks) sometimes connect the two directly before
    # the relayed stream is opened, and there is nothing left to upgrade.
    direct.extend(n.peer_id for n in private if direct_only(n) and puncher.relay.upgraded == 0)
    ratios = []
    for i, node in enumerate(private):
        if not direct_only(node):
            continue  # not upgraded: nothing to compare
        try:
            start = time.perf_counter()
            after = await puncher.generate(request, _ignore, only=(node.peer_id,))
            after_rate = after.completion_tokens / (time.perf_counter() - start)
            start = time.perf_counter()
            other = public[i % len(public)]
            public_run = await puncher.generate(request, _ignore, only=(other.peer_id,))
            public_rate = public_run.completion_tokens / (time.perf_counter() - start)
            ratios.append(after_rate / public_rate)
        except P2PNodeError as exc:
            errors.append(f"after the upgrade: {exc}")
    return round(statistics.median(ratios), 3) if ratios else None


async def _ignore(_text: str, _tokens: int) -> None:
    return None


async def fuzz(
    topology: Topology, *, frames: int = 100_000, attackers: int = 8, processes: int = 1
) -> dict[str, Any]:
    """One node fuzzed with ``frames`` hostile frames by ``attackers`` hosts (``simnet/fuzz.py``).

    Of ``topology`` only the seed is used: the target is one fresh node
    serving the synthetic engine, restarted (and the killing kind skipped)
    each time it dies; the attackers run in ``processes`` worker processes.
    """
    from p2pnode.simnet import fuzz as fuzzlib  # it imports this module

    report = await fuzzlib.campaign(
        frames=frames, attackers=attackers, seed=topology.seed, processes=processes
    )
    return report.to_json()


Scenario = Callable[[Topology], Awaitable[dict[str, Any]]]
SCENARIOS: dict[str, Scenario] = {
    "discovery": discovery,
    "market": market,
    "relay": relay,
    "fuzz": fuzz,
}
