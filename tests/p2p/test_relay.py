"""Private providers served through a circuit relay v2 to consumers, in process."""

from __future__ import annotations

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from p2pnode.errors import NetworkError
from p2pnode.inference.engine import ChatMessage, Params, Request, collect
from p2pnode.inference.llamacpp import BUNDLED_MODEL_ID, Config, bundled_model_path, open_llamacpp
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p.node import Node, NodeConfig, open_node

pytestmark = pytest.mark.slow
BOUND_S = 30
REQUEST = Request(
    model_id=BUNDLED_MODEL_ID,
    kind="chat",
    messages=(ChatMessage(role="user", content="What is the capital of France?"),),
    params=Params(max_tokens=16, temperature=0.0),
)


def _private(relay_addr: str) -> NodeConfig:
    return NodeConfig(
        measure_tokens=0,
        bootstrap=(relay_addr,),
        reachability="private",
        relay=relaylib.Config(relays=(relay_addr,)),
    )


async def test_a_private_provider_is_served_through_a_relay() -> None:
    engine_cfg = Config(model_path=bundled_model_path(), model_id=BUNDLED_MODEL_ID, n_threads=1)
    async with (
        open_llamacpp(engine_cfg) as engine,
        open_node(
            NodeConfig(relay=relaylib.Config(service=True)), key_pair=create_new_key_pair()
        ) as relay,
        open_node(
            _private(relay.addrs[0]), key_pair=create_new_key_pair(), engines=[engine]
        ) as provider,
        open_node(NodeConfig(bootstrap=(relay.addrs[0],)), key_pair=create_new_key_pair()) as me,
    ):
        expected, _ = await collect(engine, REQUEST)
        with trio.fail_after(BOUND_S):
            # The provider advertises only its address through the relay.
            while not provider.addrs or not relaylib.is_circuit(provider.addrs[0]):  # noqa: ASYNC110
                await trio.sleep(0.05)
            assert provider.addrs == [f"{relay.addrs[0]}/p2p-circuit/p2p/{provider.peer_id}"]
            while True:
                offer = me.offer_book.get(provider.peer_id)
                if offer is not None and offer.addrs == tuple(provider.addrs):
                    break
                await trio.sleep(0.05)
            parts: list[str] = []

            async def deliver(text: str, _tokens: int) -> None:
                parts.append(text)

            outcome = await me.generate(REQUEST, deliver)
        assert "".join(parts) == expected
        assert outcome.provider == provider.peer_id
        # The consumer never had a direct address for the provider: the
        # connection it used is the relayed one.
        assert ID.from_base58(provider.peer_id) in me.host.get_connected_peers()
        assert not [a for a in (offer.addrs if offer else ()) if not relaylib.is_circuit(a)]


async def test_the_relay_enforces_its_reservation_limit() -> None:
    relay_cfg = NodeConfig(relay=relaylib.Config(service=True, max_reservations=1))
    async with (
        open_node(relay_cfg, key_pair=create_new_key_pair()) as relay,
        open_node(_private(relay.addrs[0]), key_pair=create_new_key_pair()) as first,
        open_node(NodeConfig(), key_pair=create_new_key_pair()) as second,
        trio.open_nursery() as nursery,
    ):
        with trio.fail_after(BOUND_S):
            while not first.relay.reservations:  # noqa: ASYNC110
                await trio.sleep(0.05)
            # The one slot is taken: a second node's reservation is refused.
            with pytest.raises(NetworkError, match="refused the reservation"):
                await second.relay.reserve(relay.addrs[0], nursery)
        assert second.relay.reservations == {}
        nursery.cancel_scope.cancel()


async def _start(nursery: trio.Nursery, cfg: NodeConfig) -> tuple[Node, trio.CancelScope]:
    """A node in its own task, with a scope that stops it as if its process died."""
    scope = trio.CancelScope()
    started: list[Node] = []
    ready = trio.Event()

    async def run() -> None:
        with scope:
            async with open_node(cfg, key_pair=create_new_key_pair()) as node:
                started.append(node)
                ready.set()
                await trio.sleep_forever()

    nursery.start_soon(run)
    await ready.wait()
    return started[0], scope


async def test_a_relay_that_dies_is_dropped_and_the_others_carry_on() -> None:
    async with trio.open_nursery() as nursery:
        service = NodeConfig(relay=relaylib.Config(service=True))
        (dying, kill), (staying, _) = [await _start(nursery, service) for _ in range(2)]
        addrs = (dying.addrs[0], staying.addrs[0])
        cfg = NodeConfig(
            bootstrap=(staying.addrs[0],),
            reachability="private",
            relay=relaylib.Config(relays=addrs, reserve_timeout_s=2.0),
            relay_check_s=0.2,
        )
        async with open_node(cfg, key_pair=create_new_key_pair()) as private:
            with trio.fail_after(BOUND_S):
                while len(private.relay.reservations) < 2:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                assert len(private.addrs) == 2
                kill.cancel()
                while len(private.addrs) != 1:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert private.addrs[0].startswith(staying.addrs[0])
            assert list(private.relay.reservations) == [staying.peer_id]
        nursery.cancel_scope.cancel()


async def test_a_private_node_finds_a_relay_in_the_dht() -> None:
    async with (
        open_node(NodeConfig(), key_pair=create_new_key_pair()) as hub,
        open_node(
            NodeConfig(bootstrap=(hub.addrs[0],), relay=relaylib.Config(service=True)),
            key_pair=create_new_key_pair(),
        ) as relay,
        open_node(
            NodeConfig(bootstrap=(hub.addrs[0],), reachability="private", relay_check_s=0.2),
            key_pair=create_new_key_pair(),
        ) as private,
    ):
        with trio.fail_after(BOUND_S):
            while not private.relay.reservations:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert list(private.relay.reservations) == [relay.peer_id]
        assert private.addrs[0].endswith(f"/p2p/{relay.peer_id}/p2p-circuit/p2p/{private.peer_id}")
