"""A recorded request sent again, between real nodes: refused, and never generated."""

from __future__ import annotations

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID
from trio.testing import MockClock

from p2pnode.errors import ErrorCode
from p2pnode.inference.engine import ChatMessage, Params, Request
from p2pnode.inference.synthetic import WORD, SyntheticEngine
from p2pnode.p2p.memory import MemoryNetwork
from p2pnode.p2p.node import NodeConfig
from p2pnode.protocols import infer, session
from p2pnode.protocols.infer import service as infer_service
from p2pnode.protocols.infer.machine import ConsumerMachine
from p2pnode.protocols.infer.messages import Chunk, Done
from p2pnode.protocols.infer.messages import Request as WireRequest
from p2pnode.protocols.session import service as session_service
from p2pnode.protocols.stream import next_event
from p2pnode.protocols.wire import Error
from p2pnode.simnet.harness import open_memory_node

pytestmark = pytest.mark.slow
BOUND_S = 30
MODEL = "synthetic"
WIRE = WireRequest(request_id="r1", model_id=MODEL, kind="completion", prompt="Hi", max_tokens=3)


class _Recording:
    """A stream that keeps a copy of each write (what an observer of the wire could keep)."""

    def __init__(self, stream: INetStream) -> None:
        self._stream = stream
        self.writes: list[bytes] = []

    async def read(self, n: int | None = None) -> bytes:
        return await self._stream.read(n)

    async def write(self, data: bytes) -> None:
        self.writes.append(data)
        await self._stream.write(data)

    async def close(self) -> None:
        await self._stream.close()

    async def reset(self) -> None:
        await self._stream.reset()


async def _collect(_chunk: Chunk) -> None:
    return None


def _no_ack(_done: Done) -> bytes:
    return b""


async def test_a_replayed_request_is_refused_and_never_generated(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with (
        open_memory_node(
            memory,
            NodeConfig(measure_tokens=0),
            engines=[SyntheticEngine(MODEL)],
        ) as provider,
        open_memory_node(memory, NodeConfig()) as consumer,
    ):
        assert provider.provider is not None
        stats = provider.provider.counters
        await consumer.dialer.connect(provider.addrs[0])
        pid = ID.from_base58(provider.peer_id)
        with trio.fail_after(BOUND_S):
            stream = await consumer.dialer.open_stream(pid, session.PROTOCOL_ID)
            est = await session_service.open_session(
                stream,
                MODEL,
                5,
                local_peer=consumer.host.get_id(),
                remote_peer=stream.muxed_conn.peer_id,
            )
            # One genuine request on stream id 1, recorded as it leaves.
            recording = _Recording(await consumer.dialer.open_stream(pid, infer.PROTOCOL_ID))
            done = await infer_service.request(
                recording,
                ConsumerMachine(1 << 20, est.keys, est.session_id, 1),
                WIRE,
                _collect,
                _no_ack,
                infer_service.Config(),
            )
            assert done.completion_tokens == 3
            opening = recording.writes[0]  # InferOpen and the sealed Request, one write
            served = provider.provider.sessions[est.session_id]
            assert served.requests == stats.requests == 1

            # The same bytes again, on a fresh stream of the same connection.
            # (Sealing is deterministic: the consumer's own machine for id 1
            # writes exactly these bytes, which is the nonce reuse refused too.)
            replayer = ConsumerMachine(1 << 20, est.keys, est.session_id, 1)
            assert replayer.open(WIRE) == opening
            again = await consumer.dialer.open_stream(pid, infer.PROTOCOL_ID)
            await again.write(opening)
            answer = await next_event(again, replayer)

        assert isinstance(answer, Error)
        assert answer.code == ErrorCode.REPLAYED
        # Nothing was generated or metered for it.
        assert served.requests == stats.requests == 1
        assert stats.cancelled == 0
        assert served.completion_tokens == 3


async def test_sessions_and_requests_between_nodes_still_work(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    """The consumer's and provider's own code paths, with both peer ids bound."""
    async with (
        open_memory_node(
            memory,
            NodeConfig(measure_tokens=0),
            engines=[SyntheticEngine(MODEL)],
        ) as provider,
        open_memory_node(memory, NodeConfig()) as consumer,
    ):
        await consumer.dialer.connect(provider.addrs[0])
        parts: list[str] = []

        async def deliver(text: str, _tokens: int) -> None:
            parts.append(text)

        request = Request(
            model_id=MODEL,
            kind="chat",
            messages=(ChatMessage(role="user", content="Hi"),),
            params=Params(max_tokens=4),
        )
        with trio.fail_after(BOUND_S):
            while consumer.offer_book.get(provider.peer_id) is None:
                await consumer.finder.refresh_offer(provider.peer_id)
            for _ in range(2):  # the second request reuses the session, on a new stream id
                outcome = await consumer.generate(request, deliver)
                assert outcome.completion_tokens == 4
        assert "".join(parts) == WORD * 8
        assert provider.provider is not None
        assert provider.provider.counters.sessions == 1
        assert provider.provider.counters.requests == 2
