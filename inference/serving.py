"""Which engines a provider runs, opened together for the node's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from p2pnode.inference import llamacpp, upstream
from p2pnode.inference.engine import Engine


@dataclass(frozen=True, slots=True, kw_only=True)
class Serving:
    """The models a provider serves: GGUF files and upstream servers."""

    llamacpp: tuple[llamacpp.Config, ...] = ()
    upstream: tuple[upstream.Config, ...] = ()


@asynccontextmanager
async def open_engines(
    serving: Serving, told: Callable[[str], None] = lambda _note: None
) -> AsyncIterator[list[Engine]]:
    """Open every engine (models load in worker threads); all close on exit.
    ``told`` hears each engine once it is open (the CLI's progress)."""
    async with AsyncExitStack() as stack:
        engines: list[Engine] = []
        for cfg in serving.llamacpp:
            engines.append(await stack.enter_async_context(llamacpp.open_llamacpp(cfg)))
            told(f"{cfg.model_id} loaded")
        for ucfg in serving.upstream:
            engines.append(await stack.enter_async_context(upstream.open_upstream(ucfg)))
            told(f"{', '.join(ucfg.models)} at an upstream server")
        yield engines
