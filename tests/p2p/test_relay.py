"""Private providers served through a circuit relay v2 to consumers, in process.

Over the memory transport; the tests without the real model run under
trio's MockClock (autojump), where every bound is virtual time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from libp2p.abc import INetConn
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL_ID
from multiaddr import Multiaddr
from trio.testing import MockClock

from p2pnode.errors import NetworkError, NoProviderError
from p2pnode.inference.engine import ChatMessage, Params, Request, collect
from p2pnode.inference.llamacpp import BUNDLED_MODEL_ID, Config, bundled_model_path, open_llamacpp
from p2pnode.inference.synthetic import WORD, SyntheticEngine
from p2pnode.p2p import discovery as discoverylib
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p.dialer import OWN_PROTOCOLS
from p2pnode.p2p.kademlia import Kademlia
from p2pnode.p2p.memory import MemoryNetwork
from p2pnode.p2p.node import Node, NodeConfig
from p2pnode.protocols import infer
from p2pnode.simnet.harness import open_memory_node, until

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


def _kinds(node: Node, peer: str) -> list[str]:
    held = relaylib.connections(node.host, ID.from_base58(peer))
    return sorted("relayed" if relaylib.is_relayed(c) else "direct" for c in held)


async def _offer_through_relay(me: Node, provider: Node) -> None:
    """Wait until ``me`` holds the provider's offer with its circuit address."""

    def offered() -> bool:
        offer = me.offer_book.get(provider.peer_id)
        return offer is not None and bool(offer.addrs) and relaylib.is_circuit(offer.addrs[0])

    await until(offered, BOUND_S)


def _offered_addrs(me: Node, provider: Node) -> tuple[str, ...] | None:
    offer = me.offer_book.get(provider.peer_id)
    return None if offer is None else offer.addrs


async def _stop_listening(node: Node) -> None:
    """Make a node undialable, as behind a NAT: it keeps only what it dialled out.

    On loopback a "private" node is dialable after all, and identify hands
    its listen addresses to whoever connects, even through a relay.
    """
    for listener in list(node.host.get_network().listeners.values()):
        await listener.close()


async def _listen_again(node: Node) -> None:
    """Undo :func:`_stop_listening` (same addresses)."""
    for addr in node.relay_keeping.direct_addrs:
        await node.host.get_network().listen(Multiaddr(addr.split("/p2p/")[0]))


async def _only_relayed(a: Node, b: Node) -> None:
    """Close direct connections between two nodes (py-libp2p dials peers it knows)."""
    for conn in relaylib.connections(a.host, ID.from_base58(b.peer_id)):
        if not relaylib.is_relayed(conn):
            await conn.close()


def _carrier(node: Node, peer: str, protocol: str) -> INetConn:
    """The connection to ``peer`` that carries a stream of ``protocol``."""
    for conn in relaylib.connections(node.host, ID.from_base58(peer)):
        if any(s.get_protocol() == protocol for s in conn.get_streams()):
            return conn
    raise AssertionError(f"no connection carries {protocol}")


async def test_a_private_provider_is_served_through_a_relay(memory: MemoryNetwork) -> None:
    engine_cfg = Config(model_path=bundled_model_path(), model_id=BUNDLED_MODEL_ID, n_threads=1)
    async with (
        open_llamacpp(engine_cfg) as engine,
        open_memory_node(memory, NodeConfig(relay=relaylib.Config(service=True))) as relay,
        open_memory_node(memory, _private(relay.addrs[0]), engines=[engine]) as provider,
        open_memory_node(memory, NodeConfig(bootstrap=(relay.addrs[0],))) as me,
    ):
        expected, _ = await collect(engine, REQUEST)
        with trio.fail_after(BOUND_S):
            # The provider advertises only its address through the relay.
            await until(
                lambda: bool(provider.addrs) and relaylib.is_circuit(provider.addrs[0]), BOUND_S
            )
            assert provider.addrs == [f"{relay.addrs[0]}/p2p-circuit/p2p/{provider.peer_id}"]
            await until(lambda: _offered_addrs(me, provider) == tuple(provider.addrs), BOUND_S)
            offer = me.offer_book.get(provider.peer_id)
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


async def test_the_relay_enforces_its_reservation_limit(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    relay_cfg = NodeConfig(relay=relaylib.Config(service=True, max_reservations=1))
    async with (
        open_memory_node(memory, relay_cfg) as relay,
        open_memory_node(memory, _private(relay.addrs[0])) as first,
        open_memory_node(memory, NodeConfig()) as second,
        trio.open_nursery() as nursery,
    ):
        with trio.fail_after(BOUND_S):
            await until(lambda: first.relay.reservations, BOUND_S)
            # The one slot is taken: a second node's reservation is refused.
            with pytest.raises(NetworkError, match="refused the reservation"):
                await second.relay.reserve(relay.addrs[0], nursery)
        assert second.relay.reservations == {}
        nursery.cancel_scope.cancel()


async def _start(
    memory: MemoryNetwork, nursery: trio.Nursery, cfg: NodeConfig
) -> tuple[Node, trio.CancelScope]:
    """A node in its own task, with a scope that stops it as if its process died."""
    scope = trio.CancelScope()
    started: list[Node] = []
    ready = trio.Event()

    async def run() -> None:
        with scope:
            async with open_memory_node(memory, cfg) as node:
                started.append(node)
                ready.set()
                await trio.sleep_forever()

    nursery.start_soon(run)
    await ready.wait()
    return started[0], scope


async def test_a_relay_that_dies_is_replaced(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        service = NodeConfig(relay=relaylib.Config(service=True))
        (dying, kill), (staying, _), (spare, _) = [
            await _start(memory, nursery, service) for _ in range(3)
        ]
        addrs = (dying.addrs[0], staying.addrs[0], spare.addrs[0])
        cfg = NodeConfig(
            bootstrap=(staying.addrs[0],),
            reachability="private",
            relay=relaylib.Config(relays=addrs, reserve_timeout_s=2.0),
            relay_check_s=0.2,
        )
        async with open_memory_node(memory, cfg) as private:
            with trio.fail_after(BOUND_S):
                await until(lambda: len(private.relay.reservations) >= 2, BOUND_S)
                # The first two configured relays are used; the third is spare.
                assert sorted(private.relay.reservations) == sorted(
                    [dying.peer_id, staying.peer_id]
                )
                assert len(private.addrs) == 2
                kill.cancel()
                expected = {
                    f"{staying.addrs[0]}/p2p-circuit/p2p/{private.peer_id}",
                    f"{spare.addrs[0]}/p2p-circuit/p2p/{private.peer_id}",
                }
                await until(lambda: set(private.addrs) == expected, BOUND_S)
            assert sorted(private.relay.reservations) == sorted([staying.peer_id, spare.peer_id])
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _one_relay(
    memory: MemoryNetwork, hub: NodeConfig, *, check_s: float
) -> AsyncIterator[tuple[Node, Node, Node]]:
    """A hub, a relay that announces itself in the DHT, and a private node
    (wanting two relays) that looks for them every ``check_s``; all bootstrap
    from the hub."""
    async with (
        open_memory_node(memory, hub) as first,
        open_memory_node(
            memory,
            NodeConfig(bootstrap=(first.addrs[0],), relay=relaylib.Config(service=True)),
        ) as relay,
        open_memory_node(
            memory,
            NodeConfig(bootstrap=(first.addrs[0],), reachability="private", relay_check_s=check_s),
        ) as private,
    ):
        yield first, relay, private


async def test_a_private_node_finds_a_relay_in_the_dht(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with _one_relay(memory, NodeConfig(), check_s=0.2) as (_hub, relay, private):
        with trio.fail_after(BOUND_S):
            await until(lambda: private.relay.reservations, BOUND_S)
        assert list(private.relay.reservations) == [relay.peer_id]
        assert private.addrs[0].endswith(f"/p2p/{relay.peer_id}/p2p-circuit/p2p/{private.peer_id}")


async def test_a_node_short_of_relays_searches_the_dht_less_and_less(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # It wants two relays and the network has one: it searched the DHT at
    # every check, for good (every second in the relay scenario, ~13% of
    # that process's loop and most of its figures' noise).
    async with _one_relay(memory, NodeConfig(), check_s=1.0) as (_hub, _relay, private):
        assert private.relay.cfg.want == 2
        with trio.fail_after(BOUND_S):
            await until(lambda: private.relay.reservations, BOUND_S)
        await trio.sleep(600)
        # Waits of 1, 2, 4 ... 512 s: ten searches where there were 600.
        assert 8 <= private.relay_keeping.relay_searches <= 12
        assert len(private.relay.reservations) == 1


async def test_a_relay_that_joins_later_is_found_by_a_node_short_of_relays(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # One relay at first, a second one later: the node that wants two holds
    # both once its next search (at most ten minutes on) finds the newcomer.
    # The hub is public: left to dial-back, the memory network judges it
    # private after 30 s, and its addresses are then circuits through the
    # first relay, which a joining node cannot bootstrap from.
    public = NodeConfig(reachability="public")
    async with _one_relay(memory, public, check_s=1.0) as (hub, _relay, private):
        with trio.fail_after(BOUND_S):
            await until(lambda: private.relay.reservations, BOUND_S)
        await trio.sleep(60)
        async with open_memory_node(
            memory, NodeConfig(bootstrap=(hub.addrs[0],), relay=relaylib.Config(service=True))
        ) as later:
            await trio.sleep(700)
            assert len(private.relay.reservations) == 2
            assert later.peer_id in private.relay.reservations


SYNTHETIC = Request(
    model_id="synthetic", kind="completion", prompt="x", params=Params(max_tokens=20_000)
)


@asynccontextmanager
async def _relayed_pair(
    memory: MemoryNetwork, consumer: relaylib.Config, service: relaylib.Config | None = None
) -> AsyncIterator[tuple[Node, Node]]:
    """A relay, a private provider of the synthetic engine, and a public consumer."""
    service = service or relaylib.Config(service=True)
    async with (
        open_memory_node(memory, NodeConfig(relay=service)) as relay,
        open_memory_node(memory, _private(relay.addrs[0]), engines=[SyntheticEngine()]) as provider,
        open_memory_node(memory, NodeConfig(bootstrap=(relay.addrs[0],), relay=consumer)) as me,
    ):
        yield provider, me


async def test_an_upgrade_lets_a_running_stream_finish_on_the_relay_and_moves_the_session(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with (
        _relayed_pair(memory, relaylib.Config(hole_punch=False)) as (provider, me),
        trio.open_nursery() as nursery,
    ):
        assert provider.provider is not None
        streaming = trio.Event()
        direct = trio.Event()
        parts: list[str] = []
        carriers: list[INetConn] = []
        upgraded: list[bool] = []

        async def deliver(text: str, _tokens: int) -> None:
            if not streaming.is_set():
                carriers.append(_carrier(me, provider.peer_id, infer.PROTOCOL_ID))
                streaming.set()
                # Hold the stream open until the direct connection exists.
                await direct.wait()
            parts.append(text)

        async def upgrade() -> None:
            await streaming.wait()
            # The consumer can be reached again, by the provider's dial.
            await _listen_again(me)
            upgraded.append(
                await me.relay.upgrade(ID.from_base58(provider.peer_id), own=OWN_PROTOCOLS)
            )

        with trio.fail_after(BOUND_S):
            await _offer_through_relay(me, provider)
            # Neither can be dialled (py-libp2p dials peers it knows on its
            # own): the request must take the relay.
            await _stop_listening(provider)
            await _stop_listening(me)
            await _only_relayed(me, provider)
            nursery.start_soon(upgrade)
            async with trio.open_nursery() as waiting:
                waiting.start_soon(me.generate, SYNTHETIC, deliver)
                await streaming.wait()
                (carrier,) = carriers
                assert relaylib.is_relayed(carrier)
                await until(lambda: "direct" in _kinds(me, provider.peer_id), BOUND_S)
                # The relayed connection still carries the stream (it is
                # protected from py-libp2p's one-connection-per-peer trim).
                assert not carrier.is_closed
                direct.set()
            await until(lambda: upgraded, BOUND_S)
        assert "".join(parts) == WORD * SYNTHETIC.params.max_tokens
        assert upgraded == [True]
        # The relayed connection was closed once the stream was done; the
        # session goes on over the direct one.
        assert set(_kinds(me, provider.peer_id)) == {"direct"}
        # Nobody can dial the provider: its own dial (in the DCUtR exchange,
        # or py-libp2p's, as a NATed node may) made the connection.
        upgrades = me.relay.upgrades
        assert upgrades.direct + upgrades.punched + upgrades.failed == 1
        assert me.relay.upgrades.failed == 0
        sessions = provider.provider.counters.sessions
        again = await me.generate(SYNTHETIC, _ignore)
        assert again.completion_tokens == SYNTHETIC.params.max_tokens
        assert provider.provider.counters.sessions == sessions == 1
        status = me.status_info()
        assert (status.relayed_connections, status.upgraded_connections) == (0, 1)


async def test_a_peer_that_cannot_punch_is_still_served_through_the_relay(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with _relayed_pair(memory, relaylib.Config(hole_punch_timeout_s=5.0)) as (provider, me):
        # Neither can be dialled, and the provider has no DCUtR: nothing can work.
        provider.host.remove_stream_handler(DCUTR_PROTOCOL_ID)
        with trio.fail_after(BOUND_S):
            await _offer_through_relay(me, provider)
            await _stop_listening(provider)
            await _stop_listening(me)
            await _only_relayed(me, provider)
            first = await me.generate(SYNTHETIC, _ignore)
            await until(lambda: me.relay.upgrades.failed, BOUND_S)
            second = await me.generate(SYNTHETIC, _ignore)
        assert first.completion_tokens == second.completion_tokens == 20_000
        assert _kinds(me, provider.peer_id) == ["relayed"]
        assert me.relay.upgrades == relaylib.Upgrades(failed=1)
        assert me.status_info().relayed_connections == 1


async def test_the_relay_cuts_a_circuit_at_its_byte_limit(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    service = relaylib.Config(service=True, circuit_bytes=32 << 10)
    async with _relayed_pair(memory, relaylib.Config(hole_punch=False), service) as (provider, me):
        small = Request(
            model_id="synthetic", kind="completion", prompt="x", params=Params(max_tokens=100)
        )
        with trio.fail_after(BOUND_S):
            await _offer_through_relay(me, provider)
            # Neither can be dialled: the relay is the only way.
            await _stop_listening(provider)
            await _stop_listening(me)
            await _only_relayed(me, provider)
            # 20,000 tokens are ~80 KiB: the relay resets the circuit at 32 KiB.
            with pytest.raises(NoProviderError):
                await me.generate(SYNTHETIC, _ignore)
            # A new circuit has a budget of its own.
            outcome = await me.generate(small, _ignore)
        assert outcome.completion_tokens == 100


async def test_a_private_provider_puts_its_relayed_address_in_the_dht(
    monkeypatch: pytest.MonkeyPatch, memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    sent: list[tuple[str, list[str]]] = []
    send = Kademlia._send_add_provider

    async def recorded(self: Kademlia, peer: ID, key: bytes, addrs: list[Multiaddr]) -> None:
        sent.append((str(self.host.get_id()), [str(a) for a in addrs]))
        await send(self, peer, key, addrs)

    monkeypatch.setattr(Kademlia, "_send_add_provider", recorded)
    async with (
        open_memory_node(memory, NodeConfig(relay=relaylib.Config(service=True))) as relay,
        open_memory_node(memory, _private(relay.addrs[0]), engines=[SyntheticEngine()]) as provider,
    ):
        assert relay.discovery is not None
        circuit = f"{relay.addrs[0]}/p2p-circuit/p2p/{provider.peer_id}"
        with trio.fail_after(BOUND_S):
            # Its first record may still name its own address; once it has
            # reserved, it places the record again with the relayed one.
            await until(lambda: (provider.peer_id, [circuit]) in sent, BOUND_S)
            store = relay.discovery.kademlia.dht.provider_store

            def recorded() -> bool:
                held = store.get_providers(discoverylib.dht_key("synthetic"))
                mine = [p for p in held if str(p.peer_id) == provider.peer_id]
                return bool(mine) and [str(a) for a in mine[0].addrs] == [circuit]

            await until(recorded, BOUND_S)


async def test_reservations_are_renewed_before_they_expire(memory: MemoryNetwork) -> None:
    # Real time: py-libp2p times reservations by the wall clock, and renews
    # 30 s before expiry: a 33 s reservation is renewed after ~3 s.
    service = relaylib.Config(service=True, reservation_ttl_s=33)
    async with (
        open_memory_node(memory, NodeConfig(relay=service)) as relay,
        open_memory_node(memory, _private(relay.addrs[0])) as private,
    ):
        relay_id = ID.from_base58(relay.peer_id)
        granted = private.relay.transport._reservations
        with trio.fail_after(BOUND_S):
            await until(lambda: relay_id in granted, BOUND_S)
            first = granted[relay_id]
            await until(lambda: granted[relay_id] != first, BOUND_S)
        assert granted[relay_id] > first
        # The relay extended the same reservation: it still counts one.
        held = relay.relay.protocol.resource_manager._reservations
        assert list(held) == [ID.from_base58(private.peer_id)]
        assert held[ID.from_base58(private.peer_id)].expires_at == granted[relay_id]


async def _ignore(_text: str, _tokens: int) -> None:
    return None


async def test_two_nodes_behind_nats_meet_by_a_hole_punch(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # Both behind (simulated) NATs: neither's plain dial gets in, and only
    # DCUtR's dials at the same time make a direct connection. The real NATs
    # of tests/cli/test_nat_namespaces.py need root; this one does not.
    async with _relayed_pair(memory, relaylib.Config(hole_punch=False)) as (provider, me):
        with trio.fail_after(BOUND_S):
            await _offer_through_relay(me, provider)
            for node in (provider, me):
                memory.behind_nat(node.relay_keeping.direct_addrs[0])
            await _only_relayed(me, provider)
            # A plain dial does not get through the provider's NAT.
            with pytest.raises(Exception):  # noqa: B017, PT011 - py-libp2p's dial errors vary
                await me.host.connect(
                    PeerInfo(
                        ID.from_base58(provider.peer_id),
                        [Multiaddr(provider.relay_keeping.direct_addrs[0].split("/p2p/")[0])],
                    )
                )
            first = await me.generate(SYNTHETIC, _ignore)
            assert set(_kinds(me, provider.peer_id)) == {"relayed"}
            upgraded = await me.relay.upgrade(ID.from_base58(provider.peer_id), own=OWN_PROTOCOLS)
        assert upgraded
        assert (me.relay.upgrades.punched, me.relay.upgrades.direct) == (1, 0)
        assert "direct" in _kinds(me, provider.peer_id)
        again = await me.generate(SYNTHETIC, _ignore)
        assert first.completion_tokens == again.completion_tokens == SYNTHETIC.params.max_tokens
