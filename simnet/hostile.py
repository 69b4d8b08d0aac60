"""The hostile scenario: an honest paid network keeps serving while hostile peers attack it.

Theory of operation. The honest network is ``topology``'s nodes, in paid mode
on one embedded chain: every honest provider serves the synthetic engine
(named as such: the bulk of the traffic exercises the network, not a model)
and, with ``model``, one more serves the bundled model. Among the honest
providers one relays for others (the relay service on), one is private and
reachable only through it. Once consumers know the providers, ``consumers``
honest consumers each send ``requests`` chats (and more while attacks last)
while every in-process attack runs; then one honest node is fuzzed in a
process of its own; then each consumer sends ``requests_after`` more chats.
The attacks:

- crash attempts: a rogue node publishes correctly signed offers with junk
  fields and addresses that are no multiaddrs (its own validator removed so
  that it sends them), and sends malformed frames on every protocol of an
  honest provider and an honest consumer; :func:`fuzz.fuzz` sends the bulk
  (``fuzz_frames``) to an honest node that joins the network in a process
  of its own (:func:`fuzzing.fuzz_joined`: a fresh one when one dies);
- Sybils: providers that refuse every Hello (``max_handshakes=0``: a real
  node answering BUSY), bid below every honest provider on chain and claim
  the fastest speed an offer may carry, or an absurd one;
- offer floods: junk, oversized, unsigned, forged, stale, future, replayed
  and out-of-bounds offers on the gossip topic;
- relay squatters: throwaway identities reserve on the relay for made-up
  peer ids, then for themselves beyond its reservation budget;
- DHT poisoners: throwaway identities send ADD_PROVIDER for the model's key
  at junk addresses, a liar answers every GET_PROVIDERS / FIND_NODE with
  junk peers, and an honest node that joins through the liar looks the
  model up and is served;
- consumers in closed or expired sessions: a consumer pays for a session,
  closes it on chain at once (or lets a short one expire) and keeps asking
  in it, driving the infer protocol by hand; then closes a session while a
  request runs in it;
- thieves: providers that take the stake (the consumer's on-chain open)
  and then reject the session, or never answer the consumer's Opened.

Every node runs in a task that records how it ended (``roster``), so an
honest node that dies is counted (``node_exits``) instead of ending the run.
Every loop and wait is bounded.

The report (JSON-ready) has ``honest_requests`` and ``honest_ok`` (goal:
all), ``node_exits`` (honest nodes whose task died; goal 0),
``served_after_close_s`` (seconds of generation served in sessions after
they closed or ended; goal 0), ``paid_without_service_wei`` (what the
hostile providers were paid for sessions in which they delivered no token;
goal 0, explained in ``paid_without_service_note``), ``fuzz_frames``,
``fuzz_node_exits`` (goal 0), ``rss_growth_mb``, ``errors`` and the details
of each attack. Figures are measured on the wall clock of one process that
runs every node; they are reported, never asserted here.
"""

from __future__ import annotations

import collections
import logging
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import trio
from eth_account.signers.local import LocalAccount
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID

from p2pnode.chain.client import CLAIM_WINDOW_S, AsyncChain
from p2pnode.chain.embedded import MIN_PROVIDER_STAKE, Embedded, open_embedded
from p2pnode.errors import ConfigError, P2PNodeError
from p2pnode.inference.engine import ChatMessage, Engine, Params, Request
from p2pnode.inference.synthetic import WORD, SyntheticEngine
from p2pnode.p2p import market as marketlib
from p2pnode.p2p import provider as providerlib
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p.discovery import dht_key
from p2pnode.p2p.host import short
from p2pnode.p2p.node import Node, NodeConfig
from p2pnode.p2p.reputation import Offence
from p2pnode.protocols import offers
from p2pnode.simnet import attacks, fuzzing, session_attacks
from p2pnode.simnet.harness import Topology, rss_mb
from p2pnode.simnet.roster import Member, Roster
from p2pnode.simnet.scenarios import wait_until

logger = logging.getLogger(__name__)

PEERS = 12
"""Honest nodes a hostile run has unless told otherwise. Every node, every
attacker's node and the attacks' traffic share this process's one core (the
other runs the fuzzed node, its attackers and llama.cpp): with many more honest
nodes the loop, not the product, decides which requests time out."""

SYNTHETIC = "synthetic"
# Wei per second. Honest providers ask a little more than the Sybils and
# thieves, who undercut them so that consumers try them first.
HONEST_PRICE = 10**12
CHEAP_PRICE = 10**11
# What a consumer's stake buys (seconds).
SESSION_S = 300
# What one request may take: a first contact tries Sybils and thieves (a
# stalling one holds it for the consumer's 10 s handshake bound) first.
REQUEST_S = 90.0
# Every paid node's terms (each pays with its own wallet).
PAID = marketlib.Config(session_seconds=SESSION_S)


# --- the chain ----------------------------------------------------------------------


@dataclass
class _Chain:
    embedded: Embedded
    chain: AsyncChain
    registered: int = 0
    models: set[str] = field(default_factory=set)

    async def account(self) -> LocalAccount:
        return await self.chain.run(self.embedded.new_account)

    async def provider(self, account: LocalAccount, label: str, bids: dict[str, int]) -> None:
        """Register ``account`` as a provider and bid ``bids[model] `` wei/s for each model."""
        sync = self.embedded.chain
        await self.chain.run(sync.register_provider, account, label, MIN_PROVIDER_STAKE)
        self.registered += 1
        for model_id, price in bids.items():
            if model_id not in self.models:
                await self.chain.run(sync.register_model, account, model_id, None)
                self.models.add(model_id)
            await self.chain.run(sync.post_bid, account, model_id, price)

    async def balance(self, account: LocalAccount) -> int:
        return await self.chain.run(self.embedded.chain.balance, account.address)

    def wallet(self, account: LocalAccount) -> marketlib.Wallet:
        return marketlib.Wallet(self.chain, account)


# --- honest traffic -----------------------------------------------------------------


@dataclass
class _Chats:
    requests: int = 0
    ok: int = 0
    seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    first_at: float | None = None
    last_at: float | None = None
    # Failed requests whose consumer held no offer of an honest provider of the
    # model then (gossip lost it, or it expired): only Sybils were left to ask.
    failed_without_honest_offer: int = 0


def _synthetic(max_tokens: int) -> Request:
    return Request(
        model_id=SYNTHETIC, kind="completion", prompt="hello", params=Params(max_tokens=max_tokens)
    )


def _bundled(model_id: str) -> Request:
    return Request(
        model_id=model_id,
        kind="chat",
        messages=(ChatMessage(role="user", content="Name a colour."),),
        params=Params(max_tokens=8, temperature=0.0),
    )


async def _chat(
    node: Node,
    requests: Sequence[Request],
    pause_s: float,
    chats: _Chats,
    *,
    at_least: int | None = None,
    until: trio.Event | None = None,
    honest: Collection[str] = (),
) -> None:
    """Send ``requests`` one after another, ``pause_s`` apart; after ``at_least`` of them,
    stop once ``until`` is set. A synthetic answer must be exactly its words. A
    failure notes whether the consumer held an offer of one of the ``honest``
    providers for the model."""
    for n, request in enumerate(requests):
        if until is not None and until.is_set() and n >= (at_least or 0):
            return
        texts: list[str] = []

        async def deliver(text: str, _tokens: int, texts: list[str] = texts) -> None:
            texts.append(text)

        chats.requests += 1
        started = trio.current_time()
        chats.first_at = started if chats.first_at is None else chats.first_at
        try:
            with trio.fail_after(REQUEST_S):
                outcome = await node.generate(request, deliver)
        except (P2PNodeError, trio.TooSlowError) as exc:
            held = sum(
                (o := node.offer_book.get(p)) is not None and o.serves(request.model_id) is not None
                for p in honest
            )
            chats.failed_without_honest_offer += held == 0
            chats.failures.append(
                f"{short(node.peer_id)} request {n} ({held} honest offers held): {exc!r}"[:300]
            )
        else:
            text = "".join(texts)
            expected = WORD * request.params.max_tokens if request.model_id == SYNTHETIC else None
            if (
                (text == expected)
                if expected is not None
                else (outcome.completion_tokens > 0 and text)
            ):
                chats.ok += 1
                chats.seconds.append(trio.current_time() - started)
            else:
                chats.failures.append(
                    f"{short(node.peer_id)} request {n}: wrong text {text[:60]!r}"
                )
        chats.last_at = trio.current_time()
        await trio.sleep(pause_s)


@dataclass
class _Timer:
    """Wall seconds of each part of the run."""

    started: float = field(default_factory=time.perf_counter)
    parts: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.parts[name] = round(now - since, 2)
        return now


# --- the scenario -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizes:
    """How much of each thing the hostile scenario does (defaults: the full run)."""

    # Honest consumers that chat: each sends ``requests`` chats ``pause_s``
    # apart, then goes on at that pace while attacks still run, up to
    # ``max_requests`` (every third goes to the bundled model with ``model``).
    consumers: int = 6
    requests: int = 8
    max_requests: int = 60
    # Chats each consumer sends once the fuzzing is over.
    requests_after: int = 6
    pause_s: float = 3.0
    max_tokens: int = 16
    sybils: int = 4
    # Throwaway identities: all poison the DHT, relay_slots + 4 of them squat.
    identities: int = 24
    relay_slots: int = 8
    flood: int = 400
    flood_per_s: float = 50.0
    # Bound on the poisoned lookup and on asking the providers it named.
    lookup_s: float = 20.0
    # Requests the closed-session attacker sends in each dead session.
    after_close: int = 3
    # Frames fuzz() sends to an honest node that joins the network (in a
    # process of its own), within fuzz_s; its attackers in fuzz_processes
    # worker processes (0: in the node's).
    fuzz_frames: int = 100_000
    fuzz_s: float = 1800.0
    fuzz_processes: int = 1
    fuzz_attackers: int = 8
    # One more honest provider serving the bundled model (llama.cpp).
    model: bool = True
    # After every consumer knows every provider: the start-up storm passes.
    settle_s: float = 5.0
    # Readiness, the attacks with the chats, and the chats after fuzzing are
    # each bounded by this; the fuzzing by fuzz_s.
    bound_s: float = 600.0


@dataclass(frozen=True, slots=True)
class _Roles:
    """Which honest node (by its index in the topology) plays which part.

    Providers: the first relays, the last is private (behind it), the others
    are public: the first of those is the closed-session attacker's target
    (then a junk target), the second's offer is replayed in the offer flood
    (with fewer providers, roles share a node). Consumers: the first
    ``consumers`` chat, the last one is a junk target.
    """

    relay: int
    private: int | None
    closer_target: int
    flood_victim: int
    chatters: tuple[int, ...]
    junk_consumer: int | None

    @classmethod
    def of(cls, topology: Topology, sizes: Sizes) -> _Roles:
        providers = topology.provider_indices()
        private = providers[-1] if len(providers) > 1 else None
        public = [p for p in providers if p not in (providers[0], private)] or providers[:1]
        consumers = [i for i in range(topology.peers) if i not in providers]
        spare = consumers[sizes.consumers :]
        return cls(
            relay=providers[0],
            private=private,
            closer_target=public[0],
            flood_victim=public[1] if len(public) > 1 else public[0],
            chatters=tuple(consumers[: sizes.consumers]),
            junk_consumer=spare[-1] if spare else None,
        )


# What a Sybil claims: the fastest an offer may carry, or far beyond it.
MAX_CLAIM = offers.Config().max_tokens_per_s
ABSURD_CLAIM = 1e12


class _Run:
    """One run of the scenario: its nodes, its attacks and what they measured."""

    def __init__(
        self, topology: Topology, sizes: Sizes, chain: _Chain, nodes: Roster, timer: _Timer
    ) -> None:
        self.topology = topology
        self.sizes = sizes
        self.chain = chain
        self.nodes = nodes
        self.timer = timer
        self.roles = _Roles.of(topology, sizes)
        self.errors: list[str] = []
        self.rng = random.Random(topology.seed)  # noqa: S311 - topology and attack choices
        self.model_id: str | None = None
        self.relay_addr: str | None = None
        self.accounts: dict[str, list[LocalAccount]] = {}
        # What the attacks measured.
        self.chats = _Chats()
        self.junk = attacks.Junk()
        self.crash_offers = 0
        self.flood_sent: collections.Counter[str] = collections.Counter()
        self.squat: collections.Counter[str] = collections.Counter()
        self.dht_sent = 0
        self.liar = attacks.Liar()
        self.dht_targets: list[Node] = []
        self.dht_named: list[str] = []
        self.dht_lookup_s: float | None = None  # None: the lookup did not end within lookup_s
        self.after_close = session_attacks.AfterClose()
        self.fuzzed = fuzzing.Fuzzed()
        self.attack_s: dict[str, float] = {}
        self.takings: list[session_attacks.Takings] = []
        self.unresponsive: list[str] = []

    # --- roles ----------------------------------------------------------------

    def one(self, role: str) -> Member | None:
        held = self.nodes.of(role)
        return held[0] if held else None

    def providers(self) -> list[Member]:
        """Honest providers of the synthetic engine, in start order."""
        return [m for m in self.nodes.honest() if m.role in ("relay", "provider", "private")]

    def at(self, index: int) -> Member:
        """The honest node at ``index`` of the topology."""
        return next(m for m in self.nodes.honest() if m.index == index)

    def chatters(self) -> list[Member]:
        return [self.at(i) for i in self.roles.chatters]

    # --- starting -------------------------------------------------------------

    async def start_honest(self, accounts: list[LocalAccount]) -> None:
        """The honest network in waves, as :func:`open_simnet` starts one."""
        topology, roles = self.topology, self.roles
        provider_at = set(topology.provider_indices())

        async def one(i: int, bootstrap: tuple[str, ...]) -> None:
            config = NodeConfig(measure_tokens=0, market=PAID, bootstrap=bootstrap)
            role, engines = "consumer", []
            if i in provider_at:
                role, engines = "provider", [SyntheticEngine()]
            if i == roles.relay:
                role = "relay"
                config = replace(
                    config,
                    relay=relaylib.Config(service=True, max_reservations=self.sizes.relay_slots),
                )
            elif i == roles.private and self.relay_addr is not None:
                role = "private"
                config = replace(
                    config,
                    reachability="private",
                    relay=relaylib.Config(relays=(self.relay_addr,)),
                    relay_check_s=1.0,
                )
            member = await self.nodes.start(
                role, config, engines, honest=True, index=i, wallet=self.chain.wallet(accounts[i])
            )
            if role == "relay":
                self.relay_addr = member.node.addrs[0]

        first = 0
        while first < topology.peers:
            started = [m.node for m in self.nodes.honest()]
            size = 1 if first == 0 else min(topology.wave, len(started), topology.peers - first)
            earlier = [n for n in started if n.config.reachability != "private"] or started
            async with trio.open_nursery() as wave:
                for i in range(first, first + size):
                    sample = self.rng.sample(earlier, min(topology.fanout, len(earlier)))
                    wave.start_soon(one, i, tuple(n.addrs[0] for n in sample))
            first += size
        if roles.private is not None and self.one("private") is None:
            self.errors.append("the relay started with the private provider: no private provider")

    def _bootstrap(self) -> tuple[str, ...]:
        public = [m.node for m in self.nodes.honest() if m.node.config.reachability != "private"]
        return tuple(n.addrs[0] for n in self.rng.sample(public, min(2, len(public))))

    async def start_hostile(self, engine: Engine | None) -> None:
        """The llama provider (honest), then every attacker's node."""
        chain, sizes = self.chain, self.sizes
        if engine is not None:
            (account,) = self.accounts["llama"]
            config = NodeConfig(measure_tokens=0, market=PAID, bootstrap=self._bootstrap())
            await self.nodes.start(
                "llama", config, [engine], honest=True, wallet=chain.wallet(account)
            )
        for n, account in enumerate(self.accounts["sybil"]):
            served: list[Engine] = [SyntheticEngine()]
            if self.model_id is not None:
                served.append(SyntheticEngine(self.model_id))
            config = NodeConfig(
                measure_tokens=0,
                market=PAID,
                bootstrap=self._bootstrap(),
                # A real node that answers every Hello with BUSY.
                provider=providerlib.Config(max_handshakes=0),
            )
            member = await self.nodes.start(
                "sybil", config, served, honest=False, wallet=chain.wallet(account)
            )
            attacks.claim_speed(member.node, MAX_CLAIM if n % 2 == 0 else ABSURD_CLAIM)
        for n, account in enumerate(self.accounts["thief"]):
            config = NodeConfig(measure_tokens=0, market=PAID, bootstrap=self._bootstrap())
            member = await self.nodes.start(
                "thief", config, [SyntheticEngine()], honest=False, wallet=chain.wallet(account)
            )
            take = session_attacks.reject_after_open if n == 0 else session_attacks.stall_after_open
            self.takings.append(take(member.node))
        (account,) = self.accounts["closer"]
        config = NodeConfig(measure_tokens=0, market=PAID, bootstrap=self._bootstrap())
        await self.nodes.start("closer", config, honest=False, wallet=chain.wallet(account))
        for role in ("rogue", "liar"):
            config = NodeConfig(measure_tokens=0, bootstrap=self._bootstrap())
            await self.nodes.start(role, config, honest=False)
        throwaway = NodeConfig(measure_tokens=0, discovery=None, reachability="public")
        async with trio.open_nursery() as batch:
            for _ in range(sizes.identities):
                batch.start_soon(partial(self.nodes.start, "identity", throwaway, honest=False))

    def expected_offers(self) -> set[str]:
        """Providers whose offers every chatting consumer should hold before the attacks."""
        providers = {m.node.peer_id for m in self.providers() + self.nodes.of("llama")}
        sybils = self.nodes.of("sybil")[::2]  # those claiming MAX_CLAIM (the others are invalid)
        return providers | {m.node.peer_id for m in sybils + self.nodes.of("thief")}

    async def wait_ready(self) -> None:
        expected = self.expected_offers()
        private = self.one("private")
        chatters = [m.node for m in self.chatters()]

        def knows(node: Node) -> bool:
            held = {o.peer_id for o in node.offer_book}
            if private is not None:
                offer = node.offer_book.get(private.node.peer_id)
                if offer is None or not offer.addrs or not relaylib.is_circuit(offer.addrs[0]):
                    return False
            return expected - {node.peer_id} <= held

        if await wait_until(lambda: all(knows(n) for n in chatters), self.sizes.bound_s) is None:
            missing = sum(not knows(n) for n in chatters)
            self.errors.append(f"{missing} chatting consumers never held every offer")
        await trio.sleep(self.sizes.settle_s)

    # --- attacking ------------------------------------------------------------

    async def _timed(self, name: str, attack: Callable[[], Awaitable[None]]) -> None:
        """Run one attack, timing it; an attack that cannot go on is an error, not a crash."""
        started = time.perf_counter()
        try:
            await attack()
        except (P2PNodeError, trio.TooSlowError) as exc:
            self.errors.append(f"{name} attack stopped: {exc!r}"[:300])
        finally:
            self.attack_s[name] = round(time.perf_counter() - started, 2)

    async def attack(self) -> None:
        """The honest chats with every in-process attack at once (within ``bound_s``);
        then the fuzzing (within ``fuzz_s``); then ``requests_after`` more chats each.

        The fuzzed node and its attackers run in processes of their own and
        keep both of this machine's cores busy: chats meanwhile would measure
        the machine, not the network (in one full run, with the fuzzing beside
        them, half the honest requests failed to open a stream within 5 s).
        The chats after it show that the network still serves.
        """
        sizes = self.sizes
        attacks_done = trio.Event()

        async def every_attack() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._timed, "gossip", self._gossip)
                nursery.start_soon(self._timed, "closed_sessions", self._closed_sessions)
                nursery.start_soon(self._timed, "relay_squat", self._squat)
                nursery.start_soon(self._timed, "dht", self._dht)
            attacks_done.set()

        with trio.move_on_after(sizes.bound_s) as bound:
            async with trio.open_nursery() as nursery:
                for member in self.chatters():
                    nursery.start_soon(
                        partial(
                            self._chats,
                            member.node,
                            max(sizes.requests, sizes.max_requests),
                            at_least=sizes.requests,
                            until=attacks_done,
                        )
                    )
                nursery.start_soon(every_attack)
        if bound.cancelled_caught:
            self.errors.append(f"the attacks did not finish within {sizes.bound_s:g} s")
        with trio.move_on_after(sizes.fuzz_s + fuzzing.CHECKS_S * 5) as bound:
            await self._timed("fuzz", self._fuzz)
        if bound.cancelled_caught:
            self.errors.append(f"the fuzzing did not finish within {sizes.fuzz_s:g} s")
        with trio.move_on_after(sizes.bound_s) as bound:
            async with trio.open_nursery() as nursery:
                for member in self.chatters():
                    nursery.start_soon(self._chats, member.node, sizes.requests_after)
        if bound.cancelled_caught:
            self.errors.append(f"the chats after fuzzing did not finish within {sizes.bound_s:g} s")

    async def _chats(
        self,
        node: Node,
        count: int,
        *,
        at_least: int | None = None,
        until: trio.Event | None = None,
    ) -> None:
        """``count`` chats from ``node`` (every third to the bundled model, if any)."""
        sizes = self.sizes
        requests = [
            _bundled(self.model_id)
            if self.model_id is not None and n % 3 == 2
            else _synthetic(sizes.max_tokens)
            for n in range(count)
        ]
        honest = {m.node.peer_id for m in self.providers() + self.nodes.of("llama")}
        await _chat(
            node, requests, sizes.pause_s, self.chats, at_least=at_least, until=until, honest=honest
        )

    async def _gossip(self) -> None:
        """Crash offers, then the flood, from the rogue (its own validator removed)."""
        rogue = self._node("rogue")
        attacks.stop_validating_own_offers(rogue)
        for body in attacks.crash_offers(rogue, int(time.time() * 1000)):
            await attacks.publish(rogue, body)
            self.crash_offers += 1
        victim = self.at(self.roles.flood_victim).node
        assert victim.discovery is not None
        self.flood_sent = await attacks.flood_offers(
            rogue,
            victim.discovery.current_offer,
            self.sizes.flood,
            self.sizes.flood_per_s,
            self.rng,
        )

    async def _closed_sessions(self) -> None:
        """The closed-session attacker; then the hand-made malformed frames, on its target
        (an honest provider, once the sessions are measured) and a spare consumer."""
        closer = self._node("closer")
        (account,) = self.accounts["closer"]
        self.after_close = await session_attacks.use_closed_sessions(
            closer, self.at(self.roles.closer_target).node, self.chain.chain, account, SYNTHETIC,
            self.sizes.after_close,
        )  # fmt: skip
        targets = [self.at(self.roles.closer_target)]
        if self.roles.junk_consumer is not None:
            targets.append(self.at(self.roles.junk_consumer))
        for member in targets:
            if not member.ended.is_set():
                await attacks.junk_on_every_protocol(
                    self._node("rogue"), member.node, self.junk, member.ended
                )

    async def _squat(self) -> None:
        relay = self.one("relay")
        assert relay is not None
        squatters = [m.node for m in self.nodes.of("identity")[: self.sizes.relay_slots + 4]]
        self.squat = await attacks.squat_relay(squatters, relay.node)

    async def _dht(self) -> None:
        """Poison the model's key, lie in answers, then an honest node joins through the liar."""
        key = dht_key(SYNTHETIC)
        liar = self._node("liar")
        lures = [m.node.addrs[0] for m in self.chatters()]
        self.liar = attacks.answer_with_junk(liar, 20, lures)
        alive = {m.node.peer_id: m.node for m in self.nodes.honest() if not m.ended.is_set()}
        closest = sort_peer_ids_by_distance(key, [ID.from_base58(p) for p in alive])
        self.dht_targets = [alive[str(p)] for p in closest[:4]]
        limit = trio.CapacityLimiter(4)

        async def poison(identity: Node) -> None:
            async with limit:
                self.dht_sent += await attacks.add_junk_providers(identity, self.dht_targets, key)

        async with trio.open_nursery() as nursery:
            for member in self.nodes.of("identity"):
                nursery.start_soon(poison, member.node)
        (account,) = self.accounts["joiner"]
        boot = (liar.addrs[0], self.chatters()[0].node.addrs[0])
        config = NodeConfig(measure_tokens=0, market=PAID, bootstrap=boot)
        joiner = (
            await self.nodes.start("joiner", config, honest=True, wallet=self.chain.wallet(account))
        ).node
        discovery = joiner.discovery
        assert discovery is not None
        await wait_until(lambda: discovery.kademlia.dht.get_routing_table_size() > 0, 10)
        started = trio.current_time()
        with trio.move_on_after(self.sizes.lookup_s) as lookup:
            self.dht_named = await joiner.finder.find_providers(SYNTHETIC)
        self.dht_lookup_s = None if lookup.cancelled_caught else trio.current_time() - started
        with trio.move_on_after(self.sizes.lookup_s):
            await joiner.finder.discover(SYNTHETIC)
        honest = {m.node.peer_id for m in self.providers()}
        await _chat(joiner, [_synthetic(self.sizes.max_tokens)], 0.0, self.chats, honest=honest)

    async def _fuzz(self) -> None:
        """:func:`fuzzing.fuzz_joined`: an honest node that joins through public honest
        nodes, fuzzed in a process of its own while the rest goes on here."""
        sizes = self.sizes
        cfg = fuzzing.Config(
            frames=sizes.fuzz_frames,
            seconds=sizes.fuzz_s,
            processes=sizes.fuzz_processes,
            attackers=sizes.fuzz_attackers,
            seed=self.topology.seed,
        )
        await fuzzing.fuzz_joined(self._bootstrap(), cfg, self.fuzzed)

    def _node(self, role: str) -> Node:
        member = self.one(role)
        assert member is not None, role
        return member.node

    async def check_alive(self) -> None:
        """Every honest node that did not die must still answer status, within 10 s."""
        asker = next((m.node for m in self.chatters() if not m.ended.is_set()), None)
        if asker is None:
            self.errors.append("no chatting consumer is left to check the others")
            return
        limit = trio.CapacityLimiter(16)

        async def ask(member: Member) -> None:
            async with limit:
                try:
                    # By address: the asker need not have heard of every node.
                    addr = member.node.addrs[0]
                    peer = member.node.peer_id if relaylib.is_circuit(addr) else addr
                    with trio.fail_after(10):
                        await asker.finder.status_of(peer)
                except (P2PNodeError, trio.TooSlowError) as exc:
                    self.unresponsive.append(
                        f"{member.role} {short(member.node.peer_id)}: {exc!r}"[:200]
                    )

        async with trio.open_nursery() as nursery:
            for member in self.nodes.honest():
                if member.node is not asker and not member.ended.is_set():
                    nursery.start_soon(ask, member)

    async def settle_all(self, embedded: Embedded) -> None:
        """Move the chain past every session's end and let the honest providers claim
        what was acknowledged; then past the claim window, so that the consumers'
        stop closes the sessions nobody claimed (the thieves': paid nothing)."""
        chain = self.chain.chain
        await chain.run(embedded.time_travel, SESSION_S + 60)
        for member in self.nodes.honest():
            market = member.node.markets.provider
            if market is not None and not member.ended.is_set():
                try:
                    await market.settle()
                except P2PNodeError as exc:
                    self.errors.append(f"settling {short(member.node.peer_id)}: {exc!r}"[:300])
        await chain.run(embedded.time_travel, CLAIM_WINDOW_S + 60)

    # --- the report -----------------------------------------------------------

    def verdicts(self) -> dict[offers.Verdict, int]:
        """What every honest node's OfferBook made of the offers it was sent, so far."""
        out: collections.Counter[offers.Verdict] = collections.Counter()
        for member in self.nodes.honest():
            out.update(member.node.offer_book.verdicts)
        return dict(out)

    async def report(
        self, rss_before: float, verdicts_before: dict[offers.Verdict, int]
    ) -> dict[str, Any]:
        now = trio.current_time()
        honest = self.nodes.honest()
        alive = [m.node for m in honest if not m.ended.is_set()]
        hostile = [m for m in self.nodes.members if not m.honest]

        def offences(peers: list[Member], offence: Offence) -> int:
            total = 0
            for node in (m.node for m in honest):
                for peer in peers:
                    standing = node.reputation.standing(peer.node.peer_id, now)
                    total += standing.offences.get(offence.value, 0) if standing else 0
            return total

        banned_by = {
            m.node.peer_id: sum(n.reputation.banned(m.node.peer_id, now) for n in alive)
            for m in hostile
        }
        verdicts = self.verdicts()
        rejected = {
            v.value: verdicts.get(v, 0) - verdicts_before.get(v, 0)
            for v in offers.Verdict
            if not v.relay
        }
        sybils, thieves = self.nodes.of("sybil"), self.nodes.of("thief")
        chatters = [m.node for m in self.chatters()]
        held_offers = [
            offer
            for s in sybils
            for c in chatters
            if (offer := c.offer_book.get(s.node.peer_id)) is not None
        ]
        relay, private = self.one("relay"), self.one("private")
        key = dht_key(SYNTHETIC)
        identity_ids = {m.node.peer_id for m in self.nodes.of("identity")}
        honest_providers = {m.node.peer_id for m in self.providers() if not m.ended.is_set()}
        poison_held = kept_all = 0
        for target in self.dht_targets:
            if target.discovery is None:
                continue
            held = set(target.discovery.kademlia.dht.provider_store.providers.get(key, {}))
            poison_held += len(held & identity_ids)
            kept_all += honest_providers <= held
        closer_target = self.at(self.roles.closer_target).node.metrics()
        billing, served = closer_target.billing, closer_target.provider
        after = self.after_close
        fuzzed = self.fuzzed
        chats = self.chats
        rss_after = rss_mb()
        return {
            "scenario": "hostile",
            "peers": self.topology.peers,
            "providers": self.topology.providers,
            "engines": {
                "synthetic_providers": len(self.providers()),
                "bundled_model": self.model_id,
                "note": "honest providers serve the synthetic engine (inference/synthetic.py); "
                "with a model, one more serves it with llama.cpp",
            },
            "honest_requests": chats.requests,
            "honest_ok": chats.ok,
            "honest_request_s_median": round(statistics.median(chats.seconds), 2)
            if chats.seconds
            else None,
            "honest_request_s_max": round(max(chats.seconds), 2) if chats.seconds else None,
            "honest_failed_without_honest_offer": chats.failed_without_honest_offer,
            "honest_chat_window_s": round((chats.last_at or 0.0) - (chats.first_at or 0.0), 1),
            "node_exits": sum(m.failure is not None for m in honest),
            "node_exit_reasons": [
                f"{m.role} {short(m.node.peer_id)}: {m.failure}" for m in honest if m.failure
            ],
            "hostile_node_exits": [
                f"{m.role} {short(m.node.peer_id)}: {m.failure}" for m in hostile if m.failure
            ],
            "unresponsive_nodes": list(self.unresponsive),
            "served_after_close_s": round(after.served_s, 3),
            "served_after_close_tokens": after.tokens,
            "served_after_close_by_kind": {
                k: {"seconds": round(sec, 3), "tokens": n}
                for k, (sec, n) in after.served_by_kind.items()
            },
            "expired_session_chain_s_past_end": after.expired_chain_past_end_s,
            "expired_session_provider_view_s_past_end": after.expired_provider_view_s,
            "closed_session_requests": after.requests,
            "closed_session_refused": after.refused,
            "closed_session_failed": after.failed,
            "closed_session_paid_tokens": after.before_close_tokens,
            "in_flight_stop_after_close_s": None
            if after.in_flight_stop_s is None
            else round(after.in_flight_stop_s, 2),
            "in_flight_tokens_after_close": after.in_flight_tokens_after,
            "in_flight_note": "a request already running when its session closes on chain is "
            "stopped when the provider next reads the chain (ProviderMarket follow_s, 5 s)",
            "provider_closed_early": billing.closed_early if billing else None,
            "provider_ended_mid_request": served.ended_mid_request if served else None,
            "paid_without_service_note": "a provider is paid only for time its consumer "
            "acknowledged (signed Usage): a thief that takes the open and serves nothing "
            "can claim nothing, and the consumer's stake comes back once the claim window "
            "after the session's end has passed (the run moves the chain's clock there)",
            "thief_sessions_opened": [t.sessions for t in self.takings],
            "thief_paid_no_service_offences": offences(thieves, Offence.PAID_NO_SERVICE),
            "sybil_refusals": offences(sybils, Offence.REFUSED),
            "sybil_sessions": sum(
                p.sessions for s in sybils if (p := s.node.metrics().provider) is not None
            ),
            "sybil_offers_held_by_chatters": len(held_offers),
            # An offer claiming more than the bound is INVALID everywhere: a Sybil's
            # earlier, valid offer may still be held, never the absurd one.
            "sybil_absurd_claims_held": sum(
                m.tokens_per_s > MAX_CLAIM for o in held_offers for m in o.models
            ),
            "crash_offers_sent": self.crash_offers,
            "flood_offers_sent": dict(self.flood_sent),
            "invalid_offers": rejected[offers.Verdict.INVALID.value],
            "offers_rejected": rejected,
            "junk_frames": self.junk.frames,
            "junk_streams_unopened": self.junk.unopened,
            "junk_targets_unreachable": self.junk.unreachable,
            "junk_protocols": sorted(self.junk.protocols),
            "relay_squat_answers": dict(sorted(self.squat.items())),
            "relay_reservations_refused": sum(
                n for k, n in self.squat.items() if not k.endswith("_ok")
            ),
            "relay_made_up_ids_granted": self.squat["made_up_ok"],
            "relay_squatters_granted": self.squat["own_ok"],
            "relay_counters": vars(relay.node.metrics().relay_service) if relay else None,
            "relay_honest_reservation_kept": bool(
                private is not None
                and relay is not None
                and not private.ended.is_set()
                and relay.node.peer_id in private.node.relay.reservations
            ),
            "dht_poison_sent": self.dht_sent,
            "dht_poison_records": poison_held,
            "dht_targets": len(self.dht_targets),
            "dht_targets_keeping_every_honest_record": kept_all,
            "dht_liar_answers": self.liar.answers,
            "dht_lookup_s": None if self.dht_lookup_s is None else round(self.dht_lookup_s, 2),
            "dht_lookup_named": len(self.dht_named),
            "dht_lookup_named_junk": len(set(self.dht_named) - honest_providers),
            "dht_lookup_named_honest": len(set(self.dht_named) & honest_providers),
            "banned_peers": sum(1 for n in banned_by.values() if n),
            "banned_by_role": dict(
                collections.Counter(m.role for m in hostile if banned_by[m.node.peer_id])
            ),
            "hostile_peers": dict(collections.Counter(m.role for m in hostile)),
            "fuzz_frames": fuzzed.frames,
            "fuzz_node_exits": fuzzed.exits,
            "fuzz_targets": fuzzed.targets,
            "fuzz_frames_per_protocol": dict(
                sum((collections.Counter(r.frames) for r in fuzzed.rounds), collections.Counter())
            ),
            "fuzz_seconds": round(sum(r.seconds for r in fuzzed.rounds), 1),
            "fuzz_rounds": len(fuzzed.rounds),
            "fuzz_rounds_cut_short": fuzzed.cut_short,
            "fuzz_skipped_kinds": sorted(fuzzed.skip),
            "fuzz_attackers_rotated": sum(r.attackers_rotated for r in fuzzed.rounds),
            "fuzz_status_ok": all(r.status_ok for r in fuzzed.rounds) if fuzzed.rounds else None,
            "fuzz_chat_ok": all(bool(r.chat_ok) for r in fuzzed.rounds) if fuzzed.rounds else None,
            "fuzz_rss_growth_mb": [
                round(r.rss_after_mb - r.rss_before_mb, 1) for r in fuzzed.rounds
            ],
            "fuzz_crashes": [
                {
                    "protocol": c.protocol,
                    "kind": c.kind,
                    "summary": c.summary,
                    "frame_hex": c.frame_hex[:200],
                }
                for c in fuzzed.crashes
            ],
            "rss_growth_mb": round(rss_after - rss_before, 1),
            "attack_s": dict(self.attack_s),
            "errors": self.errors
            + [f"honest request failed: {f}" for f in chats.failures]
            + after.errors
            + [f"fuzz: {e}" for r in fuzzed.rounds for e in r.errors if not _paid_mode_chat(e)],
            "fuzz_notes": fuzzed.notes
            + [
                "fuzz's own after-check chat is a free-mode consumer; these paid providers "
                f"refuse it (payment required): {e}"
                for r in fuzzed.rounds
                for e in r.errors
                if _paid_mode_chat(e)
            ],
        }


def _paid_mode_chat(error: str) -> bool:
    """Whether a fuzz error is its free-mode chat refused by a paid provider (not a failure)."""
    return error.startswith("no honest chat after fuzzing") and "payment_required" in error


async def hostile(topology: Topology, sizes: Sizes | None = None) -> dict[str, Any]:
    """Run honest paid traffic and every attack at once; report (see the module docstring).

    ``topology`` is the honest network; its providers serve the synthetic
    engine. Needs at least one provider; four or more give every role its
    own node (relay, closed-session target, fuzz target, private provider),
    with fewer some share one.
    """
    from p2pnode.inference import llamacpp

    sizes = sizes or Sizes()
    timer = _Timer()
    provider_at = topology.provider_indices()
    if not provider_at or topology.providers >= topology.peers:
        raise ConfigError("the hostile scenario needs providers, and fewer than peers")
    embedded = await trio.to_thread.run_sync(open_embedded)
    chain = _Chain(embedded, AsyncChain(embedded.chain))
    model_id = llamacpp.BUNDLED_MODEL_ID if sizes.model else None
    accounts = [await chain.account() for _ in range(topology.peers)]
    for i in provider_at:
        await chain.provider(accounts[i], f"honest-{i}", {SYNTHETIC: HONEST_PRICE + i})
    roles = {"thief": 2, "sybil": sizes.sybils, "llama": 1, "closer": 1, "joiner": 1}
    hostile_accounts = {r: [await chain.account() for _ in range(n)] for r, n in roles.items()}
    cheap = {SYNTHETIC: CHEAP_PRICE} | ({model_id: CHEAP_PRICE} if model_id else {})
    for n, account in enumerate(hostile_accounts["sybil"]):
        await chain.provider(account, f"sybil-{n}", cheap)
    for n, account in enumerate(hostile_accounts["thief"]):
        await chain.provider(account, f"thief-{n}", {SYNTHETIC: CHEAP_PRICE})
    if model_id is not None:
        (account,) = hostile_accounts["llama"]
        await chain.provider(account, "honest-llama", {model_id: HONEST_PRICE})
    takers = hostile_accounts["thief"] + hostile_accounts["sybil"]
    before = [await chain.balance(a) for a in takers]
    mark = timer.mark("setup_s", timer.started)
    async with AsyncExitStack() as stack:
        engine: Engine | None = None
        if model_id is not None:
            engine_cfg = llamacpp.Config(
                model_path=llamacpp.bundled_model_path(), model_id=model_id, n_threads=1, slots=2
            )
            engine = await stack.enter_async_context(llamacpp.open_llamacpp(engine_cfg))
        nursery = await stack.enter_async_context(trio.open_nursery())
        nodes = Roster(topology, nursery)
        run = _Run(topology, sizes, chain, nodes, timer)
        run.model_id = model_id
        run.accounts = hostile_accounts
        try:
            await run.start_honest(accounts)
            await run.start_hostile(engine)
            mark = timer.mark("start_s", mark)
            await run.wait_ready()
            mark = timer.mark("ready_s", mark)
            rss_before, verdicts_before = rss_mb(), run.verdicts()
            await run.attack()
            mark = timer.mark("attacks_s", mark)
            await run.check_alive()
            mark = timer.mark("alive_s", mark)
            report = await run.report(rss_before, verdicts_before)
            mark = timer.mark("report_s", mark)
            await run.settle_all(embedded)
            mark = timer.mark("settle_s", mark)
        finally:
            with trio.CancelScope(shield=True):
                await nodes.stop_all()
            nursery.cancel_scope.cancel()
    timer.mark("stop_s", mark)
    # Every consumer closed its sessions as it stopped: the chain's books are final.
    paid = [await chain.balance(a) - b for a, b in zip(takers, before, strict=True)]
    escrowed, paid_wei, refunded_wei = embedded.chain.totals()
    held = embedded.chain.balance(embedded.chain.market.address)
    thieves = len(hostile_accounts["thief"])
    report["paid_without_service_wei"] = sum(paid)
    report["paid_to_thieves_wei"] = paid[:thieves]
    report["paid_to_sybils_wei"] = paid[thieves:]
    report["escrow_invariant_ok"] = (
        escrowed == paid_wei + refunded_wei and held == chain.registered * MIN_PROVIDER_STAKE
    )
    report["goals_met"] = {
        "honest_ok": report["honest_ok"] == report["honest_requests"],
        "node_exits": report["node_exits"] == 0,
        "served_after_close_s": report["served_after_close_s"] == 0,
        "paid_without_service_wei": report["paid_without_service_wei"] == 0,
        "fuzz_frames": report["fuzz_frames"] >= sizes.fuzz_frames,
        "fuzz_node_exits": report["fuzz_node_exits"] == 0,
    }
    report["wall_s"] = timer.parts | {"total_s": round(time.perf_counter() - timer.started, 2)}
    report["stop_s_max_by_role"] = {r: round(t, 2) for r, t in sorted(nodes.stop_s.items())}
    return report
