"""Churn: a provider that restarts with its identity on a new address is reached
there as soon as its new offer arrives, on real TCP on loopback.

py-libp2p's swarm remembers for a minute that every address it knew of a
peer failed (its negative dial cache), and the peerstore keeps the old
address for as long as its TTL: before the new offer's addresses went into
the peerstore and lifted that memory, a consumer refused to dial the
restarted provider (docs/libp2p-traps.md#a-restarted-peer-and-the-negative-dial-cache).
"""

from __future__ import annotations

import time

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from p2pnode.errors import NoProviderError
from p2pnode.inference.engine import Params, Request
from p2pnode.inference.synthetic import SyntheticEngine
from p2pnode.p2p.node import NodeConfig
from p2pnode.simnet.harness import hold_offers, start_node

BOUND_S = 60


async def _text(deliveries: list[str], text: str, _tokens: int) -> None:
    deliveries.append(text)


async def test_a_provider_back_on_a_new_port_is_reached_at_its_new_address() -> None:
    request = Request(model_id="synthetic", kind="completion", prompt="x",
                      params=Params(max_tokens=4))  # fmt: skip
    key = create_new_key_pair()
    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            hub = (await start_node(nursery, NodeConfig(measure_tokens=0))).node
            near_hub = NodeConfig(measure_tokens=0, bootstrap=(hub.addrs[0],))
            first = await start_node(nursery, near_hub, [SyntheticEngine()], key_pair=key)
            consumer = (await start_node(nursery, near_hub)).node
            await consumer.dialer.connect(first.node.addrs[0])
            await hold_offers(consumer, [first.node])
            old_addrs = first.node.addrs
            said: list[str] = []
            served = await consumer.generate(request, lambda t, n: _text(said, t, n))
            assert served.provider == first.node.peer_id

            await first.stop()  # the process dies; its address is dead
            with pytest.raises(NoProviderError):  # and the swarm remembers it failed
                await consumer.generate(request, lambda t, n: _text(said, t, n))

            # Back, with its identity, on another port; its new offer reaches the
            # consumer by gossip (through the hub: the consumer does not dial it).
            again = await start_node(nursery, near_hub, [SyntheticEngine()], key_pair=key)
            assert again.node.addrs != old_addrs
            assert again.node.discovery is not None
            offer = again.node.discovery.current_offer
            consumer.offer_book.consider(offer, source=again.node.peer_id, now=time.time())
            said.clear()
            served = await consumer.generate(request, lambda t, n: _text(said, t, n))
            assert served.provider == again.node.peer_id
            assert said
            nursery.cancel_scope.cancel()
