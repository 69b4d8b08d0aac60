"""Discovery over real libp2p hosts: DHT records, signed gossip, expiry.

The nodes talk over the in-process memory transport under trio's MockClock
(autojump): every bound below is virtual time, and waiting costs no wall time.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.peer.id import ID
from libp2p.peer.peerstore import create_signed_peer_record, issue_and_cache_local_record
from libp2p.pubsub import gossipsub as gossipsub_module
from libp2p.pubsub import pubsub as pubsub_module
from libp2p.pubsub.pb import rpc_pb2
from trio.testing import MockClock

from p2pnode.inference.engine import Chunk, ModelInfo, Request, Usage
from p2pnode.p2p import discovery
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p.memory import MemoryNetwork
from p2pnode.p2p.node import NodeConfig
from p2pnode.protocols import offers
from p2pnode.simnet.harness import (
    SIMNET_MODEL,
    Simnet,
    Topology,
    add_node,
    default_config,
    open_memory_node,
    open_simnet,
    until,
)

# Virtual seconds: what the protocol needs (gossip heartbeats, a DHT walk),
# with room to spare.
BOUND_S = 30


async def eventually(predicate: Callable[[], bool], bound_s: float = BOUND_S) -> None:
    await until(predicate, bound_s)


async def test_late_joiner_finds_every_provider(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with open_simnet(Topology(peers=10, providers=3), memory=memory) as (net, nursery):
        providers = net.provider_ids
        await eventually(
            lambda: all(providers <= {o.peer_id for o in n.offer_book} for n in net.nodes)
        )
        # It joins through one consumer and is connected to no provider.
        entry = net.consumers[-1]
        joiner = await add_node(net, nursery, NodeConfig(bootstrap=(entry.addrs[0],)))
        assert joiner.connected_peers() == [entry.peer_id]

        with trio.fail_after(BOUND_S):
            found = await joiner.finder.find_providers(SIMNET_MODEL)
        assert set(found) == providers
        assert await joiner.finder.find_providers("no/such-model") == []
        # Gossip reaches it too, without waiting for the next announcement.
        await eventually(lambda: providers <= {o.peer_id for o in joiner.offer_book})


async def test_forged_offer_is_neither_kept_nor_relayed(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with open_simnet(Topology(peers=6, providers=1), memory=memory) as (net, nursery):
        (victim,) = net.providers
        await eventually(lambda: all(n.offer_book.get(victim.peer_id) for n in net.nodes))
        rogue = net.consumers[0]
        assert rogue.discovery is not None
        held = rogue.offer_book.get(victim.peer_id)
        assert held is not None
        # The victim's offer, "re-priced", a newer seq, signed with the rogue's key.
        forged = replace(
            held,
            seq=held.seq + 1,
            models=(offers.ModelOffer(model_id=SIMNET_MODEL, price_per_s=999),),
            signature=b"",
        )
        forged = replace(
            forged, signature=rogue.host.get_private_key().sign(forged.signing_bytes())
        )
        await rogue.discovery.pubsub.publish(offers.TOPIC, offers.GOSSIP_CODEC.encode_body(forged))

        # The rogue's neighbours judge it (and do not pass it on).
        await eventually(
            lambda: sum(n.offer_book.verdicts[offers.Verdict.FORGED] for n in net.nodes) > 0
        )
        for node in net.nodes:
            offer = node.offer_book.get(victim.peer_id)
            assert offer is not None
            assert offer.models[0].price_per_s == 0, f"{node.peer_id} took the forged offer"


@asynccontextmanager
async def _one_provider_simnet(
    cfg: discovery.Config, memory: MemoryNetwork
) -> AsyncIterator[Simnet]:
    """Three nodes on the memory network, one a provider, all with ``cfg``."""

    def config_for(index: int, is_provider: bool) -> NodeConfig:
        return replace(default_config(index, is_provider), discovery=cfg)

    async with open_simnet(Topology(peers=3, providers=1), config_for, memory=memory) as (
        net,
        _nursery,
    ):
        yield net


async def test_a_peer_entering_the_mesh_is_sent_the_newest_offers_once(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    """The catch-up on entering a mesh (p2p/discovery.py:OfferGossip): a peer that
    subscribed before we held an offer, and joined our mesh after we forwarded
    it, would otherwise wait a whole period for it (seen in 50-node simnets)."""
    # No announcement during the test: what reaches the peer is the catch-up.
    quiet = discovery.Config(offers=offers.Config(period_s=600.0, expiry_s=1800.0))

    async with _one_provider_simnet(quiet, memory) as net:
        (provider,) = net.providers
        await eventually(lambda: all(n.offer_book.get(provider.peer_id) for n in net.nodes))
        assert provider.discovery is not None
        pubsub, router = provider.discovery.pubsub, provider.discovery.router
        peer = next(p for p in pubsub.peers if str(p) in {n.peer_id for n in net.consumers})
        sent: list[int] = []  # offers written to that peer, per RPC
        write = pubsub.write_msg

        async def counted(stream: INetStream, rpc: Any) -> bool:
            if stream is pubsub.peers.get(peer) and len(rpc.publish):
                sent.append(len(rpc.publish))
            return await write(stream, rpc)

        pubsub.write_msg = counted  # type: ignore[method-assign]
        graft = rpc_pb2.ControlGraft(topicID=offers.TOPIC)

        async def grafted() -> None:  # it leaves our mesh and GRAFTs again
            router.mesh[offers.TOPIC].discard(peer)
            await router.handle_graft(graft, peer)
            assert peer in router.mesh[offers.TOPIC]
            await trio.sleep(1)  # the catch-up's task runs

        # It joined the mesh at start and had its catch-up then: not again.
        await grafted()
        assert sent == []
        # Disconnected, and back: the provider's own newest offer, once.
        router.remove_peer(peer)
        await grafted()
        await grafted()
        assert sent == [1]


async def test_offer_expires_when_its_provider_stops(memory: MemoryNetwork) -> None:
    # Real time: an offer's age is wall-clock time (its signed timestamp
    # travels between machines), which a MockClock does not move.
    quick = discovery.Config(
        offers=offers.Config(period_s=0.5, expiry_s=2.0),
        fast_start_s=(0.2,),
        sweep_s=0.2,
    )

    def config_for(index: int, is_provider: bool) -> NodeConfig:
        return replace(default_config(index, is_provider), discovery=quick)

    async with open_simnet(Topology(peers=4, providers=0), config_for, memory=memory) as (
        net,
        _nursery,
    ):
        provider_cfg = replace(
            config_for(0, True), bootstrap=(net.nodes[0].addrs[0],), discovery=quick
        )
        async with open_memory_node(memory, provider_cfg) as provider:
            await eventually(lambda: all(n.offer_book.get(provider.peer_id) for n in net.nodes))
            with trio.fail_after(BOUND_S):
                assert provider.peer_id in await net.nodes[-1].finder.find_providers(SIMNET_MODEL)
        # Stopped: every book forgets it within expiry_s plus a sweep, and the
        # provider records derived from its offer go with it.
        await eventually(lambda: all(n.offer_book.get(provider.peer_id) is None for n in net.nodes))
        assert provider.peer_id not in await net.nodes[-1].finder.find_providers(SIMNET_MODEL)


async def test_a_provider_found_in_the_dht_is_asked_for_its_offer(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    """A consumer that lacks an offer gets it from the DHT and the provider itself."""
    async with open_simnet(Topology(peers=4, providers=1), memory=memory) as (net, _nursery):
        (provider,) = net.providers
        consumer = net.consumers[-1]
        await eventually(lambda: consumer.offer_book.get(provider.peer_id) is not None)
        consumer.offer_book.forget(provider.peer_id)  # as if gossip had lost it
        with trio.fail_after(BOUND_S):
            found = await consumer.finder.discover(SIMNET_MODEL)
        assert [o.peer_id for o in found] == [provider.peer_id]
        assert found[0].serves(SIMNET_MODEL) is not None
        assert found[0].addrs == tuple(provider.addrs)


async def test_a_lookup_whose_every_peer_timed_out_walks_again(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    """A joiner's only DHT peer is slow once (a busy loop): the lookup still answers.

    Relay records are the DHT's alone (offers do not cache them), so what the
    joiner finds here came from a walk, not from gossip.
    """
    relaying = NodeConfig(relay=relaylib.Config(service=True))
    async with open_memory_node(memory, relaying) as relay:
        serve = relay.host.get_mux().handlers[KAD_PROTOCOL_ID]
        queries = 0

        async def slow_once(stream: INetStream) -> None:
            nonlocal queries
            queries += 1
            if queries == 1:
                await trio.sleep(4 * discovery.Config().lookup_query_timeout)
            await serve(stream)

        relay.host.set_stream_handler(KAD_PROTOCOL_ID, slow_once)
        joining = NodeConfig(bootstrap=(relay.addrs[0],))
        async with open_memory_node(memory, joining) as joiner:
            found = joiner.discovery
            assert found is not None
            await eventually(lambda: found.kademlia.dht.get_routing_table_size() > 0)
            with trio.fail_after(BOUND_S):
                relays = await found.find_relays()
    assert queries == 2
    assert [r.rsplit("/p2p/", 1)[-1] for r in relays] == [relay.peer_id]


async def test_messages_kept_for_the_equivocation_check_last_twice_an_offers_age(
    memory: MemoryNetwork,
) -> None:
    # py-libp2p kept each message it saw for this check, up to 1,000 per node:
    # half an hour of linear growth in a soak
    # (docs/libp2p-traps.md#every-message-kept-for-the-equivocation-check).
    # Real time: an offer's age is wall-clock time, which a MockClock does not move.
    often = discovery.Config(offers=offers.Config(period_s=0.1, max_age_s=0.5, expiry_s=5.0))

    async with _one_provider_simnet(often, memory) as net:
        (provider,) = net.providers
        consumer = net.consumers[0]
        assert consumer.discovery is not None
        router = consumer.discovery.router
        await eventually(lambda: consumer.offer_book.get(provider.peer_id) is not None)
        accepted = consumer.offer_book.verdicts[offers.Verdict.ACCEPTED]
        await trio.sleep(3)  # ~30 announcements, each kept for 1 s
        assert consumer.offer_book.verdicts[offers.Verdict.ACCEPTED] - accepted >= 15
        assert 1 <= len(router.equivocation_detection) <= 15


class _VirtualWallClock:
    """``time`` for py-libp2p's gossipsub module: the wall clock moved by trio's
    MockClock, so that its wall-clock schedules (the mesh-health score every
    30 s) run in virtual time as the heartbeat does."""

    def __init__(self) -> None:
        self._start = time.time()

    def time(self) -> float:
        return self._start + trio.current_time()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


async def test_the_heartbeat_stays_at_a_second_when_the_mesh_is_unhealthy(
    memory: MemoryNetwork, autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # py-libp2p slows a 1 s heartbeat to 30-60 s when its mesh-health score
    # drops (a mesh short of D peers is "unhealthy"): the message cache, twelve
    # heartbeats long, then held minutes of offers, sent out as catch-ups and
    # IWANT answers and rejected as stale by the thousand
    # (docs/libp2p-traps.md#the-adaptive-heartbeat-slows-to-a-minute).
    monkeypatch.setattr(gossipsub_module, "time", _VirtualWallClock())
    cfg = discovery.Config()
    async with _one_provider_simnet(cfg, memory) as net:
        routers = [n.discovery.router for n in net.nodes if n.discovery is not None]
        await trio.sleep(150)  # five health scores, each of a mesh of two peers
        assert any(r.network_health_score < 0.7 for r in routers)
        for router in routers:
            assert router.heartbeat_interval == cfg.heartbeat_s
            # The cache holds what came within its twelve heartbeats: one
            # provider announcing every ~10 s leaves at most two offers there.
            assert len(router.mcache.msgs) <= 2


class _TooFastEngine:
    """Emits a token every 10 µs: 100,000 tokens/s, ten times what peers believe."""

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(model_id="too-fast", context_length=4096)]

    slots_total = slots_free = 1
    queue_len = 0

    @asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[trio.abc.ReceiveChannel[Chunk]]:
        send, receive = trio.open_memory_channel[Chunk](0)

        async def emit(count: int) -> None:
            async with send:
                for _ in range(count):
                    await trio.sleep(1e-5)
                    await send.send(Chunk("x", 1))
                usage = Usage(prompt_tokens=1, completion_tokens=count)
                await send.send(Chunk("", 0, "length", usage))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(emit, request.params.max_tokens)
            yield receive
            nursery.cancel_scope.cancel()


async def test_an_engine_faster_than_peers_believe_is_announced_at_their_bound(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # Peers drop a whole offer whose claims are out of bounds. A provider
    # that measured itself faster than that vanished from every book: its
    # own pubsub refused its offers and sent none (the relay scenario's
    # providers, measuring the synthetic engine).
    bound = offers.Config().max_tokens_per_s
    async with (
        open_memory_node(memory, NodeConfig(measure_tokens=32), engines=[_TooFastEngine()]) as me,
        open_memory_node(memory, NodeConfig(bootstrap=(me.addrs[0],))) as peer,
    ):
        await me.offering.measured.wait()

        def announced() -> bool:
            held = peer.offer_book.get(me.peer_id)
            return held is not None and held.models[0].tokens_per_s == bound

        await eventually(announced)


async def test_a_peers_signed_record_is_checked_once_until_it_changes(
    memory: MemoryNetwork, autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # py-libp2p verified the sender's signed peer record in every pubsub RPC,
    # twice, and rebuilt its own for every RPC it sent: ~15% of a 200-node
    # simnet's busy loops (docs/libp2p-traps.md#a-signed-peer-record-on-every-rpc).
    checked: list[str] = []
    library_check = discovery.maybe_consume_signed_record

    def counted_check(msg: rpc_pb2.RPC, host: Any, peer_id: ID) -> bool:
        checked.append(str(peer_id))
        return library_check(msg, host, peer_id)

    monkeypatch.setattr(discovery, "maybe_consume_signed_record", counted_check)
    read: list[str] = []  # RPCs read that carried a record

    def counted_read(module: Any) -> None:
        installed = module.maybe_consume_signed_record

        def counted(msg: rpc_pb2.RPC, host: Any, peer_id: ID) -> bool:
            if msg.HasField("senderRecord"):
                read.append(str(peer_id))
            return installed(msg, host, peer_id)

        monkeypatch.setattr(module, "maybe_consume_signed_record", counted)

    counted_read(pubsub_module)
    counted_read(gossipsub_module)
    # Its forwarding limit counts wall-clock seconds: ten minutes of offers.
    monkeypatch.setattr(gossipsub_module, "time", _VirtualWallClock())

    async with _one_provider_simnet(discovery.Config(), memory) as net:
        (provider,) = net.providers
        await eventually(lambda: all(n.offer_book.get(provider.peer_id) for n in net.nodes))
        links = sum(len(n.discovery.pubsub.peers) for n in net.nodes if n.discovery is not None)
        await trio.sleep(1)
        checked.clear()
        read.clear()
        await trio.sleep(60)  # six announcements, forwarded; sixty heartbeats
        assert len(read) >= 12
        assert checked == []
        # Ten minutes on, each record is checked again once, which keeps the
        # address book's two-hour TTL fresh.
        await trio.sleep(600)
        assert 0 < len(checked) <= links
        for node in net.nodes:
            store = node.host.get_peerstore()
            for peer in node.connected_peers():
                assert store.addrs(ID.from_base58(peer)), f"{node.peer_id} lost {peer}'s addresses"


async def test_a_record_is_remembered_only_once_it_passed_the_librarys_check(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    owner, stranger = create_new_key_pair(), create_new_key_pair()
    owner_id, stranger_id = ID.from_pubkey(owner.public_key), ID.from_pubkey(stranger.public_key)
    addr = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/4001")
    older = create_signed_peer_record(owner_id, [addr], owner.private_key)
    envelope = create_signed_peer_record(owner_id, [addr], owner.private_key)
    assert older.record().seq < envelope.record().seq
    rpc = rpc_pb2.RPC(senderRecord=envelope.marshal_envelope())
    tampered = bytearray(rpc.senderRecord)
    tampered[-1] ^= 1
    async with open_memory_node(memory, NodeConfig()) as me:
        store = me.host.get_peerstore()
        # Another peer's record, sent by a stranger: refused every time.
        assert not discovery.consume_record_once(rpc, me.host, stranger_id)
        assert not discovery.consume_record_once(rpc, me.host, stranger_id)
        assert store.get_peer_record(owner_id) is None
        # From its owner: checked and stored.
        assert discovery.consume_record_once(rpc, me.host, owner_id)
        assert store.addrs(owner_id) == [addr]
        # What the owner's record passed does not pass for the stranger.
        assert not discovery.consume_record_once(rpc, me.host, stranger_id)
        # The same peer's next RPC with a broken signature is checked, and refused.
        assert not discovery.consume_record_once(
            rpc_pb2.RPC(senderRecord=bytes(tampered)), me.host, owner_id
        )
        # An older record than the one stored is refused, every time.
        stale = rpc_pb2.RPC(senderRecord=older.marshal_envelope())
        assert not discovery.consume_record_once(stale, me.host, owner_id)
        assert not discovery.consume_record_once(stale, me.host, owner_id)
        assert discovery.consume_record_once(rpc, me.host, owner_id)


async def test_a_node_sends_its_newest_record_at_once(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # Reused for a second, but never past a newer record of the host's own
    # (identify issues one when its addresses change): a peer that stored
    # the newer one refuses an RPC that carries the older.
    async with open_memory_node(memory, NodeConfig()) as me:
        first, _ = discovery.own_record(me.host)
        assert discovery.own_record(me.host)[0] == first
        newer = issue_and_cache_local_record(me.host)
        assert newer != first
        assert discovery.own_record(me.host)[0] == newer
        await trio.sleep(1.5)
        assert discovery.own_record(me.host)[0] == newer
