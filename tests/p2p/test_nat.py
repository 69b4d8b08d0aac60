"""Reachability by dial-back from a fresh identity, not py-libp2p's AutoNAT.

See docs/libp2p-traps.md#autonat-reuses-the-connection.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from trio.testing import MockClock

from p2pnode.errors import NetworkError
from p2pnode.p2p import nat
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p.memory import MemoryNetwork
from p2pnode.p2p.node import Node, NodeConfig, open_node
from p2pnode.protocols import dialback
from p2pnode.protocols.dialback import service as dialback_service
from p2pnode.protocols.dialback.messages import DialBackResponse
from p2pnode.simnet.harness import open_memory_node

BOUND_S = 30
A = "/ip4/127.0.0.1/tcp/4001"


def test_judge_needs_two_helpers_to_agree_when_two_answered() -> None:
    assert nat.judge([]).reachability is nat.Reachability.UNKNOWN
    one = nat.judge([DialBackResponse(reachable=(A,))])
    assert (one.reachability, one.confirmed) == (nat.Reachability.PUBLIC, (A,))
    # One peer saying "reachable" against another saying "not" is not enough:
    # a lying peer must not make a NATed node think it is public.
    split = nat.judge([DialBackResponse(reachable=(A,)), DialBackResponse(reachable=())])
    assert split.reachability is nat.Reachability.PRIVATE
    agreed = nat.judge([DialBackResponse(reachable=(A,))] * 2 + [DialBackResponse(reachable=())])
    assert agreed.reachability is nat.Reachability.PUBLIC
    assert nat.judge([DialBackResponse(reachable=())]).reachability is nat.Reachability.PRIVATE


def test_dialable_keeps_tcp_addresses_without_the_peer_id() -> None:
    peer = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
    addrs = [f"{A}/p2p/{peer}", f"/ip4/127.0.0.1/tcp/4002/ws/p2p/{peer}", "/ip6/::1/tcp/5"]
    assert nat.dialable(addrs) == [A, "/ip6/::1/tcp/5"]


async def test_a_listening_node_is_public_and_a_closed_port_is_not() -> None:
    async with (
        open_node(NodeConfig(), key_pair=create_new_key_pair()) as helper,
        open_node(NodeConfig(bootstrap=(helper.addrs[0],)), key_pair=create_new_key_pair()) as me,
    ):
        with trio.fail_after(BOUND_S):
            verdict = await me.reachability.check()
            assert verdict.reachability is nat.Reachability.PUBLIC
            assert verdict.confirmed == tuple(nat.dialable(me.addrs))
            assert (await helper.finder.status_of(me.peer_id)).reachability == "public"
            # A port nobody listens on is not confirmed (AutoNAT would say it is),
            # and an address on another IP than the asker's is not dialled at all.
            stream = await me.dialer.open_stream(helper.peer_id, dialback.PROTOCOL_ID)
            answer = await dialback_service.request(
                stream, ["/ip4/127.0.0.1/tcp/1", "/ip4/192.0.2.7/tcp/4001"], dialback.Config()
            )
        assert answer.reachable == ()
        assert answer.observed.startswith("127.0.0.1:")


@pytest.mark.parametrize("forced", ["public", "private"])
async def test_configured_reachability_is_not_measured(forced: str) -> None:
    async with (
        open_node(NodeConfig(), key_pair=create_new_key_pair()) as helper,
        open_node(
            NodeConfig(bootstrap=(helper.addrs[0],), reachability=forced),
            key_pair=create_new_key_pair(),
        ) as me,
    ):
        with trio.fail_after(BOUND_S):
            verdict = await me.reachability.check()
            assert verdict.forced
            assert verdict.reachability.value == forced
            assert (await helper.finder.status_of(me.peer_id)).reachability == forced


# --- the helper's side: whom it dials, and how often ---------------------------


@asynccontextmanager
async def _listener(host: str) -> AsyncIterator[tuple[int, list[str]]]:
    """A plain TCP listener that records every connection made to it (a would-be victim)."""
    listeners = await trio.open_tcp_listeners(0, host=host)
    port = listeners[0].socket.getsockname()[1]
    accepted: list[str] = []

    async def record(stream: trio.SocketStream) -> None:
        accepted.append(host)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, record, listeners)
        yield port, accepted
        nursery.cancel_scope.cancel()
    for listener in listeners:
        await listener.aclose()


@asynccontextmanager
async def _helper_and_asker(cfg: dialback.Config) -> AsyncIterator[tuple[Node, Node]]:
    async with (
        open_node(NodeConfig(discovery=None, dialback=cfg), key_pair=create_new_key_pair()) as h,
        open_node(
            NodeConfig(discovery=None, bootstrap=(h.addrs[0],)), key_pair=create_new_key_pair()
        ) as me,
    ):
        yield h, me


async def _ask(me: Node, helper: Node, addrs: list[str]) -> DialBackResponse:
    stream = await me.dialer.open_stream(helper.peer_id, dialback.PROTOCOL_ID)
    return await dialback_service.request(stream, addrs, dialback.Config())


def test_dial_targets_are_plain_tcp_on_the_askers_ip_each_once() -> None:
    seen = ipaddress.ip_address("127.0.0.1")
    ok, other = "/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4002"
    refused = [
        "/ip4/127.0.0.2/tcp/4001",  # another host
        "/dns4/localhost/tcp/4001",  # a name: it could resolve anywhere
        "/ip4/127.0.0.1/tcp/4001/ws",
        "/ip4/127.0.0.1/udp/4001/quic-v1",
        "/ip4/127.0.0.1/tcp/0",
        "/ip6/::1/tcp/4001",
        "not a multiaddr",
    ]
    for addr in refused:
        assert nat.dial_targets([addr], seen, 4) == [], addr
    assert nat.dial_targets([ok, ok, other], seen, 4) == [ok, other]
    # Only the first max_addrs listed are looked at.
    assert nat.dial_targets([*refused[:3], ok, other], seen, 4) == [ok]
    assert nat.dial_targets([ok], None, 4) == []  # unknown (relayed) asker
    mapped = ipaddress.ip_address("::ffff:127.0.0.1")
    assert nat.dial_targets([ok], nat.parse_ip(str(mapped)), 4) == [ok]
    six = ipaddress.ip_address("::1")
    assert nat.dial_targets(["/ip6/::1/tcp/4001"], six, 4) == ["/ip6/::1/tcp/4001"]


async def test_the_helper_dials_no_third_party() -> None:
    async with (
        _helper_and_asker(dialback.Config()) as (helper, me),
        _listener("127.0.0.2") as (port, accepted),
    ):
        # 127.0.0.2 is this machine too, and listening: only the filter on the
        # asker's own IP (it connects from 127.0.0.1) keeps it from being dialled.
        with trio.fail_after(BOUND_S):
            answer = await _ask(
                me, helper, [f"/ip4/127.0.0.2/tcp/{port}", f"/dns4/127.0.0.2/tcp/{port}"]
            )
        assert answer.reachable == ()
        assert accepted == []
        assert helper.dialback_helper.counters.dials == 0


async def test_the_helper_dials_each_address_once_and_few_of_them() -> None:
    async with AsyncExitStack() as stack:
        helper, me = await stack.enter_async_context(_helper_and_asker(dialback.Config()))
        ports, accepted = [], []
        for _ in range(5):
            port, hits = await stack.enter_async_context(_listener("127.0.0.1"))
            ports.append(port)
            accepted.append(hits)
        addrs = [f"/ip4/127.0.0.1/tcp/{p}" for p in [ports[0], *ports]]
        with trio.fail_after(BOUND_S):
            await _ask(me, helper, addrs)
        # Of the first four listed (the cap), the repeated one is dialled once.
        assert [len(hits) for hits in accepted] == [1, 1, 1, 0, 0]


async def test_the_helper_does_not_dial_back_through_a_relay() -> None:
    relay_cfg = NodeConfig(discovery=None, relay=relaylib.Config(service=True))
    async with (
        open_node(relay_cfg, key_pair=create_new_key_pair()) as relay,
        open_node(
            NodeConfig(
                discovery=None,
                bootstrap=(relay.addrs[0],),
                reachability="private",
                relay=relaylib.Config(relays=(relay.addrs[0],)),
                relay_check_s=0.2,
            ),
            key_pair=create_new_key_pair(),
        ) as helper,
        open_node(
            NodeConfig(discovery=None, bootstrap=(relay.addrs[0],)), key_pair=create_new_key_pair()
        ) as me,
        _listener("127.0.0.1") as (port, accepted),
    ):
        with trio.fail_after(BOUND_S):
            while not helper.relay.reservations:  # noqa: ASYNC110
                await trio.sleep(0.05)
            for node in (helper, me):  # neither can be dialled: only the relay joins them
                for listener in list(node.host.get_network().listeners.values()):
                    await listener.close()
            await me.relay.dial(f"{relay.addrs[0]}/p2p-circuit/p2p/{helper.peer_id}")
            # Over the circuit, the address the helper sees is the relay's
            # (127.0.0.1 here): an asker could make it dial the relay's host.
            stream = await me.host.new_stream(
                ID.from_base58(helper.peer_id), [dialback.PROTOCOL_ID]
            )
            with pytest.raises(NetworkError, match="unsupported"):
                await dialback_service.request(
                    stream, [f"/ip4/127.0.0.1/tcp/{port}"], dialback.Config()
                )
        assert accepted == []


async def test_dial_back_requests_are_rate_limited_per_peer_and_overall() -> None:
    cfg = dialback.Config(requests_per_peer_per_minute=2, requests_per_minute=3)
    async with (
        _helper_and_asker(cfg) as (helper, me),
        open_node(
            NodeConfig(discovery=None, bootstrap=(helper.addrs[0],)), key_pair=create_new_key_pair()
        ) as other,
    ):
        with trio.fail_after(BOUND_S):
            for _ in range(2):
                await _ask(me, helper, [])
            with pytest.raises(NetworkError, match="rate_limited"):
                await _ask(me, helper, [])
            # Another peer has its own budget, but the overall one is nearly spent.
            await _ask(other, helper, [])
            with pytest.raises(NetworkError, match="rate_limited"):
                await _ask(other, helper, [])
        assert helper.dialback_helper.counters.refused_rate == 2


async def test_reachability_is_measured_after_start_up_then_every_five_minutes(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # 30 s after start (the start-up storm is over by then), then every 300 s.
    started = trio.current_time()
    async with open_memory_node(memory, NodeConfig(measure_tokens=0)) as me:
        checked: list[float] = []
        check = me.reachability.check

        async def recorded(helpers: int = 3) -> nat.Verdict:
            checked.append(trio.current_time() - started)
            return await check(helpers)

        me.reachability.check = recorded  # type: ignore[method-assign]
        await trio.sleep(30 + 2 * 300 + 60)
    assert len(checked) == 3, checked
    for at, due in zip(checked, (30, 330, 630), strict=True):
        assert due <= at < due + 5, checked
