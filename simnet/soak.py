"""The soak scenario: a network left running with steady traffic, watched for slow rot.

Leaks, gossip that stops reaching everyone, and honest peers that slowly
collect penalties show only over time. This runs a network for ``minutes``
with chats, gossip re-announcements, DHT lookups and the nodes' own sweeps,
and reports how memory, delivery and gossip scores drift.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import trio

from p2pnode.errors import P2PNodeError
from p2pnode.inference.engine import Engine, Params, Request
from p2pnode.p2p.node import Node, NodeConfig
from p2pnode.protocols import offers
from p2pnode.simnet.harness import Simnet, Topology, open_bundled, open_simnet, rss_mb
from p2pnode.simnet.scenarios import wait_until

# A chat every this often (from a consumer picked at random), and a DHT
# lookup every this often: steady, light traffic, as an idle network has.
CHAT_EVERY_S = 2.0
LOOKUP_EVERY_S = 10.0
# Memory is sampled this many times over the run; the first quarter is
# warm-up (caches filling, connections settling) and not in the slope.
SAMPLES = 40


async def soak(
    topology: Topology, engine: Engine, model_id: str, *, minutes: float
) -> dict[str, Any]:
    """Run the network ``minutes`` with traffic; report its drift.

    - ``rss_growth_mb_per_node_per_hour``: the slope of this process's
      resident memory after warm-up (least squares), per node.
    - ``offers_delivered_ratio``: at the end, the share of (node, provider)
      pairs where the node holds the provider's latest offer.
    - ``honest_peers_penalized``: (node, peer) pairs in which gossipsub's
      scorer holds an invalid-message count against the peer at the end
      (every peer here is honest: a count is our validator rejecting what an
      honest peer forwarded, which a scorer with a P4 weight would punish);
      ``honest_peers_graylisted``: pairs the scorer graylists, 0 while our
      score thresholds are py-libp2p's permissive defaults.
    - ``chats``, ``chats_failed``, ``lookups``, ``lookups_incomplete``, ``errors``.
    """
    errors: list[str] = []
    duration = minutes * 60
    samples: list[tuple[float, float]] = []
    counts = {"chats": 0, "chats_failed": 0, "lookups": 0, "lookups_incomplete": 0}
    rng = random.Random(topology.seed)  # noqa: S311 - traffic, not cryptography

    def config_for(_index: int, _is_provider: bool) -> NodeConfig:
        # No audits: each auditing node loads its own copy of the model on
        # its first audit (~250 MB), which in one process of tens of nodes
        # is gigabytes arriving over the run, and would read as a leak.
        # The audit scenario measures audits.
        return NodeConfig(measure_tokens=0, audit=None)

    async with open_simnet(topology, config_for, engines=[engine]) as (net, _nursery):
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_chats, net, model_id, rng, counts, errors)
            nursery.start_soon(_lookups, net, model_id, rng, counts)
            for _ in range(SAMPLES):
                samples.append((time.perf_counter() - started, rss_mb()))
                await trio.sleep(duration / SAMPLES)
            samples.append((time.perf_counter() - started, rss_mb()))
            nursery.cancel_scope.cancel()
        delivered = await _delivered(net, bound_s=5.0)
        penalized, graylisted = _scores(net)
    warm = samples[len(samples) // 4 :]
    growth = None
    if len(warm) >= 3:
        slope = statistics.linear_regression([t for t, _ in warm], [m for _, m in warm]).slope
        growth = round(slope * 3600 / topology.peers, 3)
    return {
        "scenario": "soak",
        "peers": topology.peers,
        "providers": topology.providers,
        "minutes": minutes,
        "rss_mb": [round(m, 1) for _, m in samples],
        "rss_growth_mb_per_node_per_hour": growth,
        "offers_delivered_ratio": delivered,
        "honest_peers_penalized": penalized,
        "honest_peers_graylisted": graylisted,
        **counts,
        "offers_rejected": {
            v.value: sum(n.offer_book.verdicts[v] for n in net.nodes)
            for v in offers.Verdict
            if not v.relay
        },
        "errors": errors[:20],
    }


async def _chats(
    net: Simnet, model_id: str, rng: random.Random, counts: dict[str, int], errors: list[str]
) -> None:
    params = Params(max_tokens=8, temperature=0.0)
    request = Request(model_id=model_id, kind="completion", prompt="Hello", params=params)

    async def ignore(_text: str, _tokens: int) -> None:
        pass

    while True:
        consumer = rng.choice(net.consumers)
        counts["chats"] += 1
        try:
            await consumer.generate(request, ignore)
        except P2PNodeError as exc:
            counts["chats_failed"] += 1
            errors.append(f"chat from {consumer.peer_id[-8:]}: {exc}")
        await trio.sleep(CHAT_EVERY_S)


async def _lookups(net: Simnet, model_id: str, rng: random.Random, counts: dict[str, int]) -> None:
    while True:
        await trio.sleep(LOOKUP_EVERY_S)
        node = rng.choice(net.consumers)
        counts["lookups"] += 1
        found = await node.finder.find_providers(model_id)
        if not net.provider_ids <= set(found):
            counts["lookups_incomplete"] += 1


def _latest(provider: Node) -> int | None:
    discovery = provider.discovery
    if discovery is None or not discovery.current_offer:
        return None
    return offers.GOSSIP_CODEC.decode(discovery.current_offer).seq  # type: ignore[attr-defined, no-any-return]


async def _delivered(net: Simnet, *, bound_s: float) -> float:
    """Share of (node, provider) pairs holding the provider's latest offer, given
    ``bound_s`` for one just published to arrive."""

    def share() -> float:
        pairs = held = 0
        for provider in net.providers:
            latest = _latest(provider)
            for node in net.nodes:
                if node is provider:
                    continue
                pairs += 1
                offer = node.offer_book.get(provider.peer_id)
                held += offer is not None and offer.seq == latest
        return held / pairs if pairs else 1.0

    await wait_until(lambda: share() == 1.0, bound_s)
    return round(share(), 4)


def _scores(net: Simnet) -> tuple[int, int]:
    penalized = graylisted = 0
    for node in net.nodes:
        if node.discovery is None:
            continue
        scorer = node.discovery.router.scorer
        if scorer is None:
            continue
        for other in net.nodes:
            peer = other.host.get_id()
            if any(scorer.invalid_messages.get(peer, {}).values()):
                penalized += 1
            if scorer.is_graylisted(peer, [offers.TOPIC]):
                graylisted += 1
    return penalized, graylisted


async def soak_scenario(topology: Topology, *, minutes: float) -> dict[str, Any]:
    """:func:`soak` with the bundled model, two slots shared by every provider."""
    from p2pnode.inference.llamacpp import BUNDLED_MODEL_ID

    async with open_bundled(slots=2) as engine:
        return await soak(topology, engine, BUNDLED_MODEL_ID, minutes=minutes)
