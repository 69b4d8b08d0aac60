"""Sealed token streams between real nodes: tampering is caught, reported, never delivered."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from p2pnode.inference.engine import ChatMessage, Params, Request, collect
from p2pnode.p2p.pricing import PeerStats
from p2pnode.protocols.infer.machine import ProviderMachine
from p2pnode.tests.e2e.network import BOUND_S, MODEL, Network

pytestmark = pytest.mark.slow

STORY = Request(
    model_id=MODEL,
    kind="chat",
    messages=(ChatMessage(role="user", content="Tell me a long story about a dragon."),),
    params=Params(max_tokens=40, temperature=0.0, seed=3),
)


def corrupt_once(
    monkeypatch: pytest.MonkeyPatch, at_seq: int, how: Callable[[bytes, list[bytes]], bytes]
) -> list[bytes]:
    """Make the next provider stream's chunk ``at_seq`` go out altered by ``how``."""
    original = ProviderMachine.chunk
    sent: list[bytes] = []
    done: list[bool] = []

    def chunk(self: ProviderMachine, text: str, tokens: int, *ids: tuple[int, ...]) -> bytes:
        frame = original(self, text, tokens, *ids)
        if self._seq - 1 == at_seq and not done:
            done.append(True)
            return how(frame, sent)
        sent.append(frame)
        return frame

    monkeypatch.setattr(ProviderMachine, "chunk", chunk)
    return sent


def flip_last_bit(frame: bytes, _sent: list[bytes]) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 0x01])


def replay_previous(_frame: bytes, sent: list[bytes]) -> bytes:
    return sent[-1]


@pytest.mark.parametrize("attack", [flip_last_bit, replay_previous], ids=["flipped-bit", "replay"])
async def test_a_tampered_frame_fails_authentication_and_the_stream_fails_over(
    network: Network,
    monkeypatch: pytest.MonkeyPatch,
    attack: Callable[[bytes, list[bytes]], bytes],
) -> None:
    first = await network.add_provider()
    second = await network.add_provider()
    network.consumer.consumer.stats[second.peer_id] = PeerStats(rtt_ms=5000.0)
    expected, _ = await collect(network.engine, STORY)
    corrupt_once(monkeypatch, 2, attack)
    delivered: list[str] = []

    async def deliver(text: str, _tokens: int) -> None:
        delivered.append(text)

    with trio.fail_after(BOUND_S):
        outcome = await network.consumer.generate(STORY, deliver)
    assert "".join(delivered) == expected
    assert outcome.provider == second.peer_id
    assert outcome.failovers == 1
    assert outcome.completion_tokens == 40
    counters = network.consumer.consumer.counters
    assert counters.auth_failures == 1
    assert counters.provider_failures == 1
    # The failed provider is ranked last from now on: tampering is remembered.
    standing = network.consumer.reputation.standing(first.peer_id, trio.current_time())
    assert standing is not None
    assert standing.offences == {"auth": 1}


async def test_requests_share_a_session_concurrently(network: Network) -> None:
    provider = await network.add_provider()
    expected, _ = await collect(network.engine, STORY)
    results: list[str] = []

    async def one() -> None:
        parts: list[str] = []

        async def deliver(text: str, _tokens: int) -> None:
            parts.append(text)

        await network.consumer.generate(STORY, deliver)
        results.append("".join(parts))

    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
    assert results == [expected] * 3
    assert network.consumer.consumer.counters.sessions_opened == 1
    assert provider.provider is not None
    (held,) = provider.provider.sessions.values()
    assert held.requests == 3
