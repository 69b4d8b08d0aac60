"""Reachability by dial-back from a fresh identity (not py-libp2p's AutoNAT, trap 5)."""

from __future__ import annotations

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from p2pnode.p2p import nat
from p2pnode.p2p.node import NodeConfig, open_node
from p2pnode.protocols import dialback
from p2pnode.protocols.dialback.messages import DialBackResponse

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
            verdict = await me.check_reachability()
            assert verdict.reachability is nat.Reachability.PUBLIC
            assert verdict.confirmed == tuple(nat.dialable(me.addrs))
            assert (await helper.status_of(me.peer_id)).reachability == "public"
            # A port nobody listens on is not confirmed (AutoNAT would say it is),
            # and an address on another IP than the asker's is not dialled at all.
            stream = await me._open_stream(ID.from_base58(helper.peer_id), dialback.PROTOCOL_ID)
            answer = await nat.ask(
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
            verdict = await me.check_reachability()
            assert verdict.forced
            assert verdict.reachability.value == forced
            assert (await helper.status_of(me.peer_id)).reachability == forced
