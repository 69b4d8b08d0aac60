"""Audits through the network: a consumer catches a provider that serves a cheaper
quant under the bundled model's name, stops asking it, and remembers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from p2pnode.errors import NoProviderError
from p2pnode.inference.engine import ChatMessage, Chunk, Engine, Params, Request
from p2pnode.inference.llamacpp import Config, LlamaCppEngine, bundled_model_path, open_llamacpp
from p2pnode.p2p import audit as auditlib
from p2pnode.p2p.reputation import Offence
from p2pnode.protocols.infer.messages import Commitment, Done, Receipt, request_hash
from p2pnode.protocols.infer.messages import Request as WireRequest
from p2pnode.simnet.cheaters import Cheater, Wrapper
from p2pnode.tests.e2e.network import BOUND_S, MODEL, Network

pytestmark = pytest.mark.slow


def chat(question: str) -> Request:
    return Request(
        model_id=MODEL,
        kind="chat",
        messages=(ChatMessage(role="user", content=question),),
        params=Params(max_tokens=24, temperature=0.0),
    )


async def ask(net: Network, question: str) -> str:
    parts: list[str] = []

    async def deliver(text: str, _tokens: int) -> None:
        parts.append(text)

    with trio.fail_after(BOUND_S):
        await net.consumer.generate(chat(question), deliver)
    return "".join(parts)


async def audits_done(auditor: auditlib.Auditor, count: int) -> None:
    with trio.fail_after(BOUND_S):
        await auditor.wait_for(count)


async def test_a_cheaper_quant_is_caught_and_never_asked_again(
    network: Network, degraded_gguf: Path, tmp_path: Path
) -> None:
    net = network
    auditor = net.consumer.auditor
    assert auditor is not None
    assert isinstance(net.engine, LlamaCppEngine)
    async with open_llamacpp(Config(model_path=degraded_gguf, model_id=MODEL, n_threads=1)) as q:
        cheater = await net.add_provider(
            Cheater("cheap_quant", q, net.engine.models()[0], net.engine)
        )
        # Its first answer reaches the user (audits never hold a stream up) ...
        assert await ask(net, "Tell me about dragons.")
        await audits_done(auditor, 1)
        # ... and the audit that followed caught it.
        record = auditor.records[cheater.peer_id]
        assert (record.audits, record.failed) == (1, 1)
        assert record.caught.startswith("logprobs")
        assert net.consumer.consumer.counters.caught == 1
        standing = net.consumer.reputation.standing(cheater.peer_id, trio.current_time())
        assert standing is not None
        assert standing.banned
        assert standing.offences == {Offence.CHEATED.value: 1}
        # It is asked no more: alone, no provider is left, and why is said.
        with pytest.raises(NoProviderError, match="all caught by audits"):
            await ask(net, "Tell me about dragons.")
        # An honest one serves, and passes its first audit.
        honest = await net.add_provider()
        assert await ask(net, "Tell me about dragons.")
        await audits_done(auditor, 2)
    assert auditor.records[honest.peer_id].passed == 1
    assert not auditor.is_caught(honest.peer_id)
    # `p2pnode offers` shows each provider's audit record.
    shown = {o["peer_id"]: o["audits"] for o in net.consumer.control({"op": "offers"})["offers"]}
    assert shown[honest.peer_id] == {"audits": 1, "passed": 1, "caught": ""}
    assert shown[cheater.peer_id]["caught"].startswith("logprobs:")
    assert auditor.counters.failed == 1
    # Only the first answer of a provider is audited for sure; the rest at the rate.
    assert auditor.records[honest.peer_id].answers == 1


async def test_audit_records_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "audits.json"

    async def nobody(_sha: str, _peers: object, _stack: object) -> None:
        return None

    async def ignore(_job: object, _verdict: object) -> None:
        return None

    first = auditlib.Auditor(auditlib.Config(path=path), nobody, ignore)
    first.records["cheat"] = auditlib.Record(audits=2, failed=1, caught="greedy: token 3")
    first.records["fine"] = auditlib.Record(audits=3, passed=3)
    first.save()
    again = auditlib.Auditor(auditlib.Config(path=path), nobody, ignore)
    assert again.is_caught("cheat")
    assert not again.is_caught("fine")
    assert again.records["fine"].score == 1.0
    # A damaged file costs the records, never the node.
    path.write_text("{not json")
    assert auditlib.Auditor(auditlib.Config(path=path), nobody, ignore).records == {}


async def test_inflated_usage_is_refused_on_the_first_answer(network: Network) -> None:
    net = network
    assert isinstance(net.engine, LlamaCppEngine)
    info = net.engine.models()[0]
    inflating = await net.add_provider(Cheater("usage_inflation", net.engine, info, net.engine))
    # Caught without an audit or a model: its ids do not add up to its usage.
    # The text it streamed was the whole answer (the user has it); the usage
    # it signed is not countersigned, and counts against it.
    assert await ask(net, "Tell me about dragons.")
    assert net.consumer.consumer.counters.broken_promises == 1
    standing = net.consumer.reputation.standing(inflating.peer_id, trio.current_time())
    assert standing is not None
    assert standing.offences == {Offence.BROKEN_PROMISE.value: 1}
    assert net.consumer.auditor is not None
    assert net.consumer.auditor.counters.audits == 0
    # Its receipt was not countersigned (it hears so once our Error reaches it).
    provider = inflating.provider
    assert provider is not None
    with trio.fail_after(BOUND_S):
        while provider.counters.bad_acks == 0:  # noqa: ASYNC110 - our Error in flight
            await trio.sleep(0.02)
    assert provider.counters.bad_acks == 1


async def test_a_commitment_no_honest_run_gives_is_caught_without_scoring(
    network: Network,
) -> None:
    # Fewer log-probabilities than ids, or more ids than were asked for: the
    # provider is caught on sight, and the auditor spends no prefill on it.
    assert isinstance(net_engine := network.engine, LlamaCppEngine)
    (info,) = net_engine.models()
    assert info.gguf_sha256 is not None
    caught: list[str] = []

    async def scorers(_sha: str, _peers: object, _stack: object, _needs: object) -> LlamaCppEngine:
        return net_engine

    async def on_caught(job: auditlib.Job, verdict: object) -> None:
        caught.append(job.peer)

    auditor = auditlib.Auditor(auditlib.Config(), scorers, on_caught)
    wire = WireRequest(
        request_id="r1", model_id=MODEL, kind="completion", prompt="hi", max_tokens=4
    )
    honest = Commitment(
        request_hash=request_hash(wire),
        gguf_sha256=info.gguf_sha256,
        prompt_tokens=2,
        completion_tokens=2,
        token_ids=(5, 6),
        logprobs=(-1, -2),
    )
    for peer, lie in (
        ("short", replace(honest, logprobs=(-1,))),
        ("long", replace(honest, token_ids=tuple(range(50)), logprobs=(-1,) * 50)),
    ):
        receipt = Receipt(session_id=b"s", requests=1, prompt_tokens=2, completion_tokens=2,
                          commitment=lie)  # fmt: skip
        done = Done(finish_reason="length", prompt_tokens=2, completion_tokens=2, receipt=receipt)
        verdict = await auditor.audit(auditlib.Job(peer, wire, done, ""))
        assert verdict is not None
        assert [f.check for f in verdict.findings] == ["ids"]
    assert caught == ["short", "long"]
    assert auditor.scoring_s == 0.0


async def test_an_auditor_too_busy_to_score_judges_nobody(network: Network) -> None:
    # Its engine's one slot is taken and nobody may queue: the audit is not
    # done (counted), and the provider is not caught for our being busy.
    busy_cfg = Config(model_path=bundled_model_path(), model_id=MODEL, n_threads=1, queue_limit=0)
    async with open_llamacpp(busy_cfg) as busy:
        (info,) = busy.models()
        assert info.gguf_sha256 is not None

        async def scorers(
            _sha: str, _peers: object, _stack: object, _needs: object
        ) -> LlamaCppEngine:
            return busy

        async def on_caught(_job: auditlib.Job, _verdict: object) -> None:
            raise AssertionError("nobody is caught")

        auditor = auditlib.Auditor(auditlib.Config(), scorers, on_caught)
        wire = WireRequest(request_id="r", model_id=MODEL, kind="completion", prompt="hi")
        commitment = Commitment(
            request_hash=request_hash(wire),
            gguf_sha256=info.gguf_sha256,
            token_ids=(5,),
            logprobs=(-1,),
        )
        receipt = Receipt(
            session_id=b"s", requests=1, prompt_tokens=0, completion_tokens=1,
            commitment=commitment,
        )  # fmt: skip
        done = Done(finish_reason="length", prompt_tokens=0, completion_tokens=1, receipt=receipt)
        async with busy.stream(chat("Tell me a long story.")):
            assert await auditor.audit(auditlib.Job("p", wire, done, "x")) is None
    assert auditor.counters.errors == 1
    assert auditor.counters.audits == 0
    assert not auditor.is_caught("p")


class DiesAfter(Wrapper):
    """Streams ``inner``'s first ``chunks`` chunks, then its node dies (a test
    wrapper: the provider's process killed mid-answer)."""

    def __init__(self, inner: Engine, chunks: int) -> None:
        super().__init__(inner)
        self._chunks = chunks
        self.die: Callable[[], None] = lambda: None

    @asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[trio.abc.ReceiveChannel[Chunk]]:
        send, receive = trio.open_memory_channel[Chunk](1024)

        async def relay() -> None:
            async with send, self._inner.stream(request) as chunks:
                sent = 0
                async for chunk in chunks:
                    await send.send(chunk)
                    sent += 1
                    if sent == self._chunks:
                        await trio.sleep(0.5)  # what was streamed reaches the consumer
                        self.die()
                        await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay)
            async with receive:
                yield receive
            nursery.cancel_scope.cancel()


async def test_a_failover_cross_checks_what_the_failed_provider_streamed(
    network: Network, degraded_gguf: Path
) -> None:
    # Two providers die mid-answer: an honest one, and one serving a cheaper
    # quant under the model's name. Neither sent its Done (no commitment), but
    # their chunks carried the ids: what each streamed is audited all the same.
    net = network
    auditor = net.consumer.auditor
    assert auditor is not None
    assert isinstance(net.engine, LlamaCppEngine)
    async with open_llamacpp(Config(model_path=degraded_gguf, model_id=MODEL, n_threads=1)) as q:
        engines = {
            "honest": DiesAfter(net.engine, 12),
            "cheater": DiesAfter(Cheater("cheap_quant", q, net.engine.models()[0], net.engine), 12),
        }
        for name, engine in engines.items():
            node = await net.add_provider(engine)
            engine.die = lambda node=node: net.kill(node)  # type: ignore[misc]
            # Its first answer audited already: the cross-check is beyond the rate.
            auditor.records[node.peer_id] = auditlib.Record(audits=1, passed=1, answers=1)
            with trio.fail_after(BOUND_S), pytest.raises(NoProviderError):
                await net.consumer.consumer.generate(
                    chat("Tell me about dragons."), _nothing, only=[node.peer_id]
                )
            await audits_done(auditor, 1 if name == "honest" else 2)
            record = auditor.records[node.peer_id]
            if name == "honest":
                assert (record.audits, record.passed, record.caught) == (2, 2, "")
            else:
                assert (record.audits, record.failed) == (2, 1)
                assert record.caught.startswith("logprobs")
    assert net.consumer.consumer.counters.cross_checks == 2
    assert net.consumer.consumer.counters.caught == 1


async def _nothing(_text: str, _tokens: int) -> None:
    return None
