"""The in-process memory transport: what tests rely on it to do as TCP does."""

from __future__ import annotations

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from trio.testing import MockClock

from p2pnode.errors import ConfigError, NetworkError
from p2pnode.p2p import host as hostlib
from p2pnode.p2p.memory import MemoryNetwork
from p2pnode.p2p.node import NodeConfig, open_node
from p2pnode.simnet.harness import open_memory_node, until

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
