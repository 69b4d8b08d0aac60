"""Requests that need a feature (penalties, logit_bias) go only to providers that offer it.

An older provider ignores request fields it does not know, so it would
answer as if they had not been sent: the consumer reads the features a
provider's offer lists and asks only those that can, and a provider refuses
a request it cannot honour rather than quietly ignore part of it. Real nodes
on the memory transport under the MockClock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace

import pytest
import trio
from trio.testing import MockClock

from p2pnode.errors import NoProviderError
from p2pnode.inference.engine import (
    GRAMMAR,
    LOGPROBS,
    PENALTIES,
    TOOLS,
    Chunk,
    Format,
    Params,
    Request,
    Tool,
)
from p2pnode.inference.synthetic import SyntheticEngine
from p2pnode.p2p.memory import MemoryNetwork
from p2pnode.p2p.node import Node, NodeConfig
from p2pnode.simnet.harness import hold_offers, open_memory_node

MODEL = "synthetic"
BOUND_S = 60
PENALISED = Params(max_tokens=4, frequency_penalty=0.5, logit_bias=((7, -100.0), (9, 2.5)))


class Recording(SyntheticEngine):
    """The synthetic engine, keeping every request it was asked to stream."""

    def __init__(
        self,
        features: tuple[str, ...],
        recommends: tuple[float | None, float | None] = (None, None),
    ) -> None:
        super().__init__(MODEL, features=features)
        self._info = replace(self._info, temperature=recommends[0], top_p=recommends[1])
        self.asked: list[Request] = []

    @asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[trio.abc.ReceiveChannel[Chunk]]:
        self.asked.append(request)
        async with super().stream(request) as chunks:
            yield chunks


@asynccontextmanager
async def _network(memory: MemoryNetwork, engine: SyntheticEngine) -> AsyncIterator[Node]:
    async with open_memory_node(memory, NodeConfig(measure_tokens=0)) as me:
        joining = NodeConfig(measure_tokens=0, bootstrap=(me.addrs[0],))
        async with open_memory_node(memory, joining, engines=[engine]) as provider:
            await hold_offers(me, (provider,))
            yield me


async def _ask(me: Node, params: Params) -> str:
    parts: list[str] = []

    async def deliver(text: str, _tokens: int) -> None:
        parts.append(text)

    request = Request(model_id=MODEL, kind="completion", prompt="hi", params=params)
    with trio.fail_after(BOUND_S):
        await me.generate(request, deliver)
    return "".join(parts)


async def test_a_provider_that_offers_penalties_gets_them_as_sent(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    engine = Recording(features=(PENALTIES,))
    async with _network(memory, engine) as me:
        assert await _ask(me, PENALISED)
    (asked,) = engine.asked
    assert asked.params == PENALISED


async def test_a_provider_that_does_not_is_never_asked(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    engine = Recording(features=())
    async with _network(memory, engine) as me:
        with pytest.raises(NoProviderError, match="none able to honour presence_penalty"):
            await _ask(me, PENALISED)
        assert me.consumer.counters.sessions_opened == 0
        # A plain request still goes to it.
        assert await _ask(me, Params(max_tokens=4))
    assert [r.params for r in engine.asked] == [Params(max_tokens=4)]


async def test_a_provider_asked_for_what_it_cannot_do_refuses(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # Its offer says it can, its engine no longer can (a stale offer): the
    # provider refuses instead of answering without.
    engine = Recording(features=(PENALTIES,))
    async with _network(memory, engine) as me:
        engine._info = replace(engine._info, features=())  # after the offer went out
        with pytest.raises(NoProviderError):
            await _ask(me, PENALISED)
    assert engine.asked == []


async def test_this_nodes_own_engine_without_the_feature_refuses_too(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    from p2pnode.errors import EngineError

    engine = Recording(features=())
    async with open_memory_node(memory, NodeConfig(measure_tokens=0), engines=[engine]) as me:
        with pytest.raises(EngineError, match="cannot honour presence_penalty"):
            await _ask(me, PENALISED)
    assert engine.asked == []


@pytest.mark.parametrize(
    "params",
    [
        Params(max_tokens=4, presence_penalty=2.5),
        Params(max_tokens=4, logit_bias=((1, 100.5),)),
        Params(max_tokens=4, logit_bias=((1, 1.0), (1, 2.0))),
        Params(max_tokens=4, logit_bias=tuple((i, 1.0) for i in range(301))),
        Params(max_tokens=4, top_logprobs=21),
    ],
)
async def test_a_provider_refuses_penalties_or_biases_out_of_bounds(
    memory: MemoryNetwork, autojump_clock: MockClock, params: Params
) -> None:
    # The shim checks them too; a library caller's or a hostile consumer's
    # request reaches the provider unchecked.
    engine = Recording(features=(PENALTIES, LOGPROBS))
    async with _network(memory, engine) as me:
        with pytest.raises(NoProviderError):
            await _ask(me, params)
        assert engine.asked == []


async def test_a_flood_of_hot_recommendations_cannot_pick_the_default(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # Offers are cheap: two providers say 2.0, one says 0.3; top_p counted
    # on its own, from whoever says it. A temperature above OpenAI's own
    # default of 1 is never taken, however many say it.
    recommends = [(2.0, None), (2.0, 0.5), (0.3, None), (None, 0.5), (None, 0.8)]
    async with AsyncExitStack() as stack:
        me = await stack.enter_async_context(open_memory_node(memory, NodeConfig(measure_tokens=0)))
        joining = NodeConfig(measure_tokens=0, bootstrap=(me.addrs[0],))
        providers = [
            await stack.enter_async_context(
                open_memory_node(memory, joining, engines=[Recording((), recommends=r)])
            )
            for r in recommends
        ]
        await hold_offers(me, providers)
        assert me.recommended_sampling(MODEL) == (0.3, 0.5)


FORMATTED = Params(
    max_tokens=4,
    format=Format(
        kind=TOOLS,
        tools=(Tool(name="get_time", parameters='{"type": "object"}'),),
        tool_choice="get_time",
        parallel=False,
    ),
)


async def test_an_output_format_goes_only_to_providers_with_the_grammar_and_arrives_whole(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    without = Recording(features=(PENALTIES,))
    async with _network(memory, without) as me:
        with pytest.raises(NoProviderError, match="none able to honour response_format"):
            await _ask(me, FORMATTED)
    assert without.asked == []
    able = Recording(features=(GRAMMAR,))
    async with _network(memory, able) as me:
        assert await _ask(me, FORMATTED)
    (asked,) = able.asked
    assert asked.params == FORMATTED
