"""Remote auditors, the consumer's side (p2p/consumer.py: remote_scorer, score_on,
misled, caught; docs/architecture.md#audits).

Which providers may audit another's answer, what their score answers are
held to, and what a wrong, failed or refused score costs the auditor. The
nodes run on the memory transport under trio's MockClock; the auditors'
engine is a synthetic one that scores as a test scripts it (named as such:
tests/e2e/test_remote_audits.py has real models scoring real answers).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace

import pytest
import trio
from trio.testing import MockClock

from p2pnode.errors import EngineError
from p2pnode.inference.audit import Audit, Finding, ImpossibleAnswer, Scores
from p2pnode.inference.engine import PENALTIES, Chunk, EngineBusy, ModelInfo, Params, Request
from p2pnode.inference.synthetic import WORD, SyntheticEngine
from p2pnode.p2p import audit as auditlib
from p2pnode.p2p.consumer import Outcome
from p2pnode.p2p.host import short
from p2pnode.p2p.memory import MemoryNetwork
from p2pnode.p2p.node import Node, NodeConfig
from p2pnode.p2p.reputation import Offence
from p2pnode.protocols.infer.messages import Commitment, Done, Receipt
from p2pnode.protocols.infer.messages import Request as WireRequest
from p2pnode.simnet.harness import hold_offers, open_memory_node

MODEL = "synthetic"
WEIGHTS = "cd" * 32
OTHER_WEIGHTS = "ef" * 32
IDS = (11, 12, 13)
BOUND_S = 300  # virtual seconds
REQUEST = Request(
    model_id=MODEL, kind="completion", prompt="hi", params=Params(max_tokens=8, temperature=0.7)
)


def scores(n: int = len(IDS), **changed: object) -> Scores:
    honest = Scores(
        logprobs=(-0.5,) * n,
        gaps=(0.25,) * n,
        kept=(True,) * n,
        below=(0.125,) * n,
        prob=(0.5,) * n,
        possible=(True,) * n,
        prompt_tokens=4,
        text="abc",
        ends_with_eog=False,
        cpu_s=0.01,
    )
    return replace(honest, **changed)  # type: ignore[arg-type]


class ScoringEngine(SyntheticEngine):
    """Synthetic, with a GGUF hash and a scorer that answers ``answer`` (a test
    engine, named as such: scores as scripted, raises the exception it is given)."""

    def __init__(
        self, weights: str = WEIGHTS, model_id: str = MODEL, features: tuple[str, ...] = ()
    ) -> None:
        super().__init__(model_id)
        self._info = ModelInfo(
            model_id=model_id, gguf_sha256=weights, context_length=1 << 20, features=features
        )
        # None: honest-looking scores of as many ids as asked.
        self.answer: Scores | BaseException | None = None
        self.asked: list[tuple[Request, tuple[int, ...]]] = []

    @asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[trio.abc.ReceiveChannel[Chunk]]:
        """The synthetic answer, with a token id and a log-probability per token, as
        an engine that runs weights commits to them."""
        async with super().stream(request) as words:
            send, receive = trio.open_memory_channel[Chunk](0)

            async def with_ids() -> None:
                async with send:
                    async for chunk in words:
                        ids = (7,) * chunk.tokens
                        await send.send(replace(chunk, token_ids=ids, logprobs=(-0.5,) * len(ids)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(with_ids)
                async with receive:
                    yield receive
                nursery.cancel_scope.cancel()

    async def score(self, request: Request, token_ids: Sequence[int]) -> Scores:
        self.asked.append((request, tuple(token_ids)))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer or scores(len(token_ids))


@dataclass
class Net:
    me: Node
    others: list[Node]
    engines: list[ScoringEngine]


@asynccontextmanager
async def network(
    memory: MemoryNetwork,
    weights: Sequence[str],
    wallets: Sequence[str | None] = (),
    *,
    serving: bool = True,
    names: Sequence[str] = (),
    features: Sequence[tuple[str, ...]] = (),
) -> AsyncIterator[Net]:
    """A consumer (``serving`` the weights too) and one provider per entry of ``weights``."""
    async with AsyncExitStack() as stack:
        mine = [ScoringEngine()] if serving else []
        me = await stack.enter_async_context(
            open_memory_node(memory, NodeConfig(measure_tokens=0), engines=mine)
        )
        others: list[Node] = []
        engines: list[ScoringEngine] = []
        for n, sha in enumerate(weights):
            engine = ScoringEngine(
                sha,
                names[n] if n < len(names) else MODEL,
                features[n] if n < len(features) else (),
            )
            wallet = wallets[n] if n < len(wallets) else None
            config = NodeConfig(measure_tokens=0, bootstrap=(me.addrs[0],), wallet=wallet)
            others.append(
                await stack.enter_async_context(open_memory_node(memory, config, engines=[engine]))
            )
            engines.append(engine)
        await hold_offers(me, others)
        yield Net(me, others, engines)


def choices_of(me: Node) -> list[list[tuple[str, ModelInfo]]]:
    """Make ``me`` choose the first auditor it may, and keep what it chose from."""
    seen: list[list[tuple[str, ModelInfo]]] = []

    def first(choices: Sequence[tuple[str, ModelInfo]]) -> tuple[str, ModelInfo]:
        seen.append(sorted(choices))
        return seen[-1][0]

    me.consumer.choose_auditor = first  # type: ignore[assignment]
    return seen


def sessions(me: Node, peer: str) -> list[str]:
    """The models ``me`` holds a session with ``peer`` for."""
    return [model for held, model in me.consumer._sessions if held == peer]


def offences(me: Node, peer: str) -> dict[str, int]:
    standing = me.consumer.reputation.standing(peer, trio.current_time())
    return {} if standing is None else standing.offences


async def test_an_auditor_is_another_provider_of_the_weights_never_banned_caught_or_a_partner(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    weights = [WEIGHTS, WEIGHTS, OTHER_WEIGHTS, WEIGHTS, WEIGHTS, WEIGHTS, WEIGHTS]
    wallets = ["0xAa", None, None, None, None, "0xaA", "0xbb"]
    async with network(memory, weights, wallets) as net:
        me = net.me
        audited, fair, other_weights, banned, caught, partner, stranger = (
            n.peer_id for n in net.others
        )
        seen = choices_of(me)
        want = ModelInfo(model_id=MODEL, gguf_sha256=WEIGHTS)
        auditor = me.auditor
        assert auditor is not None

        # Every provider of the weights but the audited one, and never this node.
        scorer = await me.consumer.remote_scorer(WEIGHTS, frozenset({audited}))
        everyone = [fair, banned, caught, stranger]
        assert seen[-1] == sorted((p, want) for p in everyone)
        assert scorer is not None
        assert (scorer.peer, scorer.models()) == (seen[-1][0][0], [want])
        # A partner: its offer names the audited one's wallet (in any case).
        assert partner not in [p for p, _ in seen[-1]]

        # Whichever of them is audited, wherever the book lists it, all the
        # others are chosen from (but its partner).
        for excluded in [o.peer_id for o in me.offer_book.offers()]:
            chosen = len(seen)
            await me.consumer.remote_scorer(WEIGHTS, frozenset({excluded}))
            assert len(seen) == chosen + 1
            assert excluded not in [p for p, _ in seen[-1]]
            assert len(seen[-1]) >= 4

        me.consumer.reputation.record(banned, Offence.CHEATED, trio.current_time())
        auditor.records[caught] = auditlib.Record(audits=1, failed=1, caught="weights: swapped")
        await me.consumer.remote_scorer(WEIGHTS, frozenset({audited}))
        assert seen[-1] == sorted((p, want) for p in (fair, stranger))
        # Several audited peers: none of them, and none of their partners.
        await me.consumer.remote_scorer(WEIGHTS, frozenset({audited, fair}))
        assert seen[-1] == [(stranger, want)]
        assert await me.consumer.remote_scorer(WEIGHTS, frozenset({fair, stranger})) is not None
        assert seen[-1] == sorted((p, want) for p in (audited, partner))
        # Nobody left, or nobody with the weights: no scorer, and no choice made.
        asked = len(seen)
        assert await me.consumer.remote_scorer(WEIGHTS, frozenset(everyone + [audited])) is None
        assert await me.consumer.remote_scorer("00" * 32, frozenset()) is None
        assert len(seen) == asked
        # Other weights are scored only by their own provider.
        await me.consumer.remote_scorer(OTHER_WEIGHTS, frozenset())
        assert seen[-1] == [(other_weights, ModelInfo(model_id=MODEL, gguf_sha256=OTHER_WEIGHTS))]


async def test_a_request_with_penalties_is_audited_only_by_a_provider_that_offers_them(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # An auditor of an earlier version would score as if there were none, and
    # call an honest provider's penalised answer a cheat.
    features = [(), (), (PENALTIES,)]
    async with network(memory, [WEIGHTS] * 3, features=features) as net:
        audited, plain, able = (n.peer_id for n in net.others)
        seen = choices_of(net.me)
        penalties = frozenset({PENALTIES})
        scorer = await net.me.consumer.remote_scorer(WEIGHTS, frozenset({audited}), None, penalties)
        assert scorer is not None
        assert scorer.peer == able
        assert [p for p, _ in seen[-1]] == [able]
        assert (
            await net.me.consumer.remote_scorer(WEIGHTS, frozenset({able}), None, penalties) is None
        )
        # A plain request: any of them.
        await net.me.consumer.remote_scorer(WEIGHTS, frozenset({audited}))
        assert [p for p, _ in seen[-1]] == sorted([plain, able])


async def test_a_remote_score_is_a_score_request_answered_in_the_auditors_commitment(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    # The auditor serves the same weights under a name of its own.
    async with network(memory, [WEIGHTS], names=["smol-copy"]) as net:
        (auditor,), (engine,) = net.others, net.engines
        choices_of(net.me)
        scorer = await net.me.consumer.remote_scorer(WEIGHTS, frozenset())
        assert scorer is not None
        assert scorer.peer == auditor.peer_id
        # Scores at the bounds: a kept token's mass before it and its own sum to 1.
        engine.answer = scores(logprobs=(-0.25, -1.5, -0.0625), below=(0.5,) * 3)

        got = await scorer.score(replace(REQUEST, continuation="Once"), IDS)
        # What the auditor's engine said, through its signed commitment
        # (log-probabilities in millinats on the wire).
        assert got == scores(logprobs=(-0.25, -1.5, -0.062), below=(0.5,) * 3)
        ((asked, ids),) = engine.asked
        assert ids == IDS
        assert (asked.model_id, asked.kind, asked.prompt) == ("smol-copy", "completion", "hi")
        assert (asked.continuation, asked.params.temperature) == ("Once", 0.7)
        standing = net.me.consumer.reputation.standing(auditor.peer_id, trio.current_time())
        assert standing is not None
        assert (standing.served, standing.offences) == (1, {})
        counters = net.me.consumer.counters
        assert (counters.provider_failures, counters.provider_refusals) == (0, 0)
        assert auditor.provider is not None
        assert auditor.provider.counters.scored == 1

        # Each score request scores the kind of answer it is asked to.
        engine.answer = scores(1)
        await scorer.score(replace(REQUEST, kind="chat"), IDS[:1])
        assert [a.kind for a, _ in engine.asked] == ["completion", "chat"]
        assert auditor.provider.counters.scored == 2


async def test_an_answer_no_run_of_the_model_gives_is_said_by_the_auditor(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with network(memory, [WEIGHTS]) as net:
        (auditor,), (engine,) = net.others, net.engines
        engine.answer = ImpossibleAnswer("token 2 is past the end of the answer")
        with pytest.raises(ImpossibleAnswer) as caught:
            await net.me.consumer.score_on(auditor.peer_id, MODEL, REQUEST, IDS)
        assert str(caught.value).startswith("token 2 is past the end of the answer (auditor ")
        assert offences(net.me, auditor.peer_id) == {}


NO_MODEL = "bad_field: sent scores no model gives"


@pytest.mark.parametrize(
    ("answer", "offence", "said"),
    [
        # Scores no model gives: its signature on them is a broken promise.
        (scores(logprobs=(0.5, -1.0, -1.0)), Offence.BROKEN_PROMISE, NO_MODEL),
        (
            scores(below=(0.75,) * 3, prob=(0.5,) * 3),
            Offence.BROKEN_PROMISE,
            NO_MODEL,
        ),
        # Busy: a refusal like any, counted as one.
        (
            EngineBusy("every slot is busy"),
            Offence.REFUSED,
            "provider refused: busy every slot is busy",
        ),
        # Past its context, or its engine failing: nobody's fault.
        (
            EngineError("the prompt is past the context"),
            None,
            "provider refused: bad_field the prompt is past the context",
        ),
    ],
    ids=["positive-logprob", "mass-above-one", "busy", "engine-error"],
)
async def test_a_score_answer_that_is_wrong_refused_or_failed_costs_what_it_says(
    answer: Scores | Exception,
    offence: Offence | None,
    said: str,
    memory: MemoryNetwork,
    autojump_clock: MockClock,
) -> None:
    async with network(memory, [WEIGHTS]) as net:
        (auditor,), (engine,) = net.others, net.engines
        engine.answer = answer
        with pytest.raises(EngineError) as failed:
            await net.me.consumer.score_on(auditor.peer_id, MODEL, REQUEST, IDS)
        assert str(failed.value) == f"auditor {short(auditor.peer_id)}: {said}"
        counters = net.me.consumer.counters
        if offence is None:
            assert offences(net.me, auditor.peer_id) == {}
            assert (counters.provider_failures, counters.provider_refusals) == (0, 0)
        else:
            assert offences(net.me, auditor.peer_id) == {offence.value: 1}
            refused = offence is Offence.REFUSED
            assert (counters.provider_failures, counters.provider_refusals) == (
                int(not refused),
                int(refused),
            )
            assert counters.broken_promises == int(offence is Offence.BROKEN_PROMISE)


async def test_an_auditor_that_goes_silent_fails_like_any_provider(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with network(memory, [WEIGHTS]) as net:
        (auditor,), (engine,) = net.others, net.engines

        async def hang(_request: Request, _ids: Sequence[int]) -> Scores:
            await trio.sleep_forever()
            raise AssertionError

        engine.score = hang  # type: ignore[method-assign]
        with trio.fail_after(BOUND_S), pytest.raises(EngineError) as failed:
            await net.me.consumer.score_on(auditor.peer_id, MODEL, REQUEST, IDS)
        assert str(failed.value) == f"auditor {short(auditor.peer_id)}: provider silent for 30 s"
        assert offences(net.me, auditor.peer_id) == {Offence.FAILED.value: 1}
        assert net.me.consumer.counters.provider_failures == 1


async def test_an_outvoted_auditor_broke_a_promise(
    memory: MemoryNetwork, autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with network(memory, [WEIGHTS]) as net:
        (auditor,) = net.others
        await net.me.consumer.score_on(auditor.peer_id, MODEL, REQUEST, IDS)
        assert sessions(net.me, auditor.peer_id) == [MODEL]
        await net.me.consumer.misled(auditor.peer_id)
        counters = net.me.consumer.counters
        assert (counters.outvoted_auditors, counters.broken_promises) == (1, 1)
        assert offences(net.me, auditor.peer_id) == {Offence.BROKEN_PROMISE.value: 1}
        assert caplog.messages[-1] == (
            f"provider {short(auditor.peer_id)}: bad_field: sent scores two other auditors"
            " contradict (broken_promise; score 4.0)"
        )
        # Our sessions with it end: the next request opens a new one.
        assert sessions(net.me, auditor.peer_id) == []
        await net.me.consumer.misled(auditor.peer_id)
        assert (counters.outvoted_auditors, counters.broken_promises) == (2, 2)


async def test_a_provider_caught_is_never_asked_again_and_its_sessions_end(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with network(memory, [WEIGHTS, WEIGHTS]) as net:
        cheater, other = net.others
        me = net.me
        await me.consumer.score_on(cheater.peer_id, MODEL, REQUEST, IDS)
        await me.consumer.score_on(other.peer_id, MODEL, REQUEST, IDS)
        wire = WireRequest(request_id="r", model_id=MODEL, kind="completion", prompt="hi")
        receipt = Receipt(
            session_id=b"s",
            requests=1,
            prompt_tokens=1,
            completion_tokens=3,
            commitment=Commitment(request_hash=b"h", gguf_sha256=WEIGHTS, prompt_tokens=1),
        )
        done = Done(finish_reason="length", prompt_tokens=1, completion_tokens=3, receipt=receipt)
        verdict = Audit(
            findings=(Finding("weights", "another model"),),
            tokens=3,
            logprob_mean_diff=2.0,
            logprob_max_diff=3.0,
            greedy_worst_gap=4.0,
            outside=1,
            pits=(),
        )
        await me.consumer.caught(auditlib.Job(cheater.peer_id, wire, done, "abc"), verdict)
        assert me.consumer.counters.caught == 1
        assert offences(me, cheater.peer_id) == {Offence.CHEATED.value: 1}
        assert me.consumer.reputation.banned(cheater.peer_id, trio.current_time())
        assert sessions(me, cheater.peer_id) == []
        assert sessions(me, other.peer_id) == [MODEL]
        await me.consumer.caught(auditlib.Job(other.peer_id, wire, done, "abc"), verdict)
        assert me.consumer.counters.caught == 2


async def test_an_answer_or_a_score_by_other_weights_than_the_offer_names_is_a_broken_promise(
    memory: MemoryNetwork, autojump_clock: MockClock
) -> None:
    async with network(memory, [WEIGHTS, WEIGHTS], serving=False) as net:
        (liar, honest), (engine, _) = net.others, net.engines
        await net.me.consumer.score_on(honest.peer_id, MODEL, REQUEST, IDS)
        # Its offer (held by the consumer) names WEIGHTS; it now runs others.
        engine._info = replace(engine._info, gguf_sha256=OTHER_WEIGHTS)
        with pytest.raises(EngineError) as failed:
            await net.me.consumer.score_on(liar.peer_id, MODEL, REQUEST, IDS)
        assert str(failed.value).endswith("scored with other weights than its offer names")
        assert offences(net.me, liar.peer_id) == {Offence.BROKEN_PROMISE.value: 1}
        # Its sessions end; the others' stay, and no open is left half-done.
        assert (sessions(net.me, liar.peer_id), sessions(net.me, honest.peer_id)) == ([], [MODEL])
        assert len(net.me.consumer._opening) == 0

        parts: list[str] = []

        async def deliver(text: str, _tokens: int) -> None:
            parts.append(text)

        outcome = await net.me.generate(REQUEST, deliver, only=[liar.peer_id])
        # Its whole answer was streamed before its Done named the weights: the
        # text stands (unacknowledged), and no token is left to ask another for.
        assert outcome == Outcome("length", 0, REQUEST.params.max_tokens, "", 0)
        assert "".join(parts) == WORD * REQUEST.params.max_tokens
        assert offences(net.me, liar.peer_id) == {Offence.BROKEN_PROMISE.value: 2}
        # The other provider is asked to score what the liar streamed (the
        # failover's cross-check), and not for the answer.
        assert net.me.auditor is not None
        # The audit first hashes the bundled GGUF in a worker thread (p2p/audit.py:
        # local_scorers); the clock must not jump while that thread works.
        autojump_clock.autojump_threshold = 5.0
        with trio.fail_after(BOUND_S):
            await net.me.auditor.drained()
        autojump_clock.autojump_threshold = 0.0
        assert honest.provider is not None
        # (one score request before, for the test)
        assert (honest.provider.counters.requests, honest.provider.counters.scored) == (2, 2)
        # An honest provider's answer by the weights it offers is taken as it is.
        parts.clear()
        outcome = await net.me.generate(REQUEST, deliver, only=[honest.peer_id])
        assert outcome == Outcome("length", 1, REQUEST.params.max_tokens, honest.peer_id, 0)
        assert offences(net.me, honest.peer_id) == {}
