"""Attacks on the circuit relay v2 service, each reproduced against real nodes.

The nodes talk over the memory transport, under trio's MockClock (autojump).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.io.exceptions import IOException
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL_ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId, StopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID, STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from trio.testing import MockClock

from p2pnode.errors import NetworkError
from p2pnode.p2p import circuit
from p2pnode.p2p import host as hostlib
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p import reputation as reputationlib
from p2pnode.p2p.memory import MemoryNetwork
from p2pnode.p2p.node import Node, NodeConfig
from p2pnode.simnet.harness import open_memory_node, until

BOUND_S = 30
SINK = TProtocol("/p2pnode-test/sink/1")


def _relay(**limits: float) -> NodeConfig:
    return NodeConfig(
        discovery=None, reachability="public", relay=relaylib.Config(service=True, **limits)
    )


def _private(relay: Node) -> NodeConfig:
    return NodeConfig(
        discovery=None,
        bootstrap=(relay.addrs[0],),
        reachability="private",
        relay=relaylib.Config(relays=(relay.addrs[0],)),
        relay_check_s=0.2,
    )


def _public(relay: Node | None = None) -> NodeConfig:
    bootstrap = (relay.addrs[0],) if relay is not None else ()
    return NodeConfig(discovery=None, bootstrap=bootstrap, reachability="public")


async def _stop_listening(node: Node) -> None:
    """Make a node undialable (on loopback everyone could dial everyone directly,
    and a direct connection replaces a relayed one)."""
    for listener in list(node.host.get_network().listeners.values()):
        await listener.close()


@asynccontextmanager
async def _nodes(memory: MemoryNetwork, *configs: NodeConfig) -> AsyncIterator[list[Node]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_memory_node(memory, cfg)) for cfg in configs]


async def _reserved(node: Node) -> None:
    with trio.fail_after(BOUND_S):
        await until(lambda: node.relay.reservations, BOUND_S)


async def _hop(node: Node, relay: Node, msg: HopMessage | bytes) -> tuple[HopMessage, INetStream]:
    """Send one HOP message (or raw bytes) to the relay; its answer and the stream."""
    stream = await node.host.new_stream(ID.from_base58(relay.peer_id), [PROTOCOL_ID])
    if isinstance(msg, bytes):
        await stream.write(msg)
    else:
        await write_delimited_msg(stream, msg)
    with trio.fail_after(BOUND_S):
        return await read_delimited_msg(stream, HopMessage), stream


async def _ended(stream: INetStream) -> bool:
    """Whether the other side ended the stream (EOF or reset) within 5 s."""
    with trio.fail_after(5):
        try:
            return await stream.read(1) == b""
        except IOException:
            return True


def _reserve(peer: ID) -> HopMessage:
    return HopMessage(type=HopMessage.RESERVE, peer=PeerId(id=peer.to_bytes()))


def _circuit(relay: Node, target: Node) -> str:
    return f"{relay.addrs[0]}/p2p-circuit/p2p/{target.peer_id}"


def _made_up() -> ID:
    return ID.from_pubkey(create_new_key_pair().public_key)


# --- 1: only a node configured as a relay relays -----------------------------


async def test_a_node_without_the_relay_service_relays_for_nobody(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with _nodes(memory, _public()) as [plain], trio.open_nursery() as nursery:
        async with _nodes(memory, _public(plain), _public(plain)) as [private, stranger]:
            with trio.fail_after(BOUND_S):
                # No reservation, hence no circuit address to advertise ...
                with pytest.raises(NetworkError):
                    await private.relay.reserve(plain.addrs[0], nursery)
                # ... and no circuit to a peer connected to it (HOP CONNECT).
                with pytest.raises(NetworkError):
                    await stranger.relay.dial(_circuit(plain, private))
        assert not plain.relay.protocol.resource_manager._reservations
        assert PROTOCOL_ID not in plain.host.get_mux().get_protocols()
        nursery.cancel_scope.cancel()


# --- 3: reservations are for the authenticated peer ---------------------------


async def test_a_squatter_with_made_up_ids_cannot_take_the_slots(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with (
        _nodes(memory, _relay(max_reservations=2)) as [relay],
        _nodes(memory, _public(relay), _public(relay)) as [squatter, honest],
        trio.open_nursery() as nursery,
    ):
        with trio.fail_after(BOUND_S):
            answers: list[tuple[int, bool] | None] = []
            for _ in range(3):
                try:
                    answer, stream = await _hop(squatter, relay, _reserve(_made_up()))
                    answers.append((answer.status, await _ended(stream)))
                except IOException:  # the relay broke the stream instead of answering
                    answers.append(None)
            # Its own reservation is granted: it takes one slot, not all ...
            own, _ = await _hop(squatter, relay, _reserve(squatter.host.get_id()))
            # ... and a real node still finds one.
            await honest.relay.reserve(relay.addrs[0], nursery)
        assert answers == [(StatusCode.PERMISSION_DENIED, True)] * 3
        assert own.status == StatusCode.OK
        held = set(relay.relay.protocol.resource_manager._reservations)
        assert held == {squatter.host.get_id(), honest.host.get_id()}
        assert relay.reputation.score(squatter.peer_id, trio.current_time()) > 0
        nursery.cancel_scope.cancel()


async def test_slots_of_peers_that_left_are_free_again(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with _nodes(memory, _relay(max_reservations=2, slot_grace_s=0)) as [relay]:
        async with _nodes(memory, _private(relay), _private(relay)) as gone:
            for node in gone:
                await _reserved(node)
        with trio.fail_after(BOUND_S):
            await until(lambda: not relay.host.get_connected_peers(), BOUND_S)
        # Both slots were taken by peers that are no longer connected.
        async with _nodes(memory, _private(relay)) as [private]:
            await _reserved(private)


async def test_a_reserved_peer_and_its_relay_are_not_trimmed_for_others(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    """Over its high watermark the swarm closes idle connections; a relay must
    not close a slot holder's, nor a private node its relay's."""
    trim_early = hostlib.Config(low_watermark=0, high_watermark=1)
    async with _nodes(memory, replace(_relay(), host=trim_early)) as [relay]:
        private_cfg = replace(_private(relay), host=trim_early)
        async with _nodes(memory, private_cfg) as [private]:
            await _reserved(private)
            async with _nodes(memory, _public(relay), _public(relay)) as strangers:
                relay_id, private_id = relay.host.get_id(), private.host.get_id()
                ids = {private_id} | {s.host.get_id() for s in strangers}
                for node in (relay, private):
                    node.host.get_network().connection_config.grace_period = 0.0
                await strangers[0].host.connect(
                    hostlib.parse_peer_addr(private.relay_keeping.direct_addrs[0])
                )
                with trio.fail_after(BOUND_S):
                    await until(lambda: ids <= set(relay.host.get_connected_peers()), BOUND_S)
                    for node in (relay, private):
                        await node.host.get_network().connection_pruner.maybe_prune_connections()
                assert private_id in relay.host.get_connected_peers()
                assert relay_id in private.host.get_connected_peers()
                assert private_id in relay.relay.protocol.resource_manager._reservations
                # The trim ran: strangers without a slot were let go.
                assert not ids - {private_id} <= set(relay.host.get_connected_peers())


async def test_a_private_node_that_lost_its_connection_finds_its_slot_again(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    """In a hostile run a private node's connection to its relay dropped while
    squatters were reserving; the next squatter took the freed slot and the
    private node was refused for the rest of the run."""
    async with _nodes(memory, _relay(max_reservations=2)) as [relay]:
        # Its next relay check comes well after the squatters have asked.
        private_cfg = replace(_private(relay), relay_check_s=5.0)
        async with _nodes(memory, private_cfg, _public(relay), _public(relay)) as [
            private,
            *squatters,
        ]:
            await _reserved(private)
            relay_id, private_id = relay.host.get_id(), private.host.get_id()
            # The relay holds a slot's peer, and the private node its relay,
            # out of the swarm's trimming.
            assert relay.host.get_network().tag_store.is_protected(private_id)
            assert private.host.get_network().tag_store.is_protected(relay_id)
            await private.host.disconnect(relay_id)
            with trio.fail_after(BOUND_S):
                await until(lambda: private_id not in relay.host.get_connected_peers(), BOUND_S)
                answers = [
                    (await _hop(s, relay, _reserve(s.host.get_id())))[0].status for s in squatters
                ]
                # The private node comes back on its next check and is served.
                slots = relay.relay.protocol.resource_manager

                # (It may reconnect before its check: its slot is back then,
                # its own record of the reservation only after the check.)
                def back() -> bool:
                    held = str(relay_id) in private.relay.reservations
                    return held and slots.has_reservation(private_id)

                await until(back, BOUND_S)
        # One squatter got the free slot; the private node's was kept for it.
        assert answers == [StatusCode.OK, StatusCode.RESOURCE_LIMIT_EXCEEDED]


# --- 4: malformed or unexpected messages end their stream, never the node -----


async def test_malformed_and_unexpected_relay_messages_end_their_stream_only(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with _nodes(memory, _relay()) as [relay], _nodes(memory, _public(relay)) as [stranger]:
        with trio.fail_after(BOUND_S):
            unexpected = HopMessage(type=HopMessage.STATUS, status=StatusCode.OK)
            # A length of 5, then bytes that are no protobuf (wire type 7).
            for msg in (unexpected, b"\x05\xff\xff\xff\xff\xff"):
                answer, stream = await _hop(stranger, relay, msg)
                assert answer.status == StatusCode.MALFORMED_MESSAGE
                assert await _ended(stream)
            # Only a relay this node reserved on may open a STOP stream.
            stream = await stranger.host.new_stream(relay.host.get_id(), [STOP_PROTOCOL_ID])
            connect = StopMessage(type=StopMessage.CONNECT, peer=PeerId(id=_made_up().to_bytes()))
            await write_delimited_msg(stream, connect)
            answer_stop = await read_delimited_msg(stream, StopMessage)
            assert answer_stop.status == StatusCode.PERMISSION_DENIED
            assert await _ended(stream)
        counters = relay.relay.protocol.counters
        assert (counters.malformed, counters.refused) == (2, 1)
        assert relay.reputation.score(stranger.peer_id, trio.current_time()) > 0
        # The relay still serves.
        async with _nodes(memory, _private(relay)) as [private]:
            await _reserved(private)


async def test_a_banned_peer_is_turned_away_by_the_relay_too(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # Two protocol offences pass this relay's ban score.
    strict = replace(_relay(), reputation=reputationlib.Config(ban_score=3.5))
    async with _nodes(memory, strict) as [relay], _nodes(memory, _public(relay)) as [stranger]:
        with trio.fail_after(BOUND_S):
            for _ in range(2):
                await _hop(stranger, relay, b"\x05\xff\xff\xff\xff\xff")
            assert relay.reputation.banned(stranger.peer_id, trio.current_time())
            with pytest.raises((IOException, StreamFailure)):  # reset unread
                await _hop(stranger, relay, _reserve(stranger.host.get_id()))
        assert relay.relay.protocol.counters.refused == 1
        assert not relay.relay.protocol.resource_manager._reservations


async def test_an_exception_in_a_relay_handler_ends_its_stream_not_the_node(
    monkeypatch: pytest.MonkeyPatch, memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async def broken(*_args: object) -> None:
        raise RuntimeError("a bug in the library")

    async with _nodes(memory, _relay()) as [relay], _nodes(memory, _public(relay)) as [stranger]:
        relay_id = ID.from_base58(relay.peer_id)
        with trio.fail_after(BOUND_S):
            monkeypatch.setattr(CircuitV2Protocol, "_handle_reserve", broken)
            monkeypatch.setattr(DCUtRProtocol, "_handle_dcutr_stream", broken)
            stream = await stranger.host.new_stream(relay_id, [PROTOCOL_ID])
            await write_delimited_msg(stream, _reserve(stranger.host.get_id()))
            assert await _ended(stream)
            try:
                stream = await stranger.host.new_stream(relay_id, [DCUTR_PROTOCOL_ID])
            except StreamFailure:
                pass  # reset before our side of the negotiation was done
            else:
                assert await _ended(stream)
            monkeypatch.undo()
            # Still running, and still a relay.
            assert (await stranger.finder.status_of(relay.peer_id)).peer_id == relay.peer_id
            answer, _ = await _hop(stranger, relay, _reserve(stranger.host.get_id()))
        assert answer.status == StatusCode.OK
        assert relay.relay.protocol.counters.failed == 1


# --- 2: the relay service's budgets --------------------------------------------


async def _start(memory: MemoryNetwork, stack: AsyncExitStack, cfg: NodeConfig) -> Node:
    return await stack.enter_async_context(open_memory_node(memory, cfg))


async def _private_behind(
    memory: MemoryNetwork, relay: Node, count: int, stack: AsyncExitStack
) -> list[Node]:
    """Private nodes reserved on ``relay``, no longer listening (reachable only through it)."""
    nodes = [await _start(memory, stack, _private(relay)) for _ in range(count)]
    for node in nodes:
        await _reserved(node)
        await _stop_listening(node)
    return nodes


async def _consumers(
    memory: MemoryNetwork, relay: Node, count: int, stack: AsyncExitStack
) -> list[Node]:
    """Nodes connected to ``relay`` that nobody can dial (so circuits stay circuits)."""
    nodes = [await _start(memory, stack, _public(relay)) for _ in range(count)]
    for node in nodes:
        await _stop_listening(node)
    return nodes


async def test_the_relay_limits_circuits_overall_and_per_peer(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with AsyncExitStack() as stack:
        relay = await _start(memory, stack, _relay(max_circuits=2, max_circuits_per_peer=1))
        p1, p2, p3 = await _private_behind(memory, relay, 3, stack)
        c1, c2, c3 = await _consumers(memory, relay, 3, stack)
        budget = relay.relay.protocol.budget
        with trio.fail_after(BOUND_S):
            await c1.relay.dial(_circuit(relay, p1))
            # c1 is already an end of one circuit ...
            with pytest.raises(NetworkError):
                await c1.relay.dial(_circuit(relay, p2))
            # ... and so is p1.
            with pytest.raises(NetworkError):
                await c2.relay.dial(_circuit(relay, p1))
            await c2.relay.dial(_circuit(relay, p2))
            # Two circuits are all the relay carries at once.
            with pytest.raises(NetworkError):
                await c3.relay.dial(_circuit(relay, p3))
        assert budget.circuits == 2
        assert relay.relay.protocol.counters.circuits_refused == 3


async def test_the_relay_cuts_an_idle_circuit_at_its_duration(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with AsyncExitStack() as stack:
        relay = await _start(memory, stack, _relay(circuit_duration_s=2))
        [private] = await _private_behind(memory, relay, 1, stack)
        [consumer] = await _consumers(memory, relay, 1, stack)
        budget = relay.relay.protocol.budget
        with trio.fail_after(BOUND_S):
            await consumer.relay.dial(_circuit(relay, private))
            assert budget.circuits == 1
            # Nobody sends a byte: py-libp2p alone would keep it for ever.
            await until(lambda: not budget.circuits, BOUND_S)
            target = ID.from_base58(private.peer_id)
            await until(lambda: not relaylib.connections(consumer.host, target), BOUND_S)
        assert relay.relay.protocol.counters.circuits_cut == 1


async def test_the_relay_keeps_to_its_byte_window_over_all_circuits(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with AsyncExitStack() as stack:
        relay = await _start(memory, stack, _relay(total_bytes=64 << 10))
        [private] = await _private_behind(memory, relay, 1, stack)
        c1, c2 = await _consumers(memory, relay, 2, stack)
        received: list[int] = []

        async def sink(stream: INetStream) -> None:
            while data := await stream.read(65536):
                received.append(len(data))

        private.host.set_stream_handler(SINK, sink)
        target = ID.from_base58(private.peer_id)
        with trio.fail_after(BOUND_S):
            await c1.relay.dial(_circuit(relay, private))
            stream = await c1.host.new_stream(target, [SINK])
            # 256 KiB through a relay that carries 64 KiB per window (the
            # per-circuit limit, 1 GiB, is far away): the relay cuts it.
            with contextlib.suppress(IOException):
                for _ in range(64):
                    await stream.write(b"x" * 4096)
            await until(lambda: not relay.relay.protocol.budget.circuits, BOUND_S)
            # The window is spent: another peer's circuit is refused too.
            with pytest.raises(NetworkError):
                await c2.relay.dial(_circuit(relay, private))
        assert sum(received) < 64 << 10
        assert relay.relay.protocol.counters.circuits_cut == 1


# --- the budget alone ------------------------------------------------------------


def test_the_budget_counts_circuits_per_peer_and_overall_and_bytes_per_window() -> None:
    a, b, c = (_made_up() for _ in range(3))
    budget = circuit.Budget(max_circuits=2, max_circuits_per_peer=1, window_bytes=100, window_s=10)
    assert budget.open_circuit(a, b, 0.0)
    assert not budget.open_circuit(a, c, 0.0)  # a is an end already
    assert not budget.open_circuit(c, b, 0.0)  # so is b
    budget.close_circuit(a, b)
    assert budget.open_circuit(c, b, 0.0)
    assert budget.open_circuit(a, _made_up(), 0.0)
    assert not budget.open_circuit(_made_up(), _made_up(), 0.0)  # two at once
    assert budget.spend(60, 1.0)
    assert budget.spend(30, 2.0)
    assert not budget.spend(11, 3.0)  # no room: the window is spent
    assert not budget.spend(1, 9.9)
    budget.close_circuit(c, b)
    assert not budget.open_circuit(b, c, 9.9)  # the window is spent
    assert budget.open_circuit(b, c, 10.0)  # a new window
    assert budget.remaining(10.0) == 100
