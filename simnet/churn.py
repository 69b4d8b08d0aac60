"""The churn scenario: providers die and come back while consumers stream answers.

A user of the network should not notice a provider going away mid-answer:
the consumer continues the answer on another provider from the text so far
(docs/architecture.md#failover), and a provider that comes back, with its
identity on a new port, is found again. This scenario measures both with
the bundled model, greedy, so that every answer can be checked word for word
against the answer the engine gives when nothing fails.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.crypto.keys import KeyPair

from p2pnode.errors import P2PNodeError
from p2pnode.inference.engine import Engine, Params, Request, collect
from p2pnode.p2p.node import Node, NodeConfig
from p2pnode.simnet.harness import Simnet, Topology, add_node, open_bundled, open_simnet
from p2pnode.simnet.scenarios import wait_until

# Completion prompts the consumers cycle through: different answers, each
# checked against its own reference.
PROMPTS = (
    "The history of the printing press",
    "How bees make honey",
    "The first railway",
    "Why the sky is blue",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """How much traffic and how much churn."""

    requests: int = 200
    consumers: int = 4
    max_tokens: int = 24
    # Of the providers, at most this share is down or churning at any time:
    # each of that many cycles kills one, starts it again, and goes on.
    churn_share: float = 0.3
    # A churned provider lives this long (uniformly at random) before it is
    # killed, and stays dead this long before it starts again.
    alive_s: tuple[float, float] = (2.0, 6.0)
    down_s: float = 1.0
    bound_s: float = 600.0


@dataclass
class _Tally:
    completed: int = 0
    wrong: list[str] = field(default_factory=list)  # what went wrong, per request
    failovers: int = 0
    gaps_ms: list[float] = field(default_factory=list)
    first_token_ms: list[float] = field(default_factory=list)  # answers with no failover
    rejoin_s: list[float] = field(default_factory=list)
    kills: int = 0
    killed_serving: int = 0  # kills of a provider that was serving an answer
    restarts: int = 0
    errors: list[str] = field(default_factory=list)


async def churn(topology: Topology, engine: Engine, model_id: str, plan: Plan) -> dict[str, Any]:
    """Run ``plan.requests`` streaming requests while a share of providers churns.

    Reports ``requests``, ``completed`` (answers that ended without an
    error), ``lost_or_repeated_text`` (answers whose text differs from the
    greedy reference: a lost or repeated piece at a failover), ``failovers``,
    ``failover_gap_ms_median``/``_max`` (in answers that failed over
    mid-stream, the longest pause between two pieces of text: the last from
    the provider that died to the first from the one that took over),
    ``first_token_ms_median`` (the same run's baseline: from asking to the
    first text, in answers that needed no failover),
    ``kills`` (``kills_of_a_serving_provider``: of one serving an answer then)
    and ``rejoin_s_median`` (from a restart until every consumer
    holds the provider's new offer, at its new address; ``rejoins_unmeasured``:
    restarts killed again, or not found within 60 s, before that).

    A kill here is a process exit: the provider's connections close at
    once, so the gap holds no time for noticing a silent provider (the
    failover tests cover hung ones).
    """
    params = Params(max_tokens=plan.max_tokens, temperature=0.0)
    # The engine's own greedy answers, with nothing in between.
    references = {}
    for prompt in PROMPTS:
        asked = Request(model_id=model_id, kind="completion", prompt=prompt, params=params)
        references[prompt] = (await collect(engine, asked))[0]
    tally = _Tally()

    def config_for(_index: int, _is_provider: bool) -> NodeConfig:
        return NodeConfig(measure_tokens=0)

    async with open_simnet(topology, config_for, engines=[engine]) as (net, nursery):
        consumers = net.consumers[: plan.consumers]
        if await wait_until(lambda: _every_offer_held(net, consumers), 60.0) is None:
            tally.errors.append("the consumers never held every provider's offer")
        # At most this many providers are down or churning at once.
        cycles = max(1, math.ceil(plan.churn_share * len(net.providers)))
        todo = iter(range(plan.requests))
        churning: set[str] = set()
        with trio.move_on_after(plan.bound_s) as scope:
            async with trio.open_nursery() as killers:
                for i in range(cycles):
                    killers.start_soon(_cycle, net, nursery, churning, consumers, plan, tally, i)
                async with trio.open_nursery() as users:
                    for consumer in consumers:
                        users.start_soon(_ask, consumer, todo, model_id, params, references, tally)
                killers.cancel_scope.cancel()
        if scope.cancelled_caught:
            tally.errors.append(f"the requests did not finish within {plan.bound_s:.0f} s")
    gaps = tally.gaps_ms
    return {
        "scenario": "churn",
        "peers": topology.peers,
        "providers": topology.providers,
        "churned_providers": cycles,
        "consumers": len(consumers),
        "requests": plan.requests,
        "completed": tally.completed,
        "lost_or_repeated_text": len(tally.wrong),
        "failovers": tally.failovers,
        "failover_gap_ms_median": round(statistics.median(gaps), 1) if gaps else None,
        "failover_gap_ms_max": round(max(gaps), 1) if gaps else None,
        "failover_gaps_ms": sorted(round(g, 1) for g in gaps),
        "first_token_ms_median": (
            round(statistics.median(tally.first_token_ms), 1) if tally.first_token_ms else None
        ),
        "kills": tally.kills,
        "kills_of_a_serving_provider": tally.killed_serving,
        "rejoin_s_median": (
            round(statistics.median(tally.rejoin_s), 3) if tally.rejoin_s else None
        ),
        "rejoin_s": sorted(round(s, 3) for s in tally.rejoin_s),
        "rejoins_unmeasured": tally.restarts - len(tally.rejoin_s),
        "wrong_answers": tally.wrong[:10],
        "errors": tally.errors,
    }


def _every_offer_held(net: Simnet, consumers: list[Node]) -> bool:
    return all(c.offer_book.get(p.peer_id) is not None for c in consumers for p in net.providers)


async def _ask(
    consumer: Node,
    todo: Any,
    model_id: str,
    params: Params,
    references: dict[str, str],
    tally: _Tally,
) -> None:
    """Send requests one after another until there are none left to send."""
    for number in todo:
        prompt = PROMPTS[number % len(PROMPTS)]
        request = Request(model_id=model_id, kind="completion", prompt=prompt, params=params)
        parts: list[str] = []
        times: list[float] = []

        async def deliver(
            text: str, _tokens: int, parts: list[str] = parts, times: list[float] = times
        ) -> None:
            parts.append(text)
            times.append(time.perf_counter())

        asked = time.perf_counter()
        try:
            outcome = await consumer.generate(request, deliver)
        except P2PNodeError as exc:
            tally.errors.append(f"request {number} failed: {type(exc).__name__}: {exc}")
            continue
        tally.completed += 1
        text = "".join(parts)
        if text != references[prompt]:
            tally.wrong.append(f"request {number}: {text!r} != {references[prompt]!r}")
        if outcome.failovers:
            tally.failovers += outcome.failovers
            if len(times) >= 2:
                tally.gaps_ms.append(max(b - a for a, b in itertools.pairwise(times)) * 1000)
        elif times:
            tally.first_token_ms.append((times[0] - asked) * 1000)


async def _cycle(
    net: Simnet,
    nursery: trio.Nursery,
    churning: set[str],
    consumers: list[Node],
    plan: Plan,
    tally: _Tally,
    seed: int,
) -> None:
    """Kill a provider at a random moment, start it again, and again, until cancelled.

    Each time the victim is one serving an answer at that moment, if any
    (none that another cycle holds down): consumers spread over alike
    providers and keep the one they hold a session with, so a fixed set of
    victims would soon serve nobody and the scenario would measure no
    failover at all.
    """
    rng = random.Random(net.topology.seed * 1000 + seed)  # noqa: S311 - a schedule, not a secret
    while True:
        await trio.sleep(rng.uniform(*plan.alive_s))
        live = [p for p in net.providers if p.peer_id not in churning]
        if not live:
            continue
        serving = [p for p in live if p.provider is not None and p.provider.streams.active]
        node = rng.choice(serving or live)
        churning.add(node.peer_id)
        key = KeyPair(node.host.get_private_key(), node.host.get_public_key())
        config, engines = node.config, node.offering.engines
        net.kill(node)
        tally.kills += 1
        tally.killed_serving += bool(serving)
        await trio.sleep(plan.down_s)
        # Back with its identity on a new port, through nodes that stayed up.
        entry = rng.sample(consumers, min(2, len(consumers)))
        again = NodeConfig(
            models=config.models,
            measure_tokens=0,
            bootstrap=tuple(c.addrs[0] for c in entry),
        )
        started = time.perf_counter()
        node = await add_node(net, nursery, again, engines, key_pair=key)
        churning.discard(node.peer_id)
        tally.restarts += 1
        nursery.start_soon(_time_rejoin, node, consumers, started, tally)


async def _time_rejoin(node: Node, consumers: list[Node], started: float, tally: _Tally) -> None:
    """Seconds until every consumer holds ``node``'s offer at its new address."""

    def found() -> bool:
        for consumer in consumers:
            offer = consumer.offer_book.get(node.peer_id)
            if offer is None or tuple(offer.addrs) != tuple(node.addrs):
                return False
        return True

    if await wait_until(found, 60.0) is not None:
        tally.rejoin_s.append(time.perf_counter() - started)


PEERS = 16
"""Peers when the command line names none: 10 providers (3 churned), 6 other nodes."""
PROVIDERS = 10


async def churn_scenario(topology: Topology, plan: Plan | None = None) -> dict[str, Any]:
    """:func:`churn` with the bundled model, four slots shared by every provider."""
    from p2pnode.inference.llamacpp import BUNDLED_MODEL_ID

    async with open_bundled(slots=4) as engine:
        return await churn(topology, engine, BUNDLED_MODEL_ID, plan or Plan())
