"""The unary adapter and the stream helpers under a peer that stops cooperating."""

from __future__ import annotations

import trio
import trio.testing

from p2pnode.protocols import unary_service
from p2pnode.protocols.status.machine import ClientMachine, ServerMachine
from p2pnode.protocols.status.messages import StatusRequest, StatusResponse
from p2pnode.protocols.stream import ERROR_GRACE_S, reset_quietly
from p2pnode.protocols.wire import DEFAULT_MAX_FRAME


class _Memory:
    """One end of a trio memory stream with the face of a libp2p stream."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self._inner = inner
        self.reset_called = False

    async def read(self, n: int | None = None) -> bytes:
        data = await self._inner.receive_some(n)
        if not data:
            raise EOFError
        return data

    async def write(self, data: bytes) -> None:
        await self._inner.send_all(data)

    async def close(self) -> None:
        await self._inner.send_eof()

    async def reset(self) -> None:
        self.reset_called = True
        await self._inner.aclose()


class _Stuck:
    """A stream whose reset never completes (a peer that stopped reading, a dead link)."""

    async def read(self, n: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError

    async def write(self, data: bytes) -> None:
        await trio.sleep_forever()

    async def close(self) -> None:
        await trio.sleep_forever()

    async def reset(self) -> None:
        await trio.sleep_forever()


async def test_reset_quietly_gives_up_after_its_grace_even_when_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A shield inside move_on_after used to make the grace bound dead code:
    # a cancelled caller then waited on a stuck reset for good.
    started = trio.current_time()
    with trio.move_on_after(0.1):
        await reset_quietly(_Stuck())
    assert trio.current_time() - started == ERROR_GRACE_S


async def test_an_answer_too_late_ends_the_stream_without_blaming_the_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    left, right = trio.testing.memory_stream_pair()
    client, server = _Memory(left), _Memory(right)

    async def slow_answer(_request: StatusRequest) -> StatusResponse:
        await trio.sleep(10)  # our own work, slower than the protocol's bound
        raise AssertionError("not reached")

    await client.write(ClientMachine(DEFAULT_MAX_FRAME).send_request(StatusRequest()))
    # Returns: no "unexpected" state error from the machine, no blame for the client.
    await unary_service.serve(server, ServerMachine(DEFAULT_MAX_FRAME), slow_answer, 1.0)
    assert trio.current_time() == 1.0
    assert server.reset_called
