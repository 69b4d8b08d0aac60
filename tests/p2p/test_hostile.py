"""Hostile peers against real nodes: each attack a stranger tried, and what it costs.

Every test here is an attack reproduced with the project's own API that
worked against an earlier version of the node: it must now fail, cost the
attacker, and leave the node serving honest peers. The nodes talk over the
memory transport, under trio's MockClock (autojump) unless a test says why not.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace

import pytest
import trio
from eth_account import Account
from eth_account.messages import encode_defunct
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from trio.testing import MockClock

from p2pnode.errors import ErrorCode, NetworkError, NoProviderError, UnreachableError
from p2pnode.inference.engine import Params, Request
from p2pnode.inference.synthetic import WORD, SyntheticEngine
from p2pnode.p2p import host as hostlib
from p2pnode.p2p import provider as providerlib
from p2pnode.p2p.consumer import Config as ConsumerConfig
from p2pnode.p2p.consumer import wire_request
from p2pnode.p2p.discovery import verify_peer_signature
from p2pnode.p2p.kademlia import KAD_STREAMS_PER_PEER
from p2pnode.p2p.memory import MemoryNetwork
from p2pnode.p2p.node import Node, NodeConfig
from p2pnode.p2p.reputation import Offence
from p2pnode.protocols import offers, session, status
from p2pnode.protocols.infer.messages import Commitment, InferOpen
from p2pnode.protocols.refusal import Refusal
from p2pnode.protocols.session import admission
from p2pnode.protocols.session import service as session_service
from p2pnode.protocols.wire import NEED_DATA, Error, encode_frame
from p2pnode.simnet import attacks
from p2pnode.simnet.harness import Topology, open_memory_node, open_simnet, until

BOUND_S = 30
MODEL = "synthetic"


async def eventually(predicate: Callable[[], bool], bound_s: float = BOUND_S) -> None:
    await until(predicate, bound_s)


@asynccontextmanager
async def running(
    memory: MemoryNetwork, config: NodeConfig, engines: list[SyntheticEngine] | None = None
) -> AsyncIterator[Node]:
    async with open_memory_node(memory, config, engines=engines or []) as node:
        yield node


# --- identity -------------------------------------------------------------------


def _plaintext_host(memory: MemoryNetwork) -> IHost:
    """A host that speaks only /plaintext/2.0.0: it may claim any peer id."""
    key_pair = create_new_key_pair()
    insecure = {TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(key_pair)}
    return new_host(key_pair=key_pair, sec_opt=insecure, transports=[memory.transport()])


async def test_a_peer_that_will_not_prove_its_key_is_refused_both_ways(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # The attack: py-libp2p's hosts agree to plaintext by default, where the
    # peer id is only claimed, not proven (its allowlist, bans, relay slots and
    # sessions all trust that id). A node now speaks Noise alone.
    cfg = hostlib.Config(listen=("/memory/0",))
    async with (
        running(memory, NodeConfig(measure_tokens=0)) as node,
        hostlib.running(_plaintext_host(memory), cfg) as liar_addrs,
    ):
        liar = hostlib.parse_peer_addr(liar_addrs[0])
        with pytest.raises(NetworkError):  # we dial it: no plaintext fallback
            await hostlib.connect(node.host, liar, BOUND_S / 3)
        plaintext = _plaintext_host(memory)
        async with hostlib.running(plaintext, cfg):
            with pytest.raises(NetworkError):  # it dials us: refused
                await hostlib.connect(
                    plaintext, hostlib.parse_peer_addr(node.addrs[0]), BOUND_S / 3
                )
            assert ID.from_base58(node.peer_id) not in plaintext.get_connected_peers()
        assert liar.peer_id not in node.host.get_connected_peers()


# --- gossip ---------------------------------------------------------------------


async def test_a_signed_offer_with_junk_addresses_crashes_no_node(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # The attack: a peer publishes its own, correctly signed offer whose
    # addrs hold a string that is not a multiaddr. Every node that validated
    # it used to die (the parse error escaped pubsub's validator).
    async with open_simnet(Topology(peers=4, providers=1), memory=memory) as (net, _):
        rogue = net.consumers[0]
        assert rogue.discovery is not None
        await eventually(lambda: all(len(n.offer_book) == 1 for n in net.nodes if n is not rogue))
        unsigned = offers.Offer(
            peer_id=rogue.peer_id,
            addrs=("this is not a multiaddr", "/ip4/127.0.0.1/tcp/1"),
            models=(offers.ModelOffer(model_id="bait", price_per_s=0),),
            slots_free=1,
            queue_len=0,
            seq=1,
            timestamp=time.time(),
        )
        signed = replace(
            unsigned, signature=rogue.host.get_private_key().sign(unsigned.signing_bytes())
        )
        # The rogue's own node would refuse to send it: the attacker runs no validator.
        rogue.discovery.pubsub.remove_topic_validator(offers.TOPIC)
        await rogue.discovery.pubsub.publish(offers.TOPIC, offers.GOSSIP_CODEC.encode_body(signed))
        others = [n for n in net.nodes if n is not rogue]
        await eventually(
            lambda: sum(n.offer_book.verdicts[offers.Verdict.INVALID] for n in others) > 0
        )
        # Nobody took it, and every node still answers.
        for node in others:
            assert node.offer_book.get(rogue.peer_id) is None
        with trio.fail_after(BOUND_S):
            for node in others:
                assert (await rogue.finder.status_of(node.peer_id)).peer_id == node.peer_id


# --- Sybils -----------------------------------------------------------------------


@pytest.mark.parametrize("try_budget_s", [60.0, 0.0])
async def test_sybils_that_refuse_everything_cannot_starve_requests(
    try_budget_s: float, memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # The attack: four identities claiming to be the fastest, answering every
    # Hello with BUSY, used up every attempt of every request. With no time
    # left to try (try_budget_s 0), a request stops after the first refusal.
    request = Request(model_id=MODEL, kind="completion", prompt="hi", params=Params(max_tokens=8))
    async with AsyncExitStack() as stack:
        config = NodeConfig(measure_tokens=0, consumer=ConsumerConfig(try_budget_s=try_budget_s))
        consumer = await stack.enter_async_context(running(memory, config))
        boot = (consumer.addrs[0],)
        honest = await stack.enter_async_context(
            running(memory, NodeConfig(measure_tokens=0, bootstrap=boot), [SyntheticEngine()])
        )
        honest.offering.set_models((replace(honest.offering.models[0], tokens_per_s=100.0),))
        refuse_all = providerlib.Config(max_handshakes=0)
        sybils = [
            await stack.enter_async_context(
                running(
                    memory,
                    NodeConfig(measure_tokens=0, bootstrap=boot, provider=refuse_all),
                    [SyntheticEngine()],
                )
            )
            for _ in range(4)
        ]
        for sybil in sybils:
            sybil.offering.set_models((replace(sybil.offering.models[0], tokens_per_s=10_000.0),))
        with trio.fail_after(BOUND_S):
            for node in [honest, *sybils]:
                while (held := consumer.offer_book.get(node.peer_id)) is None or (
                    held.models[0].tokens_per_s == 0
                ):
                    await consumer.finder.refresh_offer(node.peer_id)
                    await trio.sleep(0.05)

        texts: list[str] = []

        async def deliver(text: str, _tokens: int) -> None:
            texts.append(text)

        if try_budget_s == 0:
            with pytest.raises(NoProviderError, match="gave up after 0 s of trying"):
                await consumer.generate(request, deliver)
            return
        with trio.fail_after(BOUND_S):
            outcomes = [await consumer.generate(request, deliver) for _ in range(3)]
        assert [o.provider for o in outcomes] == [honest.peer_id] * 3
        assert "".join(texts) == WORD * 8 * 3
        # Each Sybil was tried once (the first request), then ranked behind.
        now = trio.current_time()
        for sybil in sybils:
            standing = consumer.reputation.standing(sybil.peer_id, now)
            assert standing is not None
            assert standing.offences == {Offence.REFUSED.value: 1}
        assert consumer.reputation.standing(honest.peer_id, now).served == 3  # type: ignore[union-attr]


async def test_providers_that_stay_busy_are_asked_again_only_within_the_budget(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # Busy refusers are asked again after a growing pause, but a request ends
    # once try_budget_s has passed without progress, and each refuser is
    # counted once however often it was asked (busy is no offence to ban for).
    request = Request(model_id=MODEL, kind="completion", prompt="hi", params=Params(max_tokens=8))
    async with AsyncExitStack() as stack:
        config = NodeConfig(measure_tokens=0, consumer=ConsumerConfig(try_budget_s=1.5))
        consumer = await stack.enter_async_context(running(memory, config))
        boot = (consumer.addrs[0],)
        refuse_all = providerlib.Config(max_handshakes=0)
        busy = [
            await stack.enter_async_context(
                running(
                    memory,
                    NodeConfig(measure_tokens=0, bootstrap=boot, provider=refuse_all),
                    [SyntheticEngine()],
                )
            )
            for _ in range(2)
        ]
        with trio.fail_after(BOUND_S):
            for node in busy:
                while consumer.offer_book.get(node.peer_id) is None:
                    await consumer.finder.refresh_offer(node.peer_id)
                    await trio.sleep(0.05)
            started = trio.current_time()
            with pytest.raises(NoProviderError, match="gave up after 1.5 s of trying"):
                await consumer.generate(request, _ignore_text)
            waited = trio.current_time() - started
        assert waited >= 1.5  # (fail_after bounds it from above)
        now = trio.current_time()
        for node in busy:
            standing = consumer.reputation.standing(node.peer_id, now)
            assert standing is not None
            assert standing.offences == {Offence.REFUSED.value: 1}
        # Asked again after each pause (0.25 s, 0.5 s, 1 s): three times or more each.
        for node in busy:
            assert node.provider is not None
            assert node.provider.counters.sessions_refused >= 3


@pytest.mark.parametrize("slow_opens", [1, 2])
async def test_a_provider_out_of_reach_for_a_moment_is_waited_for_not_given_up(
    monkeypatch: pytest.MonkeyPatch,
    slow_opens: int,
    memory: MemoryNetwork,
    autojump_clock: MockClock,
) -> None:
    # A hostile run failed honest chats right after its fuzz phase: the one
    # process holding every node was short of CPU for ~40 s, stream opens to
    # several honest providers timed out, and each timeout used up one of a
    # request's failed attempts. A stream that does not come up in time once
    # is no failure of the provider: asked again once no other is left, like
    # a busy one. Twice in one request, it is one (a provider that is gone
    # costs a request two timeouts, not its whole try budget).
    request = Request(model_id=MODEL, kind="completion", prompt="hi", params=Params(max_tokens=8))
    config = NodeConfig(measure_tokens=0, consumer=ConsumerConfig(max_attempts=1))
    async with (
        running(memory, config) as consumer,
        running(
            memory,
            NodeConfig(measure_tokens=0, bootstrap=(consumer.addrs[0],)),
            [SyntheticEngine()],
        ) as provider,
    ):
        with trio.fail_after(BOUND_S):
            while consumer.offer_book.get(provider.peer_id) is None:
                await consumer.finder.refresh_offer(provider.peer_id)
        real_open = consumer.dialer.open_stream
        slow = {"left": slow_opens}

        async def congested(peer: ID | str, protocol: str) -> INetStream:
            # Stands in for a node short of CPU: the first session opens time
            # out (the status call beside each is the open's to report).
            if str(peer) == provider.peer_id and protocol == session.PROTOCOL_ID and slow["left"]:
                slow["left"] -= 1
                raise UnreachableError(f"no {protocol} stream within 5 s (test: congested)")
            return await real_open(peer, protocol)

        monkeypatch.setattr(consumer.dialer, "open_stream", congested)
        now = trio.current_time
        if slow_opens == 2:
            with trio.fail_after(BOUND_S), pytest.raises(NoProviderError, match="test: congested"):
                await consumer.generate(request, _ignore_text)
            standing = consumer.reputation.standing(provider.peer_id, now())
            assert standing is not None
            assert standing.offences == {Offence.REFUSED.value: 1, Offence.FAILED.value: 1}
            return
        with trio.fail_after(BOUND_S):
            outcome = await consumer.generate(request, _ignore_text)
        assert outcome.provider == provider.peer_id
        assert slow["left"] == 0
        standing = consumer.reputation.standing(provider.peer_id, now())
        assert standing is not None
        # Marked down as a refusal (its sessions kept), then served.
        assert standing.offences == {Offence.REFUSED.value: 1}
        assert standing.served == 1
        assert consumer.consumer.counters.provider_failures == 0


async def _ignore_text(_text: str, _tokens: int) -> None:
    return None


async def test_a_receipt_the_provider_did_not_sign_is_not_countersigned(
    memory: MemoryNetwork,
    autojump_clock: MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A provider that signs its receipts with some other key: the consumer
    # counts it, and its Ack countersigns nothing, which the provider in turn
    # counts as a bad acknowledgement and does not keep as proof of usage.
    request = Request(model_id=MODEL, kind="completion", prompt="hi", params=Params(max_tokens=4))
    async with (
        running(memory, NodeConfig(measure_tokens=0), [SyntheticEngine()]) as prov,
        running(memory, NodeConfig(measure_tokens=0, bootstrap=(prov.addrs[0],))) as me,
    ):
        assert prov.provider is not None
        other_key = create_new_key_pair().private_key
        honest_receipt = prov.provider.receipt

        def receipt_signed_by_another_key(
            served: providerlib.ServedSession, commitment: Commitment | None = None
        ) -> object:
            receipt = honest_receipt(served, commitment)
            return replace(receipt, signature=other_key.sign(receipt.signing_bytes()))

        texts: list[str] = []

        async def deliver(text: str, _tokens: int) -> None:
            texts.append(text)

        with trio.fail_after(BOUND_S):
            while me.offer_book.get(prov.peer_id) is None:
                await me.finder.refresh_offer(prov.peer_id)
            # An honest receipt first: countersigned, and kept as proof of usage.
            await me.generate(request, deliver)
            (served,) = prov.provider.sessions.values()
            await eventually(lambda: served.acked is not None)
            assert served.acked is not None
            kept, countersigned = served.acked
            assert verify_peer_signature(me.peer_id, kept.signing_bytes(), countersigned)
            monkeypatch.setattr(prov.provider, "receipt", receipt_signed_by_another_key)
            for _ in range(2):
                await me.generate(request, deliver)
            await eventually(lambda: prov.provider.counters.bad_acks == 2)  # type: ignore[union-attr]
        assert "".join(texts) == WORD * 12  # the answers themselves were whole
        assert me.consumer.counters.bad_receipts == 2
        assert served.acked == (kept, countersigned)  # not replaced by what it did not sign
        told = f"provider {prov.peer_id[-8:]} sent a receipt it did not sign"
        assert caplog.messages.count(told) == 2


# --- admission ----------------------------------------------------------------------


def _sign_hello(account: object, hello: session.Hello) -> session.Hello:
    signed = Account.sign_message(encode_defunct(primitive=hello.signing_bytes()), account.key)  # type: ignore[attr-defined]
    return replace(hello, signature=bytes(signed.signature))


async def test_an_allowlisted_wallet_counts_only_with_its_signature(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # The attack: a Hello carrying an allowed consumer_wallet and no
    # signature passed the free-mode allowlist.
    allowed = Account.create()
    provider_cfg = providerlib.Config(
        admission=admission.Config(allowlist=frozenset({allowed.address.lower()}))
    )
    async with (
        running(
            memory, NodeConfig(measure_tokens=0, provider=provider_cfg), [SyntheticEngine()]
        ) as prov,
        running(memory, NodeConfig(measure_tokens=0)) as stranger,
    ):
        await stranger.dialer.connect(prov.addrs[0])
        peer = ID.from_base58(prov.peer_id)

        async def open_with(prepare: Callable[[session.Hello], session.Hello]) -> object:
            stream = await stranger.host.new_stream(peer, [TProtocol(session.PROTOCOL_ID)])
            return await session_service.open_session(
                stream,
                MODEL,
                10.0,
                local_peer=stranger.host.get_id(),
                remote_peer=peer,
                prepare=prepare,
            )

        with trio.fail_after(BOUND_S):
            refused = await open_with(lambda h: replace(h, consumer_wallet=allowed.address))
            assert isinstance(refused, Refusal)
            assert refused.code is session.RejectCode.NOT_ALLOWED
            # Signed by another key: still refused.
            impostor = Account.create()
            refused = await open_with(
                lambda h: _sign_hello(impostor, replace(h, consumer_wallet=allowed.address))
            )
            assert isinstance(refused, Refusal)
            assert refused.code is session.RejectCode.NOT_ALLOWED
            # The owner's Hello naming another provider (a replay): refused.
            refused = await open_with(
                lambda h: _sign_hello(
                    allowed, replace(h, consumer_wallet=allowed.address, provider=stranger.peer_id)
                )
            )
            assert isinstance(refused, Refusal)
            assert refused.code is session.RejectCode.NOT_ALLOWED
            # The wallet's owner, signing a Hello for this provider: admitted.
            established = await open_with(
                lambda h: _sign_hello(
                    allowed, replace(h, consumer_wallet=allowed.address, provider=prov.peer_id)
                )
            )
            # A free-mode consumer signs nothing (it unlocks no wallet): a wallet
            # allowlist admits paying consumers only; free ones are allowed by peer id.
            request = Request(model_id=MODEL, kind="completion", prompt="hi", params=Params())
            with pytest.raises(NoProviderError, match="not_allowed"):
                await stranger.generate(request, _ignore_text)
        assert isinstance(established, session_service.Established)


async def _hello_from(node: Node, provider: Node) -> object:
    """Send a Hello to ``provider`` and return its first answer, leaving the handshake open."""
    from p2pnode.protocols.session.crypto import Ephemeral
    from p2pnode.protocols.session.machine import ConsumerMachine

    peer = ID.from_base58(provider.peer_id)
    stream = await node.host.new_stream(peer, [TProtocol(session.PROTOCOL_ID)])
    eph = Ephemeral()
    machine = ConsumerMachine(
        64 * 1024, eph, local_peer=node.host.get_id().to_bytes(), remote_peer=peer.to_bytes()
    )
    hello = session.Hello(
        model_id=MODEL, ephemeral=eph.public, nonce=b"n" * 16, timestamp=time.time()
    )
    await stream.write(machine.send_hello(hello))
    while True:
        machine.receive_data(await stream.read(65536))
        event = machine.next_event()
        if event is not NEED_DATA:
            return event


async def test_handshakes_beyond_two_at_once_from_one_peer_are_busy(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # The attack: open handshake after handshake and never finish them, to hold
    # the provider's handshake slots. Two at once per peer; the third is BUSY
    # before any work, and another peer is still served.
    async with (
        running(memory, NodeConfig(measure_tokens=0), [SyntheticEngine()]) as prov,
        running(memory, NodeConfig(measure_tokens=0)) as stranger,
        running(memory, NodeConfig(measure_tokens=0)) as other,
    ):
        with trio.fail_after(BOUND_S):
            for node in (stranger, other):
                await node.dialer.connect(prov.addrs[0])
            held = [await _hello_from(stranger, prov) for _ in range(2)]  # left unfinished
            third = await _hello_from(stranger, prov)
            elsewhere = await _hello_from(other, prov)
        assert all(isinstance(event, session.Approve) for event in held)
        assert isinstance(third, session.Reject)
        assert third.code == session.RejectCode.BUSY
        assert isinstance(elsewhere, session.Approve)


async def test_handshakes_beyond_the_limit_over_all_peers_are_busy(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # Many peers, each within its own two: the provider's total (256 by
    # default, 3 here) still bounds what it holds at once.
    three = NodeConfig(measure_tokens=0, provider=providerlib.Config(max_handshakes=3))
    async with (
        running(memory, three, [SyntheticEngine()]) as prov,
        running(memory, NodeConfig(measure_tokens=0)) as a,
        running(memory, NodeConfig(measure_tokens=0)) as b,
        running(memory, NodeConfig(measure_tokens=0)) as c,
    ):
        with trio.fail_after(BOUND_S):
            for node in (a, b, c):
                await node.dialer.connect(prov.addrs[0])
            held = [await _hello_from(a, prov), await _hello_from(a, prov)]
            held.append(await _hello_from(b, prov))
            fourth = await _hello_from(c, prov)
        assert all(isinstance(event, session.Approve) for event in held)
        assert isinstance(fourth, session.Reject)
        assert fourth.code == session.RejectCode.BUSY


# --- budgets and bans -------------------------------------------------------------------


async def test_a_peer_that_keeps_sending_junk_is_banned_and_others_are_served(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with (
        running(memory, NodeConfig(measure_tokens=0)) as server,
        running(memory, NodeConfig(measure_tokens=0)) as bad,
        running(memory, NodeConfig(measure_tokens=0)) as good,
    ):
        await bad.dialer.connect(server.addrs[0])
        await good.dialer.connect(server.addrs[0])
        peer = ID.from_base58(server.peer_id)
        ban = server.config.reputation.ban_score
        with trio.fail_after(BOUND_S):
            sent = 0
            while not server.reputation.banned(bad.peer_id, trio.current_time()):
                # The last of these may already meet the ban (a reset).
                with contextlib.suppress(Exception):
                    stream = await bad.host.new_stream(peer, [TProtocol(status.PROTOCOL_ID)])
                    await stream.write(encode_frame(b"\xc1 junk"))
                    sent += 1
                    await stream.read(65536)
                await trio.sleep(0.01)
        assert sent in (10, 11)  # a malformed frame weighs 2 (decaying); the ban is at 20
        assert server.reputation.score(bad.peer_id, trio.current_time()) >= ban
        # What /metrics shows of it: each violation by protocol and code, one peer banned.
        seen = server.metrics()
        (((protocol, code), n),) = seen.protocol_errors.items()
        assert (protocol, code) == (status.PROTOCOL_ID, "malformed")
        assert n in (sent - 1, sent)  # the last frame sent may have met the ban
        assert seen.offences == {"protocol": n}
        assert (seen.misbehaving_peers, seen.banned_peers) == (1, 1)
        refused = server.guard.refused
        with trio.fail_after(BOUND_S):
            with pytest.raises(NetworkError):
                await bad.finder.status_of(server.peer_id)
            assert server.guard.refused == refused + 1
            assert (await good.finder.status_of(server.peer_id)).peer_id == server.peer_id


async def test_streams_beyond_a_peers_budget_are_reset_at_once(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with (
        running(memory, NodeConfig(measure_tokens=0, max_streams_per_peer=3)) as server,
        running(memory, NodeConfig(measure_tokens=0)) as greedy,
        running(memory, NodeConfig(measure_tokens=0)) as other,
    ):
        await greedy.dialer.connect(server.addrs[0])
        await other.dialer.connect(server.addrs[0])
        peer = ID.from_base58(server.peer_id)
        held = []
        with trio.fail_after(BOUND_S):
            # Three silent streams use the greedy peer's whole budget ...
            for _ in range(3):
                stream = await greedy.host.new_stream(peer, [TProtocol(status.PROTOCOL_ID)])
                await stream.write(b"\x05")  # a frame header, and no body
                held.append(stream)
            await eventually(lambda: server.guard.running(greedy.peer_id) == 3)
            # ... so its fourth is turned away, while another peer is served.
            with pytest.raises(NetworkError):
                await greedy.finder.status_of(server.peer_id)
            assert server.guard.refused == 1
            assert (await other.finder.status_of(server.peer_id)).peer_id == server.peer_id
        for stream in held:
            await stream.reset()


async def test_streams_beyond_the_limit_over_all_peers_are_reset_at_once(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # Each peer within its own budget: the node's total (1,024 by default, 4
    # here) still bounds the inbound streams it serves at once.
    small = NodeConfig(measure_tokens=0, max_streams_per_peer=3, max_streams=4)
    async with (
        running(memory, small) as server,
        running(memory, NodeConfig(measure_tokens=0)) as a,
        running(memory, NodeConfig(measure_tokens=0)) as b,
        running(memory, NodeConfig(measure_tokens=0)) as c,
    ):
        peer = ID.from_base58(server.peer_id)
        held = []
        with trio.fail_after(BOUND_S):
            for node, count in ((a, 3), (b, 1)):
                await node.dialer.connect(server.addrs[0])
                for _ in range(count):
                    stream = await node.host.new_stream(peer, [TProtocol(status.PROTOCOL_ID)])
                    await stream.write(b"\x05")  # a frame header, and no body
                    held.append(stream)
            await eventually(lambda: server.guard.running() == 4)
            await c.dialer.connect(server.addrs[0])
            with pytest.raises(NetworkError):
                await c.finder.status_of(server.peer_id)
            assert server.guard.refused == 1
            for stream in held:
                await stream.reset()
            await eventually(lambda: server.guard.running() == 0)
            assert (await c.finder.status_of(server.peer_id)).peer_id == server.peer_id


async def test_idle_dht_streams_of_one_peer_cannot_shut_others_out_of_the_dht(
    memory: MemoryNetwork,
) -> None:
    # Real time: under a virtual clock the server's read bound could end the
    # greedy streams before the other peer asks, and the test would prove nothing.
    # py-libp2p answers DHT streams in 12 slots shared by all peers, each
    # reading with no time bound: one peer's 12 silent streams used to leave
    # every other peer's lookup reset (found by the fuzzer).
    async with (
        running(memory, NodeConfig(measure_tokens=0), [SyntheticEngine()]) as server,
        running(memory, NodeConfig(measure_tokens=0)) as greedy,
        running(memory, NodeConfig(measure_tokens=0)) as other,
    ):
        await greedy.dialer.connect(server.addrs[0])
        peer = ID.from_base58(server.peer_id)
        held = []
        with trio.fail_after(BOUND_S):
            for _ in range(12):
                # The greedy peer may or may not see its stream reset before it
                # writes (frame timing): what counts is the server's side.
                with contextlib.suppress(Exception):
                    stream = await greedy.host.new_stream(peer, [TProtocol("/ipfs/kad/1.0.0")])
                    await stream.write(b"\x80")  # half a varint, and then nothing
                    held.append(stream)
            await other.dialer.connect(server.addrs[0])
            assert server.peer_id in await other.finder.find_providers(MODEL)
        assert server.discovery is not None
        # Beyond its share, the greedy peer was turned away.
        assert server.discovery.kademlia.streams_refused >= 12 - KAD_STREAMS_PER_PEER
        for stream in held:
            with contextlib.suppress(Exception):
                await stream.reset()


# --- the provider's session table --------------------------------------------------------


def _served(peer: str, n: int, *, last_used: float, active: int = 0) -> providerlib.ServedSession:
    return providerlib.ServedSession(
        session_id=f"{peer}-{n}".encode(),
        peer=peer,
        model_id=MODEL,
        keys=None,  # type: ignore[arg-type]
        wallet=None,
        last_used=last_used,
        active=active,
    )


def test_one_consumer_cannot_evict_anothers_session() -> None:
    provider = providerlib.Provider(
        providerlib.Config(max_sessions=6, max_sessions_per_peer=3),
        [],
        create_new_key_pair().private_key,
        lambda _m: None,
    )
    honest = _served("honest", 0, last_used=0.0)
    provider.sessions[honest.session_id] = honest
    # The attacker opens session after session from a few identities.
    for n in range(40):
        attacker = f"attacker{n % 4}"
        assert provider.make_room(attacker, now=1.0 + n)
        s = _served(attacker, n, last_used=1.0 + n)
        provider.sessions[s.session_id] = s
    assert honest.session_id in provider.sessions
    assert len(provider.sessions) <= 6
    per_peer: dict[str, int] = {}
    for s in provider.sessions.values():
        per_peer[s.peer] = per_peer.get(s.peer, 0) + 1
    assert max(per_peer.values()) <= 3


def test_sessions_with_a_request_running_are_never_evicted() -> None:
    provider = providerlib.Provider(
        providerlib.Config(max_sessions=2, max_sessions_per_peer=2),
        [],
        create_new_key_pair().private_key,
        lambda _m: None,
    )
    for n in range(2):
        s = _served("busy", n, last_used=0.0, active=1)
        provider.sessions[s.session_id] = s
    assert not provider.make_room("busy", now=10.0)
    assert not provider.make_room("other", now=10.0)
    assert len(provider.sessions) == 2


def test_paid_sessions_are_never_evicted_and_the_idlest_unpaid_one_goes_first() -> None:
    provider = providerlib.Provider(
        providerlib.Config(max_sessions=3, max_sessions_per_peer=3),
        [],
        create_new_key_pair().private_key,
        lambda _m: None,
    )
    for n in range(2):
        s = replace(_served("payer", n, last_used=5.0), paid=True)
        provider.sessions[s.session_id] = s
    recent, idlest = _served("payer", 7, last_used=6.0), _served("payer", 8, last_used=4.0)
    provider.sessions[idlest.session_id] = idlest
    # Full: the newcomer's room comes from the payer's idlest unpaid session.
    assert provider.make_room("newcomer", now=10.0)
    assert idlest.session_id not in provider.sessions
    provider.sessions[recent.session_id] = recent
    assert provider.make_room("newcomer", now=11.0)
    assert set(provider.sessions) == {b"payer-0", b"payer-1"}
    # Only paid sessions left: nothing may go, for anyone.
    third = replace(_served("payer", 9, last_used=9.0), paid=True)
    provider.sessions[third.session_id] = third
    assert not provider.make_room("newcomer", now=12.0)
    assert not provider.make_room("payer", now=12.0)
    assert len(provider.sessions) == 3


async def test_requests_at_once_in_a_session_are_counted_before_any_wait(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # The attack: K InferOpens at once all saw no request running (the count
    # went up only after reading the request and the chain), so K answers ran
    # before the first acknowledgement.
    provider = providerlib.Provider(
        providerlib.Config(max_requests_per_session=2),
        [],
        create_new_key_pair().private_key,
        lambda _m: None,
    )
    held = _served("peer", 0, last_used=0.0)
    provider.sessions[held.session_id] = held
    admitted: list[providerlib.ServedSession] = []
    answers = [
        provider.lookup("peer", InferOpen(session_id=held.session_id, stream_id=n), admitted)
        for n in (1, 2, 3)
    ]
    assert not isinstance(answers[0], Error)
    assert not isinstance(answers[1], Error)
    assert isinstance(answers[2], Error)
    assert answers[2].code == ErrorCode.BUSY
    assert held.admitted == 2


# --- DHT records --------------------------------------------------------------------------


async def test_a_dht_peer_that_answers_with_junk_crashes_no_node(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # The attack: GET_PROVIDERS answers naming made-up peers at addresses that
    # are no multiaddr (bytes that only fail when read) or an honest node's
    # address under a made-up id. Reading one used to end the asking node.
    async with (
        running(memory, NodeConfig(measure_tokens=0), [SyntheticEngine()]) as provider,
        running(memory, NodeConfig(measure_tokens=0, bootstrap=(provider.addrs[0],))) as liar,
        running(memory, NodeConfig(measure_tokens=0, bootstrap=(liar.addrs[0],))) as joiner,
    ):
        lies = attacks.answer_with_junk(liar, 20, [provider.addrs[0]])
        with trio.fail_after(BOUND_S):
            named = await joiner.finder.find_providers(MODEL)
            # A private node's relay lookup prints every address it was told.
            assert joiner.discovery is not None
            relays = await joiner.discovery.find_relays()
            assert lies.answers > 0
            assert joiner.running
            assert liar.running
            assert provider.running
            # Alive and answering, not just not yet cancelled.
            assert (await liar.finder.status_of(joiner.peer_id)).peer_id == joiner.peer_id
        assert set(named) <= {provider.peer_id, *(str(i) for i in lies.junk_ids)}
        assert all(relay.endswith(tuple(str(i) for i in lies.junk_ids)) for relay in relays)


def _closest_of(key: bytes, others: list[ID]) -> KeyPair:
    """A key pair whose peer id is closer to ``key`` than every one of ``others``."""
    while True:
        keys = create_new_key_pair()
        me = ID.from_pubkey(keys.public_key)
        if sort_peer_ids_by_distance(key, [me, *others])[0] == me:
            return keys


async def test_a_liar_asked_first_neither_ends_a_lookup_nor_crowds_out_the_provider(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # The attack: the peer closest to the key, so the first asked, names
    # twenty made-up providers and twenty made-up closer peers. A walk that
    # stopped at the first answer naming providers, or at the k closest
    # peers whether they answered or not, never reached an honest peer; and
    # one naming twenty pushed the provider out of the few a consumer asks.
    from p2pnode.p2p import discovery as discoverylib

    key = discoverylib.dht_key(MODEL)
    one_at_a_time = replace(discoverylib.Config(), lookup_alpha=1)
    async with (
        running(memory, NodeConfig(measure_tokens=0), [SyntheticEngine()]) as provider,
        running(memory, NodeConfig(measure_tokens=0, bootstrap=(provider.addrs[0],))) as honest,
    ):
        await eventually(lambda: honest.offer_book.get(provider.peer_id) is not None)
        others = [ID.from_base58(provider.peer_id), ID.from_base58(honest.peer_id)]
        boot = NodeConfig(measure_tokens=0, bootstrap=(provider.addrs[0],))
        async with open_memory_node(memory, boot, key_pair=_closest_of(key, others)) as liar:
            lies = attacks.answer_with_junk(liar, 20, [honest.addrs[0]])
            joining = NodeConfig(
                measure_tokens=0,
                bootstrap=(liar.addrs[0], honest.addrs[0]),
                discovery=one_at_a_time,
            )
            async with running(memory, joining) as joiner:
                with trio.fail_after(BOUND_S):
                    named = await joiner.finder.find_providers(MODEL)
                    found = await joiner.finder.discover(MODEL)
                now = trio.current_time()
                asked = [j for j in lies.junk_ids if joiner.reputation.standing(str(j), now)]
        assert lies.answers > 0
        assert provider.peer_id in named[:2], named
        assert len(named) > discoverylib.MAX_DHT_CANDIDATES  # the liar's were heard too
        # Of the peers the records name, a few are asked, and the provider answers.
        assert 0 < len(asked) <= discoverylib.MAX_DHT_CANDIDATES
        assert provider.peer_id in {o.peer_id for o in found}


def test_dht_poisoners_cannot_keep_a_verified_provider_out() -> None:
    # The attack: twenty made-up providers announce a model first; py-libp2p
    # keeps k = 20 records per key, first come first served.
    from libp2p.peer.peerinfo import PeerInfo
    from multiaddr import Multiaddr

    from p2pnode.p2p import discovery as discoverylib
    from p2pnode.p2p import host as hostlib

    cfg = replace(discoverylib.Config(), max_record_keys=3)
    found = discoverylib.Discovery(
        hostlib.build(create_new_key_pair(), hostlib.Config()), cfg, lambda: None
    )
    store = found.kademlia.dht.provider_store
    key = discoverylib.dht_key("m")
    addr = [Multiaddr("/ip4/127.0.0.1/tcp/1")]
    for _ in range(20):
        poison = ID.from_pubkey(create_new_key_pair().public_key)
        store.add_provider(key, PeerInfo(poison, addr))
    assert len(store.get_providers(key)) == 20
    # A provider this node holds a signed offer from still gets its record in.
    honest = create_new_key_pair()
    honest_id = str(ID.from_pubkey(honest.public_key))
    unsigned = offers.Offer(
        peer_id=honest_id,
        addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{honest_id}",),
        models=(offers.ModelOffer(model_id="m"),),
        slots_free=1,
        queue_len=0,
        seq=1,
        timestamp=time.time(),
    )
    signed = replace(unsigned, signature=honest.private_key.sign(unsigned.signing_bytes()))
    body = offers.GOSSIP_CODEC.encode_body(signed)
    assert found.book.consider(body, source=None, now=time.time()) is offers.Verdict.ACCEPTED
    found.kademlia.cache_provider_records(signed)
    providers = {str(p.peer_id) for p in store.get_providers(key)}
    assert honest_id in providers
    assert len(providers) == 20
    # Keys are bounded too: strangers cannot grow the table without end.
    for n in range(10):
        stranger = ID.from_pubkey(create_new_key_pair().public_key)
        store.add_provider(discoverylib.dht_key(f"junk{n}"), PeerInfo(stranger, addr))
    assert len(store.providers) == 3


async def test_a_request_with_a_flood_of_stop_strings_is_refused(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with (
        running(memory, NodeConfig(measure_tokens=0), [SyntheticEngine()]) as prov,
        running(memory, NodeConfig(measure_tokens=0)) as consumer,
    ):
        await consumer.dialer.connect(prov.addrs[0])
        await consumer.finder.refresh_offer(prov.peer_id)
        request = Request(
            model_id=MODEL,
            kind="completion",
            prompt="hi",
            params=Params(max_tokens=4, stop=tuple(f"s{i}" for i in range(5000))),
        )
        with trio.fail_after(BOUND_S):
            refused = await consumer.consumer.request_on(
                prov.peer_id, wire_request(request, "r1", "", 4), _ignore_chunk, set()
            )
        assert isinstance(refused, Refusal)
        assert refused.code is ErrorCode.BAD_FIELD
        assert "stop strings" in refused.reason
        assert prov.provider is not None
        assert prov.provider.counters.requests == 0


async def _ignore_chunk(_chunk: object) -> None:
    return None
