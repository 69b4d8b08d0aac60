"""Failover the hard ways: providers that hang, are cut off, or stop at the worst moment.

A provider cancelled cleanly resets its stream and the consumer moves on at
once (tests/e2e/test_openai_shim.py has that with the real model). These
are the other ways a provider goes: silent with the stream open (a hung
process), its links cut without a goodbye (a pulled cable), after its last
token but before Done. The nodes run on the memory transport under trio's
MockClock, so the consumer's timeouts pass in virtual time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import replace

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from trio.testing import MockClock

from p2pnode.errors import (
    EngineError,
    ErrorCode,
    NetworkError,
    NoProviderError,
    RemoteProtocolError,
)
from p2pnode.inference.engine import ChatMessage, Chunk, Params, Request, Usage
from p2pnode.inference.synthetic import WORD, SyntheticEngine
from p2pnode.p2p import provider as providerlib
from p2pnode.p2p.consumer import Config as ConsumerConfig
from p2pnode.p2p.consumer import (
    Outcome,
    ReplyGuard,
    offence_of_refusal,
    offence_of_violation,
    wire_request,
)
from p2pnode.p2p.histograms import Histogram
from p2pnode.p2p.memory import MemoryNetwork
from p2pnode.p2p.node import Node, NodeConfig
from p2pnode.p2p.reputation import Offence
from p2pnode.protocols import session
from p2pnode.protocols.infer.machine import ProviderMachine
from p2pnode.protocols.infer.messages import (
    MAX_REQUESTS_PER_SESSION,
    Alternative,
    Done,
    Receipt,
    Turn,
)
from p2pnode.protocols.infer.messages import Chunk as WireChunk
from p2pnode.protocols.infer.messages import Request as WireRequest
from p2pnode.protocols.infer.messages import TokenLogprob as WireTokenLogprob
from p2pnode.protocols.infer.service import Config as InferConfig
from p2pnode.protocols.refusal import Refusal
from p2pnode.protocols.session import RejectCode, admission
from p2pnode.simnet.harness import hold_offers, open_memory_node, until

MODEL = "synthetic"
TOKENS = 24
BOUND_S = 300  # virtual seconds


class ScriptedEngine(SyntheticEngine):
    """Emits ``pieces`` (a token each), then ends the answer, or with ``fail`` set,
    calls it and never finishes (named: a test engine; it ignores stop strings)."""

    def __init__(self, pieces: list[str], *, gap_s: float = 0.0) -> None:
        super().__init__(MODEL)
        self.pieces = pieces
        self.gap_s = gap_s  # a pause before each piece after the first
        self.fail: Callable[[], Awaitable[None]] | None = None
        self.requests = 0

    @asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[trio.abc.ReceiveChannel[Chunk]]:
        if request.model_id != MODEL:
            raise EngineError(f"model {request.model_id!r} is not served here")
        self.requests += 1
        send, receive = trio.open_memory_channel[Chunk](1024)

        async def emit() -> None:
            async with send:
                for n, piece in enumerate(self.pieces):
                    if n and self.gap_s:
                        await trio.sleep(self.gap_s)
                    await send.send(Chunk(piece, 1))
                if self.fail is None:
                    usage = Usage(prompt_tokens=1, completion_tokens=len(self.pieces))
                    await send.send(Chunk("", 0, "length", usage))
                    return
                await self.fail()
                await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(emit)
            async with receive:
                yield receive
            nursery.cancel_scope.cancel()


class FailingEngine(ScriptedEngine):
    """Emits ``after`` tokens, then hangs (or calls ``fail``) and never finishes."""

    def __init__(self, after: int) -> None:
        super().__init__([WORD] * after)
        self.fail = trio.sleep_forever


async def _cut_off_after(node: Node, delay_s: float) -> None:
    """Close every link of ``node`` without yamux's goodbye: its peers see the bytes stop.

    After ``delay_s``, so that the tokens emitted before have reached the consumer.
    """
    await trio.sleep(delay_s)
    for conn in node.host.get_network().get_connections():
        await conn.muxed_conn.secured_conn.close()


@asynccontextmanager
async def _network(
    memory: MemoryNetwork,
    failing: ScriptedEngine,
    consumer: ConsumerConfig | None = None,
    honest: SyntheticEngine | None = None,
) -> AsyncIterator[tuple[Node, Node, Node]]:
    """A consumer, the failing provider (ranked first) and an honest one."""
    async with AsyncExitStack() as stack:
        config = NodeConfig(measure_tokens=0, consumer=consumer or ConsumerConfig())
        me = await stack.enter_async_context(open_memory_node(memory, config))
        boot = (me.addrs[0],)
        bad = await stack.enter_async_context(
            open_memory_node(
                memory, NodeConfig(measure_tokens=0, bootstrap=boot), engines=[failing]
            )
        )
        good = await stack.enter_async_context(
            open_memory_node(
                memory,
                NodeConfig(measure_tokens=0, bootstrap=boot),
                engines=[honest or SyntheticEngine()],
            )
        )
        # The failing provider claims to be much faster: it is asked first.
        bad.offering.set_models((replace(bad.offering.models[0], tokens_per_s=10_000.0),))
        good.offering.set_models((replace(good.offering.models[0], tokens_per_s=100.0),))
        await hold_offers(me, (bad, good), _known)
        yield me, bad, good


@asynccontextmanager
async def _consumer_and_provider(
    memory: MemoryNetwork,
    engine: SyntheticEngine,
    *,
    consumer: ConsumerConfig | None = None,
    provider: providerlib.Config | None = None,
) -> AsyncIterator[tuple[Node, Node]]:
    """A consumer, and one provider of ``engine`` that joins through it."""
    config = NodeConfig(measure_tokens=0, consumer=consumer or ConsumerConfig())
    async with open_memory_node(memory, config) as me:
        joining = NodeConfig(
            measure_tokens=0,
            bootstrap=(me.addrs[0],),
            provider=provider or providerlib.Config(),
        )
        async with open_memory_node(memory, joining, engines=[engine]) as serving:
            yield me, serving


@asynccontextmanager
async def _consumer_and_providers(
    memory: MemoryNetwork, engines: list[ScriptedEngine], consumer: ConsumerConfig | None = None
) -> AsyncIterator[Node]:
    """A consumer holding the offers of one provider per engine, each joined through it."""
    async with AsyncExitStack() as stack:
        config = NodeConfig(measure_tokens=0, consumer=consumer or ConsumerConfig())
        me = await stack.enter_async_context(open_memory_node(memory, config))
        joining = NodeConfig(measure_tokens=0, bootstrap=(me.addrs[0],))
        nodes = [
            await stack.enter_async_context(open_memory_node(memory, joining, engines=[engine]))
            for engine in engines
        ]
        await hold_offers(me, nodes)
        yield me


def _known(me: Node, node: Node) -> bool:
    held = me.offer_book.get(node.peer_id)
    return held is not None and held.models[0].tokens_per_s > 0


def _request(max_tokens: int = TOKENS) -> Request:
    return Request(
        model_id=MODEL, kind="completion", prompt="hi", params=Params(max_tokens=max_tokens)
    )


async def _generate(me: Node, request: Request) -> tuple[str, Outcome]:
    texts: list[str] = []

    async def deliver(text: str, _tokens: int) -> None:
        texts.append(text)

    outcome = await me.generate(request, deliver)
    return "".join(texts), outcome


@pytest.mark.parametrize("after", [0, 5], ids=["before-first-token", "mid-stream"])
async def test_a_provider_that_hangs_is_left_for_the_next(
    after: int, memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    failing = FailingEngine(after)
    async with _network(memory, failing) as (me, bad, good):
        started = trio.current_time()
        with trio.fail_after(BOUND_S):
            text, outcome = await _generate(me, _request())
        waited = trio.current_time() - started
    assert failing.requests == 1
    # The whole answer, each token once: the rest came from the honest provider.
    assert text == WORD * TOKENS
    assert outcome.provider == good.peer_id
    assert outcome.failovers == (1 if after else 0)
    # The silence was waited out once, no longer than the provider was allowed.
    infer = InferConfig()
    allowed = infer.chunk_gap_s if after else infer.first_chunk_s
    assert allowed <= waited < allowed + 5
    # A hang before the first token must leave time to ask another provider.
    assert infer.first_chunk_s < ConsumerConfig().try_budget_s


async def test_a_provider_cut_off_mid_stream_is_left_for_the_next(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    failing = FailingEngine(7)
    async with _network(memory, failing) as (me, bad, good):
        failing.fail = lambda: _cut_off_after(bad, 1.0)
        with trio.fail_after(BOUND_S):
            text, outcome = await _generate(me, _request())
    assert text == WORD * TOKENS
    assert outcome.provider == good.peer_id
    assert outcome.failovers == 1
    standing = me.reputation.standing(bad.peer_id, trio.current_time())
    assert standing is not None
    assert standing.offences


async def test_a_provider_silent_after_its_last_token_leaves_a_full_answer(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # Every token asked for arrived, then no Done: nothing is left to ask
    # another provider for, and the answer ends as one that hit its length.
    failing = FailingEngine(TOKENS)
    async with _network(memory, failing) as (me, bad, good):
        with trio.fail_after(BOUND_S):
            text, outcome = await _generate(me, _request())
        assert good.provider is not None
        assert good.provider.counters.requests == 0
    assert text == WORD * TOKENS
    assert outcome.finish_reason == "length"
    assert outcome.completion_tokens == TOKENS


async def test_tokens_delivered_start_the_try_budget_anew(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # The try budget counts time without progress: a provider that streamed
    # part of the answer and then hung longer than the whole budget still
    # leaves the rest of the answer to another provider.
    failing = FailingEngine(5)
    budget = ConsumerConfig(try_budget_s=10.0)
    assert InferConfig().chunk_gap_s > budget.try_budget_s
    async with _network(memory, failing, budget) as (me, bad, good):
        with trio.fail_after(BOUND_S):
            text, outcome = await _generate(me, _request())
    assert text == WORD * TOKENS
    assert outcome.provider == good.peer_id
    assert outcome.failovers == 1


async def test_tokens_delivered_start_the_count_of_failed_providers_anew(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # Six providers, each streaming a sixth of the answer before it hangs: more
    # than max_attempts fail, but each after a token, and the answer is whole.
    per = TOKENS // 6
    assert ConsumerConfig().max_attempts < 6
    engines = [FailingEngine(per) for _ in range(6)]
    async with _consumer_and_providers(memory, engines) as me:
        with trio.fail_after(BOUND_S * 2):
            text, outcome = await _generate(me, _request())
    assert text == WORD * TOKENS
    assert outcome.failovers == 5
    assert [e.requests for e in engines] == [1] * 6


async def test_a_stop_string_across_the_failover_point_ends_the_answer(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # The first provider sent "Hello wor" and hung; the next one continues
    # with "ld, and more". Neither saw "world" whole: the consumer does.
    first = ScriptedEngine(["Hello", " wor"])
    first.fail = trio.sleep_forever
    second = ScriptedEngine(["ld", ",", " and", " more"])
    request = replace(_request(), params=Params(max_tokens=TOKENS, stop=("world",)))
    async with _network(memory, first, honest=second) as (me, bad, good):
        with trio.fail_after(BOUND_S):
            text, outcome = await _generate(me, request)
    assert text == "Hello "
    assert outcome.finish_reason == "stop"
    assert outcome.provider == good.peer_id
    assert outcome.completion_tokens == 3  # "Hello", " wor", "ld"


async def test_a_provider_that_ignores_stop_strings_is_cut_at_the_first(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    ignores = ScriptedEngine(["one", " two", " STOP", " three"])
    request = replace(_request(), params=Params(max_tokens=TOKENS, stop=("STOP", "zzz")))
    async with _network(memory, ignores) as (me, bad, good):
        with trio.fail_after(BOUND_S):
            text, outcome = await _generate(me, request)
            # Held-back text that turned out not to be a stop string still arrives.
            held, held_outcome = await _generate(
                me, replace(request, params=Params(max_tokens=TOKENS, stop=(" threeX",)))
            )
    assert (text, outcome.finish_reason, outcome.provider) == ("one two ", "stop", bad.peer_id)
    assert held == "one two STOP three"
    assert held_outcome.finish_reason == "length"


async def test_text_held_back_for_a_stop_string_comes_with_its_tokens(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # " STOP" could begin " STOPX": held back (a token, no text) until " three"
    # shows it does not; then both arrive, told as the two tokens they took.
    # (0.1 s apart: each piece leaves in a frame of its own, past the batch window.)
    engine = ScriptedEngine(["one", " two", " STOP", " three", " four"], gap_s=0.1)
    request = replace(_request(), params=Params(max_tokens=TOKENS, stop=(" STOPX",)))
    async with _consumer_and_provider(memory, engine) as (me, _provider):
        await hold_offers(me, (_provider,))
        delivered: list[tuple[str, int]] = []

        async def deliver(text: str, tokens: int) -> None:
            delivered.append((text, tokens))

        with trio.fail_after(BOUND_S):
            outcome = await me.generate(request, deliver)
    assert delivered == [("one", 1), (" two", 1), (" STOP three", 2), (" four", 1)]
    assert sum(t for _, t in delivered) == outcome.completion_tokens == 5


async def test_an_answer_whose_budget_the_failed_providers_used_up_ends_there(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # The first provider hangs after 5 tokens, the second (continuing) after
    # the other 19: the budget is spent, so nobody is asked for more and the
    # answer ends as "length", with the failover it took.
    async with _network(memory, FailingEngine(5), honest=FailingEngine(TOKENS - 5)) as (
        me,
        _bad,
        _good,
    ):
        with trio.fail_after(BOUND_S):
            text, outcome = await _generate(me, _request())
    assert text == WORD * TOKENS
    assert outcome == Outcome("length", 0, TOKENS, "", 1)


def test_the_wire_request_carries_every_field_of_the_request() -> None:
    request = Request(
        model_id=MODEL,
        kind="chat",
        messages=(ChatMessage(role="user", content="hi"),),
        prompt="p",
        params=Params(max_tokens=50, temperature=0.3, top_p=0.7, stop=("x",), seed=9),
        continuation="Once",
    )
    wire = wire_request(request, "r7", " upon", 20)
    assert wire == WireRequest(
        request_id="r7",
        model_id=MODEL,
        kind="chat",
        messages=(Turn(role="user", content="hi"),),
        prompt="p",
        max_tokens=20,  # what is left of the budget
        temperature=0.3,
        top_p=0.7,
        stop=("x",),
        seed=9,
        continuation="Once upon",  # the caller's, then what providers delivered
    )


async def test_a_providers_round_trip_is_measured_in_milliseconds_and_kept(
    memory: MemoryNetwork,
) -> None:
    # The real clock: the status call before the first session takes a few ms.
    engine = ScriptedEngine([WORD] * 4, gap_s=0.03)  # apart: a speed is measured too
    async with _consumer_and_provider(memory, engine) as (me, provider):
        await hold_offers(me, (provider,))
        with trio.fail_after(60):
            await me.generate(_request(4), _ignore)
    stats = me.consumer.stats[provider.peer_id]
    assert stats.rtt_ms is not None
    assert 0.01 < stats.rtt_ms < 10_000
    # The session's open is timed in milliseconds too (simnet reports it).
    assert me.consumer.counters.sessions_opened == 1
    (open_ms,) = me.consumer.open_ms
    assert 0.01 < open_ms < 10_000
    # The speed measured after it joins the round trip; it does not replace it.
    assert stats.tokens_per_s is not None


class BrokenEngine(ScriptedEngine):
    """Fails each request at once (named: a test engine): the provider refuses it."""

    def __init__(self) -> None:
        super().__init__([])

    @asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[trio.abc.ReceiveChannel[Chunk]]:
        self.requests += 1
        raise EngineError("the engine failed")
        yield  # pragma: no cover - a generator, for the context manager


def _flip_a_bit_of_every_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every provider's chunks leave it with their last bit flipped: sealed frames
    that fail authentication at the consumer."""
    chunk = ProviderMachine.chunk

    def flipped(self: ProviderMachine, text: str, tokens: int, *ids: tuple[int, ...]) -> bytes:
        frame = chunk(self, text, tokens, *ids)
        return frame[:-1] + bytes([frame[-1] ^ 1])

    monkeypatch.setattr(ProviderMachine, "chunk", flipped)


@pytest.mark.parametrize(
    ("failing", "tampered", "said"),
    [
        (lambda: FailingEngine(0), False, "silent for 30 s"),  # a network failure
        (lambda: ScriptedEngine([WORD] * TOKENS), True, "authentication"),  # a violation
        (BrokenEngine, False, "the engine failed"),  # a refusal that is a failure
    ],
    ids=["hangs", "tampers", "fails"],
)
async def test_a_request_gives_up_after_four_failed_providers(
    failing: Callable[[], ScriptedEngine],
    tampered: bool,
    said: str,
    memory: MemoryNetwork,
    autojump_clock: MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Five providers that all fail the same way: the fifth is never asked (a
    # request costs at most max_attempts failures, however many providers fail).
    consumer = ConsumerConfig(try_budget_s=10_000.0)
    assert consumer.max_attempts == 4
    engines = [failing() for _ in range(5)]
    if tampered:
        _flip_a_bit_of_every_chunk(monkeypatch)
    async with _consumer_and_providers(memory, engines, consumer) as me:
        with trio.fail_after(BOUND_S * 2), pytest.raises(NoProviderError, match=said):
            await me.generate(_request(), _ignore)
    assert sorted(e.requests for e in engines) == [0, 1, 1, 1, 1]
    assert me.consumer.counters.provider_failures == 4


async def test_a_providers_speed_is_measured_and_a_claim_far_above_it_is_told(
    memory: MemoryNetwork, autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # It claims 10,000 tokens/s (``_network``) and delivers one token per 0.1 s.
    slow = ScriptedEngine([WORD] * 64, gap_s=0.1)
    async with _network(memory, slow) as (me, bad, _good):
        with trio.fail_after(BOUND_S), caplog.at_level("INFO", "p2pnode.p2p.consumer"):
            _, outcome = await _generate(me, _request(64))
    assert outcome.provider == bad.peer_id
    measured = me.consumer.stats[bad.peer_id].tokens_per_s
    assert measured is not None
    assert 9.0 < measured < 11.0
    assert f"provider {bad.peer_id[-8:]} claims 10000 tokens/s, delivered 10" in caplog.messages


async def test_a_claim_within_reach_is_not_told_and_an_offer_gone_mid_answer_is_no_matter(
    memory: MemoryNetwork, autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # It claims 20 tokens/s and delivers 10 (within 4x: nothing to say); its
    # offer leaves our book while it answers (expired, or pushed out).
    slow = ScriptedEngine([WORD] * 64, gap_s=0.1)
    async with _consumer_and_provider(memory, slow) as (me, provider):
        provider.offering.set_models((replace(provider.offering.models[0], tokens_per_s=20.0),))
        await hold_offers(me, (provider,), _known)
        texts: list[str] = []

        async def deliver(text: str, _tokens: int) -> None:
            texts.append(text)
            me.offer_book.forget(provider.peer_id)

        with trio.fail_after(BOUND_S), caplog.at_level("INFO", "p2pnode.p2p.consumer"):
            outcome = await me.generate(_request(64), deliver)
    assert "".join(texts) == WORD * 64
    assert outcome.provider == provider.peer_id
    assert me.consumer.stats[provider.peer_id].tokens_per_s is not None
    assert "claims" not in caplog.text


@pytest.mark.parametrize(("claim", "told"), [(40.0, False), (45.0, True)])
async def test_a_claim_is_told_from_four_times_what_was_delivered(
    memory: MemoryNetwork,
    autojump_clock: MockClock,
    caplog: pytest.LogCaptureFixture,
    claim: float,
    told: bool,
) -> None:
    slow = ScriptedEngine([WORD] * 64, gap_s=0.1)  # 10 tokens/s
    async with _consumer_and_provider(memory, slow) as (me, provider):
        provider.offering.set_models((replace(provider.offering.models[0], tokens_per_s=claim),))
        await hold_offers(me, (provider,), _known)
        with trio.fail_after(BOUND_S), caplog.at_level("INFO", "p2pnode.p2p.consumer"):
            await me.generate(_request(64), _ignore)
    said = f"provider {provider.peer_id[-8:]} claims {claim:.0f} tokens/s, delivered 10"
    assert (said in caplog.messages) is told, caplog.messages


async def test_the_measured_providers_are_bounded_and_the_least_recent_goes(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # 4,096 by default; 2 here.
    two = NodeConfig(measure_tokens=0, consumer=ConsumerConfig(max_measured=2))
    async with AsyncExitStack() as stack:
        me = await stack.enter_async_context(open_memory_node(memory, two))
        boot = NodeConfig(measure_tokens=0, bootstrap=(me.addrs[0],))
        a, b, c = [
            await stack.enter_async_context(
                # Tokens 0.1 s apart: each answer measures a speed.
                open_memory_node(memory, boot, engines=[ScriptedEngine([WORD] * 4, gap_s=0.1)])
            )
            for _ in range(3)
        ]
        await hold_offers(me, (a, b, c))

        async def ask(node: Node) -> None:
            with trio.fail_after(BOUND_S):
                await me.generate(_request(4), _ignore, only=[node.peer_id])

        for node in (a, b, c):
            await ask(node)
        assert list(me.consumer.stats) == [b.peer_id, c.peer_id]
        await ask(b)  # measured again: the most recent now
        await ask(a)
        assert list(me.consumer.stats) == [b.peer_id, a.peer_id]
        assert me.consumer.stats[a.peer_id].tokens_per_s is not None


async def test_a_busy_provider_is_asked_again_only_with_backoff_until_the_budget(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # A 2 s budget: waits of 0.25, 0.5, 1 and the 0.25 left. Computed as
    # "budget - spent", the last wait came out as 2e-16 s, which does not move
    # a clock at 2.0: the consumer asked the busy provider in a hot loop.
    quick = ConsumerConfig(try_budget_s=2.0)
    busy = providerlib.Config(max_handshakes=0)
    async with _consumer_and_provider(memory, SyntheticEngine(), consumer=quick, provider=busy) as (
        me,
        provider,
    ):
        await hold_offers(me, (provider,))
        asked = 0
        serve = provider.host.get_mux().handlers[TProtocol(session.PROTOCOL_ID)]
        async with trio.open_nursery() as nursery:

            async def counted(stream: INetStream) -> None:
                nonlocal asked
                asked += 1
                if asked > 10:  # the hot loop: the clock stands still, stop it here
                    nursery.cancel_scope.cancel()
                await serve(stream)

            provider.host.set_stream_handler(TProtocol(session.PROTOCOL_ID), counted)
            with (
                trio.fail_after(BOUND_S),
                pytest.raises(NoProviderError, match="gave up after 2 s"),
            ):
                await me.generate(_request(4), _ignore)
        assert asked == 4  # at 0, 0.25, 0.75 and 1.75 s; at 2 s it gives up


async def _ignore(_text: str, _tokens: int) -> None:
    return None


async def test_a_provider_streaming_past_the_request_is_cut_and_the_next_finishes(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # 8 tokens asked; a provider that streams 8 + 16 slack + 10 broke the
    # request's terms: nothing past the bound reaches the caller, it counts as
    # a broken promise, and another provider continues from what was delivered.
    asked = 8
    over = ScriptedEngine(["x"] * (asked + ConsumerConfig().token_slack + 10))
    async with _network(memory, over) as (me, bad, good):
        with trio.fail_after(BOUND_S):
            text, outcome = await _generate(me, _request(asked))
        standing = me.reputation.standing(bad.peer_id, trio.current_time())
    assert me.consumer.counters.broken_promises == 1
    assert standing is not None
    assert standing.offences == {"broken_promise": 1}
    # Its frames before the one that crossed the bound were delivered (the
    # first text leaves alone); the honest provider wrote the rest.
    first = len(text) - len(text.lstrip("x"))
    assert 1 <= first < asked
    assert text == "x" * first + WORD * (asked - first)
    assert (outcome.provider, outcome.completion_tokens) == (good.peer_id, asked)


async def test_a_provider_streaming_more_bytes_than_its_tokens_allow_is_cut(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # 4 tokens asked (20 with the slack) allow 20 x 256 = 5,120 bytes; one
    # "token" of 6,000 is past that.
    bloated = ScriptedEngine(["y" * 6000])
    async with _network(memory, bloated) as (me, bad, good):
        with trio.fail_after(BOUND_S):
            text, outcome = await _generate(me, _request(4))
    assert "y" not in text
    assert text == WORD * 4
    assert outcome.provider == good.peer_id
    assert me.consumer.counters.broken_promises == 1


async def test_a_provider_trickling_its_answer_is_left_at_the_answers_deadline(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # A token every 25 s never trips the 30 s silence bound; the whole answer
    # must still come within first_chunk_s + 2 s per token asked (30 + 2 x 4).
    slow = ScriptedEngine(["z"] * 4, gap_s=25.0)
    async with _network(memory, slow) as (me, bad, good):
        started = trio.current_time()
        with trio.fail_after(BOUND_S):
            text, outcome = await _generate(me, _request(4))
        waited = trio.current_time() - started
    deadline = InferConfig().first_chunk_s + 4 * ConsumerConfig().max_s_per_token
    assert deadline <= waited < deadline + 5
    assert outcome.provider == good.peer_id
    assert text.startswith("z")
    assert len(text) - len(text.lstrip("z")) == 2  # at 0 s and 25 s, then cut at 38 s


async def test_a_request_asks_at_most_twelve_providers(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # Thirteen providers that each turn us away at once (an allowlist we are
    # not on): refusals cost little, but a request still stops at twelve.
    consumer = ConsumerConfig(try_budget_s=10_000.0)
    assert consumer.max_providers == 12
    others_only = providerlib.Config(
        admission=admission.Config(allowlist=frozenset({"12D3KooWsomeoneelse"}))
    )
    async with AsyncExitStack() as stack:
        me = await stack.enter_async_context(
            open_memory_node(memory, NodeConfig(measure_tokens=0, consumer=consumer))
        )
        boot = (me.addrs[0],)
        nodes = [
            await stack.enter_async_context(
                open_memory_node(
                    memory,
                    NodeConfig(measure_tokens=0, bootstrap=boot, provider=others_only),
                    engines=[SyntheticEngine()],
                )
            )
            for _ in range(13)
        ]
        await hold_offers(me, nodes)
        with trio.fail_after(BOUND_S):
            with pytest.raises(NoProviderError, match="not_allowed"):
                await me.generate(_request(), _ignore)
        refused = sorted(n.provider.counters.sessions_refused for n in nodes if n.provider)
    assert refused == [0] + [1] * 12


async def test_a_node_that_serves_the_model_answers_with_its_own_engine(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    own = ScriptedEngine(["own", " words"])
    async with (
        open_memory_node(memory, NodeConfig(measure_tokens=0), engines=[own]) as me,
        open_memory_node(
            memory,
            NodeConfig(measure_tokens=0, bootstrap=(me.addrs[0],)),
            engines=[ScriptedEngine(["x"])],
        ) as other,
    ):
        await hold_offers(me, (other,))
        delivered: list[tuple[str, int]] = []

        async def deliver(text: str, tokens: int) -> None:
            delivered.append((text, tokens))

        outcome = await me.generate(_request(), deliver)
        assert delivered == [("own", 1), (" words", 1)]
        assert outcome == Outcome("length", 1, 2, "", 0)
        assert own.requests == 1
        # Asked for providers by name, it asks them, not itself.
        delivered.clear()
        only = await me.generate(_request(), deliver, only=[other.peer_id])
        assert (delivered, only.provider) == ([("x", 1)], other.peer_id)
        assert own.requests == 1
        assert me.consumer.counters.requests == 2  # run here or sent, each counts


async def test_requests_at_once_on_a_session_the_provider_forgot_each_open_anew(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # A provider that restarted knows none of our sessions: every request
    # running on the old one is refused UNKNOWN_SESSION at once, and each
    # drops it (the first to come finds it already gone) and goes on.
    async with _consumer_and_provider(memory, SyntheticEngine(MODEL)) as (me, provider):
        await hold_offers(me, (provider,))
        assert (await _generate(me, _request()))[1].provider == provider.peer_id
        assert provider.provider is not None
        provider.provider.sessions.clear()
        outcomes: list[Outcome] = []

        async def one() -> None:
            outcomes.append((await _generate(me, _request()))[1])

        with trio.fail_after(BOUND_S):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(one)
        assert [o.provider for o in outcomes] == [provider.peer_id] * 3
        # Each opened its own: the first session and three more.
        assert len(provider.provider.sessions) == 3
        assert me.consumer.counters.sessions_opened == 4


async def test_the_consumers_counters_count_every_offence(
    memory: MemoryNetwork,
    autojump_clock: MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Two of each: a counter that only remembers "it happened" shows 1.
    busy = NodeConfig(measure_tokens=0, provider=providerlib.Config(max_handshakes=0))
    async with AsyncExitStack() as stack:
        # Busy providers are waited for up to the try budget: a short one here.
        quick = NodeConfig(measure_tokens=0, consumer=ConsumerConfig(try_budget_s=2.0))
        me = await stack.enter_async_context(open_memory_node(memory, quick))
        boot = NodeConfig(measure_tokens=0, bootstrap=(me.addrs[0],))

        async def provider(config: NodeConfig, engine: SyntheticEngine) -> Node:
            return await stack.enter_async_context(
                open_memory_node(memory, config, engines=[engine])
            )

        bloated = [await provider(boot, ScriptedEngine(["y" * 6000])) for _ in range(2)]
        refusing = [await provider(replace(busy, bootstrap=boot.bootstrap), SyntheticEngine())]
        refusing.append(await provider(replace(busy, bootstrap=boot.bootstrap), SyntheticEngine()))
        tampering = [await provider(boot, SyntheticEngine()) for _ in range(2)]
        await hold_offers(me, (*bloated, *refusing, *tampering))
        for bad in (*bloated, *refusing):
            with trio.fail_after(BOUND_S), pytest.raises(NoProviderError):
                await me.generate(_request(4), _ignore, only=[bad.peer_id])
        _flip_a_bit_of_every_chunk(monkeypatch)
        for bad in tampering:
            with trio.fail_after(BOUND_S), pytest.raises(NoProviderError):
                await me.generate(_request(4), _ignore, only=[bad.peer_id])
    counters = me.consumer.counters
    # Each is told once, naming the provider, what it did and its score.
    said = f"provider {bloated[0].peer_id[-8:]}: oversize: streamed past the request's bounds"
    refused = f"provider {refusing[1].peer_id[-8:]}: session rejected: busy (refused; score 1.0)"
    assert caplog.messages.count(f"{said} (1 tokens) (broken_promise; score 4.0)") == 1
    assert caplog.messages.count(refused) == 1
    assert counters.broken_promises == 2
    assert counters.provider_refusals == 2
    assert counters.auth_failures == 2
    assert counters.provider_failures == 4  # refusals are no failures
    assert counters.paid_not_served == 0


async def _ignore(_text: str, _tokens: int) -> None:
    return None


# --- what a refusal says of its provider -------------------------------------------------


R, E = RejectCode, ErrorCode


@pytest.mark.parametrize(
    ("refusal", "streamed", "offence"),
    [
        # A Reject, before any work: only "no such model" breaks its offer's promise.
        (Refusal.of_session(R.UNKNOWN_MODEL, ""), False, Offence.BROKEN_PROMISE),
        (Refusal.of_session(R.BUSY, ""), False, Offence.REFUSED),
        (Refusal.of_session(R.NOT_ALLOWED, ""), False, Offence.REFUSED),
        (Refusal.of_session(R.PRICE_CHANGED, ""), False, Offence.REFUSED),
        (Refusal.of_session(99, "a code from a newer version"), False, Offence.REFUSED),
        # An Error on a request: busy or not allowed are honest before the first token.
        (Refusal.of_request(E.BUSY, ""), False, Offence.REFUSED),
        (Refusal.of_request(E.BUSY, ""), True, Offence.FAILED),
        (Refusal.of_request(E.NOT_ALLOWED, ""), False, Offence.REFUSED),
        (Refusal.of_request(E.UNSUPPORTED, ""), False, Offence.BROKEN_PROMISE),
        (Refusal.of_request(E.INTERNAL, ""), False, Offence.FAILED),
        (Refusal.of_request(E.TIMEOUT, ""), True, Offence.FAILED),
        # MALFORMED shares its value with UNKNOWN_MODEL: told apart by the step.
        (Refusal.of_request(E.MALFORMED, ""), False, Offence.FAILED),
        (Refusal.of_request(99, ""), False, Offence.FAILED),
    ],
)
def test_each_refusal_counts_as_what_it_says_of_the_provider(
    refusal: Refusal, streamed: bool, offence: Offence
) -> None:
    assert offence_of_refusal(refusal, streamed) is offence


@pytest.mark.parametrize(
    ("violation", "offence"),
    [
        (RemoteProtocolError(E.UNAUTHENTIC, "bad tag"), Offence.AUTH),
        (RemoteProtocolError(E.MALFORMED, "not msgpack"), Offence.PROTOCOL),
        (RemoteProtocolError(E.OVERSIZE, "frame too long"), Offence.PROTOCOL),
    ],
)
def test_each_protocol_violation_counts_as_what_it_says_of_the_provider(
    violation: RemoteProtocolError, offence: Offence
) -> None:
    assert offence_of_violation(violation) is offence


# --- the bounds on one provider's answer --------------------------------------------------


def _done(completion_tokens: int) -> Done:
    receipt = Receipt(session_id=b"s", requests=1, prompt_tokens=1, completion_tokens=1)
    return Done(finish_reason="length", prompt_tokens=1, completion_tokens=completion_tokens,
                receipt=receipt)  # fmt: skip


async def test_an_answer_may_reach_its_bounds_and_not_one_token_or_byte_past(
    autojump_clock: MockClock,
) -> None:
    # 8 tokens asked: 8 + 16 of slack, and max(4096, 24 x 256) = 6,144 bytes.
    delivered: list[Chunk] = []

    async def deliver(chunk: Chunk) -> None:
        delivered.append(chunk)

    cfg = ConsumerConfig()
    guard = ReplyGuard(8, cfg, deliver)
    assert (guard.max_tokens, guard.max_bytes) == (24, 6144)
    assert guard.deadline_s == cfg.infer.first_chunk_s + 8 * cfg.max_s_per_token
    await guard.deliver(Chunk("", 0))  # no token: allowed
    await guard.deliver(Chunk("a" * 6000, 23))
    await trio.sleep(1.5)
    await guard.deliver(Chunk("b" * 144, 1))  # the 24th token and the 6,144th byte
    assert (guard.tokens, guard.bytes, len(delivered)) == (24, 6144, 3)
    assert guard.elapsed_s == 1.5  # from the first chunk to the last
    with pytest.raises(RemoteProtocolError) as past:
        await guard.deliver(Chunk("", 1))
    assert offence_of_violation(past.value) is Offence.BROKEN_PROMISE
    assert len(delivered) == 3  # nothing past the bound is delivered
    with pytest.raises(RemoteProtocolError):
        await ReplyGuard(8, cfg, deliver).deliver(Chunk("c" * 6145, 1))
    with pytest.raises(RemoteProtocolError):
        await ReplyGuard(8, cfg, deliver).deliver(Chunk("d", -1))
    assert len(delivered) == 3
    # What the Done claims is bounded alike.
    guard.check_done(_done(24))
    guard.check_done(_done(0))
    for claimed in (25, -1):
        with pytest.raises(RemoteProtocolError, match=f"claims {claimed} tokens"):
            guard.check_done(_done(claimed))


async def test_the_time_of_an_answer_runs_from_its_first_chunk(autojump_clock: MockClock) -> None:
    async def deliver(_chunk: Chunk) -> None:
        return None

    guard = ReplyGuard(8, ConsumerConfig(), deliver)
    assert guard.elapsed_s == 0.0
    await trio.sleep(5.0)  # waiting for the first token is not generation
    await guard.deliver(Chunk("a", 1))
    assert guard.elapsed_s == 0.0
    await trio.sleep(2.0)
    await guard.deliver(Chunk("b", 1))
    assert guard.elapsed_s == 2.0


class RecordingEngine(ScriptedEngine):
    """A ScriptedEngine that keeps the continuation of every request it gets."""

    def __init__(self, pieces: list[str]) -> None:
        super().__init__(pieces)
        self.continuations: list[str] = []

    def stream(
        self, request: Request
    ) -> AbstractAsyncContextManager[trio.abc.ReceiveChannel[Chunk]]:
        self.continuations.append(request.continuation)
        return super().stream(request)


async def test_two_failovers_each_continue_exactly_the_text_so_far(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # Three providers, fastest first: the first two hang mid-answer, each
    # after a few chunks; the third continues from everything already
    # delivered, verbatim, and the failovers are counted once each.
    first = ScriptedEngine(["One", " two", " three"])
    first.fail = trio.sleep_forever
    second = RecordingEngine([" four", " five"])
    second.fail = trio.sleep_forever
    third = RecordingEngine([" six", " seven"])
    async with (
        _network(memory, first, honest=second) as (me, bad, good),
        open_memory_node(
            memory, NodeConfig(measure_tokens=0, bootstrap=(me.addrs[0],)), engines=[third]
        ) as last,
    ):
        last.offering.set_models((replace(last.offering.models[0], tokens_per_s=1.0),))
        await hold_offers(me, (last,), _known)
        with trio.fail_after(BOUND_S):
            text, outcome = await _generate(me, _request())
    assert second.continuations == ["One two three"]
    assert third.continuations == ["One two three four five"]
    assert text == "One two three four five six seven"
    assert (outcome.provider, outcome.failovers) == (last.peer_id, 2)
    assert outcome.completion_tokens == 7
    assert me.consumer.counters.failovers == 2


class _Forgetful(dict[bytes, providerlib.ServedSession]):
    """A provider's session table that keeps nothing: every request finds its
    session unknown, as after a restart, however often it is reopened."""

    def __setitem__(self, key: bytes, value: providerlib.ServedSession) -> None:
        return None


async def test_a_provider_that_keeps_forgetting_its_session_is_reopened_once_then_left(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with _network(memory, ScriptedEngine([WORD] * TOKENS)) as (me, bad, good):
        assert bad.provider is not None
        bad.provider.sessions = _Forgetful()
        text, outcome = await _generate(me, _request())
        assert (text, outcome.provider) == (WORD * TOKENS, good.peer_id)
        # Its session, and one more once it said it knew none: no third.
        assert bad.provider.counters.sessions == 2
        standing = me.consumer.reputation.standing(bad.peer_id, trio.current_time())
        assert standing is not None
        assert standing.offences == {Offence.FAILED.value: 1}
        assert me.consumer.counters.provider_failures == 1


async def test_a_consumer_whose_book_is_empty_finds_the_providers_in_the_dht(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with _consumer_and_provider(memory, SyntheticEngine(MODEL)) as (me, provider):
        await hold_offers(me, (provider,))
        me.offer_book.forget(provider.peer_id)
        assert me.offer_book.offers(MODEL) == []
        text, outcome = await _generate(me, _request())
        assert (text, outcome.provider) == (WORD * TOKENS, provider.peer_id)
        assert me.offer_book.get(provider.peer_id) is not None


async def test_logprobs_a_provider_streams_are_bounded_by_what_was_asked(
    autojump_clock: MockClock,
) -> None:
    delivered: list[WireChunk] = []

    async def deliver(chunk: WireChunk) -> None:
        delivered.append(chunk)

    cfg = ConsumerConfig()
    one = WireTokenLogprob(piece=b"a", logprob=-100, top=(Alternative(piece=b"a", logprob=-100),))

    def chunk(*entries: WireTokenLogprob, tokens: int = 1) -> WireChunk:
        return WireChunk(seq=0, text="a", tokens=tokens, logprob_tokens=entries)

    await ReplyGuard(8, cfg, deliver, top_logprobs=1).deliver(chunk(one))
    assert len(delivered) == 1
    wrong = [
        (chunk(one), -1),  # not asked for
        (chunk(one, one), 1),  # two for one token
        (chunk(one), 0),  # an alternative where none was asked
        (chunk(replace(one, piece=b"p" * 257)), 1),
        (chunk(replace(one, logprob=1)), 1),  # a probability above 1
        (chunk(replace(one, top=(Alternative(piece=b"b" * 257, logprob=-1),))), 1),
    ]
    for sent, top in wrong:
        with pytest.raises(RemoteProtocolError) as caught:
            await ReplyGuard(8, cfg, deliver, top_logprobs=top).deliver(sent)
        assert offence_of_violation(caught.value) is Offence.BROKEN_PROMISE
    # Each within its bounds, but more bytes than 24 tokens' logprobs take.
    wide = WireTokenLogprob(
        piece=b"x" * 256,
        logprob=-1,
        top=tuple(Alternative(piece=b"y" * 256, logprob=-1) for _ in range(20)),
    )
    guard = ReplyGuard(8, cfg, deliver, top_logprobs=20)
    await guard.deliver(chunk(wide, wide, wide, tokens=3))
    with pytest.raises(RemoteProtocolError, match="more logprobs"):
        await guard.deliver(chunk(wide, tokens=1))
    assert len(delivered) == 2


def test_a_histogram_counts_each_value_in_the_first_bucket_that_holds_it() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        histogram.observe(value)
    shown = histogram.snapshot()
    assert shown.counts == (2, 2, 1)  # le 0.1, le 1, above
    assert shown.observed == 5
    assert shown.total == pytest.approx(8.65)
    histogram.observe(0.0)
    assert shown.counts == (2, 2, 1)  # a snapshot does not move


async def test_a_request_beyond_a_full_session_goes_to_a_free_provider(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    """Four requests fill the session with the first-ranked provider (all it runs
    at once in a session): the fifth goes to the other, free provider, rather
    than waiting its turn where it would be refused."""
    slow = ScriptedEngine([WORD] * 6, gap_s=1.0)
    async with _network(memory, slow) as (me, bad, good):
        served: list[str] = []

        async def one() -> None:
            _text, outcome = await _generate(me, _request(6))
            served.append(outcome.provider)

        with trio.fail_after(BOUND_S):
            async with trio.open_nursery() as nursery:
                for _ in range(MAX_REQUESTS_PER_SESSION):
                    nursery.start_soon(one)
                await trio.sleep(2.0)  # (virtual) all four are streaming
                _text, fifth = await _generate(me, _request(6))
    assert served == [bad.peer_id] * MAX_REQUESTS_PER_SESSION
    assert fifth.provider == good.peer_id
    assert bad.provider is not None
    assert bad.provider.refusals == {}  # nothing was sent to be refused


@pytest.mark.parametrize("back", ["elsewhere", "same-address", None])
async def test_the_only_provider_gone_mid_answer_is_waited_for(
    back: str | None, memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    """The only provider stops mid-answer (its connection goes with it) and starts
    again with its identity, at a new address or its old one: the request waits
    for its new offer and finishes the answer there, each token once. Its going
    counts as a failure, not a protocol breach. Not back within ``rejoin_wait_s``,
    the request fails then."""
    key = create_new_key_pair()
    slow = ScriptedEngine([WORD] * TOKENS, gap_s=0.2)
    wait_s = ConsumerConfig().rejoin_wait_s
    async with (
        open_memory_node(memory, NodeConfig(measure_tokens=0)) as hub,
        open_memory_node(memory, NodeConfig(measure_tokens=0, bootstrap=(hub.addrs[0],))) as me,
    ):
        # The provider joins through the hub: the consumer dials it itself.
        joining = NodeConfig(measure_tokens=0, bootstrap=(hub.addrs[0],))
        texts: list[str] = []
        halfway = trio.Event()
        gone_at = trio.current_time()

        async def deliver(text: str, _tokens: int) -> None:
            texts.append(text)
            if len("".join(texts)) >= 5 * len(WORD):
                halfway.set()

        async def provider(task_status: trio.TaskStatus[list[str]]) -> None:
            nonlocal gone_at
            async with open_memory_node(memory, joining, key_pair=key, engines=[slow]) as node:
                await until(lambda: me.offer_book.get(node.peer_id) is not None, BOUND_S)
                task_status.started(list(node.addrs))
                await halfway.wait()
                gone_at = trio.current_time()
            if back is None:
                return
            # Meanwhile the consumer's dial to the old address fails, and the
            # swarm refuses to dial the provider for a minute.
            with pytest.raises(NetworkError):
                await me.dialer.open_stream(node.peer_id, session.PROTOCOL_ID)
            await trio.sleep(wait_s / 3)
            engine = SyntheticEngine(MODEL)
            restart = joining
            if back == "same-address":
                listen = tuple(a.rsplit("/p2p/", 1)[0] for a in first_addrs)
                restart = replace(joining, host=replace(joining.host, listen=listen))
            async with open_memory_node(memory, restart, key_pair=key, engines=[engine]) as again:
                assert (list(again.addrs) == first_addrs) == (back == "same-address")
                await trio.sleep_forever()

        with trio.fail_after(BOUND_S):
            async with trio.open_nursery() as nursery:
                first_addrs = await nursery.start(provider)
                if back:
                    outcome = await me.generate(_request(), deliver)
                else:
                    with pytest.raises(NoProviderError):
                        await me.generate(_request(), deliver)
                    waited = trio.current_time() - gone_at
                nursery.cancel_scope.cancel()
        standing = me.reputation.standing(str(ID.from_pubkey(key.public_key)), 0.0)
    assert standing is not None
    assert set(standing.offences) == {Offence.FAILED.value}
    if back:
        assert "".join(texts) == WORD * TOKENS
        assert outcome.failovers == 1
        assert outcome.provider == str(ID.from_pubkey(key.public_key))
    else:
        assert wait_s <= waited < wait_s + 1
    assert slow.requests == 1


@asynccontextmanager
async def _via_a_hub(
    memory: MemoryNetwork, engine: ScriptedEngine
) -> AsyncIterator[tuple[Node, Node]]:
    """A consumer and a provider that know each other only through a hub's gossip
    (the consumer dials the provider itself), the consumer holding its offer."""
    async with open_memory_node(memory, NodeConfig(measure_tokens=0)) as hub:
        joining = NodeConfig(measure_tokens=0, bootstrap=(hub.addrs[0],))
        async with (
            open_memory_node(memory, joining) as me,
            open_memory_node(memory, joining, engines=[engine]) as provider,
        ):
            await until(lambda: me.offer_book.get(provider.peer_id) is not None, BOUND_S)
            yield me, provider


async def test_a_provider_that_keeps_going_and_coming_back_is_asked_again_once(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # Each time it is asked, it streams a token, drops its connection to the
    # consumer and signs a newer offer (which costs it nothing): asked again
    # every time, it would be asked for every token of the answer.
    engine = ScriptedEngine([WORD])
    async with _via_a_hub(memory, engine) as (me, provider):
        assert provider.discovery is not None
        announce = provider.discovery.offer_changed

        async def drop_and_come_back() -> None:
            announce()
            for conn in provider.host.get_network().get_connections(me.host.get_id()):
                await conn.close()

        engine.fail = drop_and_come_back
        with trio.fail_after(BOUND_S), pytest.raises(NoProviderError):
            await me.generate(_request(), _ignore)
    assert engine.requests == 2


async def test_a_silent_provider_is_not_asked_again_when_it_announces_itself(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # Silent with its connection open, it did not go away: its offers, newer
    # every period while we waited for its first token, say nothing new.
    engine = FailingEngine(0)
    async with _via_a_hub(memory, engine) as (me, provider):
        held = me.offer_book.get(provider.peer_id)
        with trio.fail_after(BOUND_S), pytest.raises(NoProviderError, match="silent"):
            await me.generate(_request(), _ignore)
        now = me.offer_book.get(provider.peer_id)
        assert held is not None
        assert now is not None
        assert now.seq > held.seq
    assert engine.requests == 1
