"""The in-process memory transport: what tests rely on it to do as TCP does."""

from __future__ import annotations

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from trio.testing import MockClock

from p2pnode.errors import ConfigError, NetworkError, NoProviderError
from p2pnode.inference.engine import Params, Request
from p2pnode.inference.synthetic import SyntheticEngine
from p2pnode.p2p import host as hostlib
from p2pnode.p2p.memory import MemoryNetwork
from p2pnode.p2p.node import NodeConfig, open_node
from p2pnode.simnet.harness import open_memory_node, start_node, until

BOUND_S = 10


async def test_nodes_connect_and_a_stopped_node_is_seen_gone(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with open_memory_node(memory, NodeConfig()) as a:
        assert a.addrs[0].startswith("/memory/")
        async with open_memory_node(memory, NodeConfig(bootstrap=(a.addrs[0],))) as b:
            assert a.peer_id in b.connected_peers()
            with trio.fail_after(BOUND_S):
                assert (await b.finder.status_of(a.peer_id)).addrs == tuple(a.addrs)
            await until(lambda: b.peer_id in a.connected_peers(), BOUND_S)
        # b's host closed its end: a's yamux sees the connection end.
        await until(lambda: ID.from_base58(b.peer_id) not in a.host.get_connected_peers(), BOUND_S)


async def test_an_address_nobody_listens_on_fails_the_dial(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with open_memory_node(memory, NodeConfig()) as a:
        async with open_memory_node(memory, NodeConfig()) as b:
            gone = b.addrs[0]
        with pytest.raises(NetworkError):
            await a.dialer.connect(gone)


async def test_an_address_in_use_is_refused(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with open_memory_node(memory, NodeConfig()) as a:
        taken = a.addrs[0].split("/p2p/")[0]
        cfg = NodeConfig(host=hostlib.Config(listen=(taken,)))
        keys = create_new_key_pair()
        host = hostlib.build(keys, cfg.host, transports=[memory.transport()])
        with pytest.raises(ConfigError, match="could not listen"):
            async with open_node(cfg, key_pair=keys, host=host):
                pass


async def test_a_provider_killed_mid_answer_is_seen_gone_at_once(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # Killed: its task cancelled at once, as simnet and the tests stop a node
    # in process. py-libp2p's own stop path marks the connection closed and
    # is cancelled (its close waits on the streaming answer's lock) before it
    # closes the socket: the consumer heard nothing until its 30 s chunk gap
    # ran out (docs/libp2p-traps.md#stopping-leaves-connections-open).
    request = Request(
        model_id=SyntheticEngine().models()[0].model_id,
        kind="completion",
        prompt="hi",
        params=Params(max_tokens=100_000),
    )
    async with open_memory_node(memory, NodeConfig()) as consumer, trio.open_nursery() as nursery:
        cfg = NodeConfig(measure_tokens=0, bootstrap=(consumer.addrs[0],))
        provider = await start_node(nursery, cfg, [SyntheticEngine()], memory=memory)
        await consumer.finder.refresh_offer(provider.node.peer_id)
        chunks = 0

        async def deliver(_text: str, _tokens: int) -> None:
            nonlocal chunks
            chunks += 1
            if chunks == 5:
                provider.kill()

        started = trio.current_time()
        with pytest.raises(NoProviderError) as failed:
            await consumer.generate(request, deliver)
        # Virtual seconds: the reset arrives at once, long before any timeout.
        assert trio.current_time() - started < 5, str(failed.value)
        assert "silent" not in str(failed.value)
        nursery.cancel_scope.cancel()


async def test_a_connection_left_listed_but_closed_is_dialled_anew(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # py-libp2p marks a connection closed before its clean-up takes it off the
    # swarm's records; a clean-up that blocks or is cancelled leaves it there,
    # closed, for good (docs/libp2p-traps.md#closed-connections-stay-listed).
    # Listed, it stopped every new dial and stream to the peer.
    async with (
        open_memory_node(memory, NodeConfig(measure_tokens=0)) as me,
        open_memory_node(memory, NodeConfig(measure_tokens=0)) as peer,
    ):
        peer_id = ID.from_base58(peer.peer_id)

        def stuck() -> object:
            (conn,) = me.host.get_network().get_connections(peer_id)
            conn.event_closed.set()  # what its close does first, and a blocked one no more
            return conn

        # A connect dials afresh ...
        await me.dialer.connect(peer.addrs[0])
        first = stuck()
        await me.dialer.connect(peer.addrs[0])
        assert (await me.finder.status_of(peer.peer_id)).peer_id == peer.peer_id
        # ... and so does a new stream, without a connect before it.
        second = stuck()
        assert (await me.finder.status_of(peer.peer_id)).peer_id == peer.peer_id
        conns = me.host.get_network().get_connections(peer_id)
        assert first not in conns
        assert second not in conns
        assert [c.is_closed for c in conns] == [False]
