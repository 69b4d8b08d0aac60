"""The network fuzzer, small: real attackers over loopback drive every protocol of one node.

``p2pnode simnet --scenario fuzz`` runs the same with 100,000 frames.
"""

from __future__ import annotations

import pytest
import trio

from p2pnode.simnet.fuzz import PROTOCOLS, fuzz, open_target, task_dump, triage

pytestmark = pytest.mark.slow
STUCK_S = 240  # ~40 s alone on 2 cores; a loaded CI run takes longer


async def test_a_fuzzed_node_survives_answers_status_and_serves_an_honest_chat() -> None:
    stuck: list[str] = []
    async with trio.open_nursery() as nursery:

        async def watchdog() -> None:
            # A hang says where it waits (every trio task), then the test fails.
            await trio.sleep(STUCK_S)
            stuck.append(task_dump(limit=400))
            nursery.cancel_scope.cancel()

        nursery.start_soon(watchdog)
        async with open_target() as target:
            report = await fuzz(
                target.node,
                attackers=4,
                frames=3_000,
                seed=1,
                died=target.exited,
                burst=40,
            )
        nursery.cancel_scope.cancel()
    assert not stuck, f"fuzz() did not end within {STUCK_S} s; where it waited:\n{stuck[0]}"
    assert report.node_exits == 0, report.exit_reasons
    assert target.failure is None
    assert report.total_frames >= 3_000
    for protocol in PROTOCOLS:
        assert report.frames[protocol] > 0, f"{protocol} was not exercised"
    assert report.unserved == []
    assert report.status_ok
    assert report.chat_ok, report.chat_text  # the synthetic engine's " tok" words
    assert report.chat_text.strip()
    # Counted frames only: every attack kind that reached the node is listed.
    assert sum(report.kinds.values()) == report.total_frames
    json = report.to_json()
    assert json["fuzz_frames"] == report.total_frames
    assert json["fuzz_node_exits"] == 0
    assert set(json["frames_per_protocol"]) == set(PROTOCOLS)
    assert isinstance(json["rss_growth_mb"], float)


async def test_one_junk_gossipsub_rpc_does_not_end_the_node() -> None:
    # The first crash the fuzzer found: py-libp2p 0.8.1's pubsub handler let
    # protobuf's DecodeError escape, and a 4-byte frame ended the node.
    crash = await triage(["gossip/garbage"], None, tries=3)
    assert crash is None, crash.detail if crash else ""
