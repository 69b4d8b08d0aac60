"""A synthetic engine for benchmarks: emits tokens as fast as the trio loop takes them.

Not a model (named as such): ``p2pnode bench stream`` uses it to measure
what one sealed stream can carry when the engine is never the bottleneck,
which no real model on a 2-core machine could show. Each "token" is a fixed
short word; usage is exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from p2pnode.errors import EngineError
from p2pnode.inference.engine import Chunk, ModelInfo, Request, Usage

WORD = " tok"


class SyntheticEngine:
    """Serves ``model_id`` by emitting ``WORD`` ``max_tokens`` times."""

    def __init__(
        self, model_id: str = "synthetic", buffer: int = 1024, features: tuple[str, ...] = ()
    ) -> None:
        # ``features``: what it claims to honour (it samples nothing, so any
        # claim is as true as none; tests of routing by feature use it).
        self._info = ModelInfo(model_id=model_id, context_length=1 << 20, features=features)
        self._buffer = buffer
        self._busy = 0

    def models(self) -> list[ModelInfo]:
        return [self._info]

    @property
    def slots_total(self) -> int:
        return 64

    @property
    def slots_free(self) -> int:
        return 64 - self._busy

    @property
    def queue_len(self) -> int:
        return 0

    @asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[trio.abc.ReceiveChannel[Chunk]]:
        if request.model_id != self._info.model_id:
            raise EngineError(f"model {request.model_id!r} is not served here")
        send, receive = trio.open_memory_channel[Chunk](self._buffer)
        self._busy += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._emit, request.params.max_tokens, send)
                async with receive:
                    yield receive
                nursery.cancel_scope.cancel()
        finally:
            self._busy -= 1

    @staticmethod
    async def _emit(count: int, send: trio.MemorySendChannel[Chunk]) -> None:
        async with send:
            try:
                for _ in range(count):
                    await send.send(Chunk(WORD, 1))
                done = Chunk("", 0, "length", Usage(prompt_tokens=1, completion_tokens=count))
                await send.send(done)
            except trio.BrokenResourceError:
                return  # the reader stopped early (a paused or abandoned answer)
