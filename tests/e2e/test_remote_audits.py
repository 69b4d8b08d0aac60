"""Audits by another provider: a consumer that does not hold the weights it
buys has other providers of the same GGUF score the answer (a score request
on the infer protocol), and a lone auditor's finding catches nobody until a
second one confirms it (docs/architecture.md#audits).

The model sold here is Gemma 3 270M, which the consumer does not hold (its
own bundled model is SmolLM2): every audit is remote.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from p2pnode.chain.client import AsyncChain
from p2pnode.chain.embedded import MIN_PROVIDER_STAKE, open_embedded
from p2pnode.cli import node_cmd
from p2pnode.inference.engine import Params, Request
from p2pnode.inference.llamacpp import Config, LlamaCppEngine, bundled_model_path, open_llamacpp
from p2pnode.p2p import audit as auditlib
from p2pnode.p2p import market
from p2pnode.p2p.node import Node, NodeConfig
from p2pnode.p2p.reputation import Offence
from p2pnode.simnet.cheaters import Cheater, Framer, swap_model_path
from p2pnode.simnet.harness import start_node
from p2pnode.tests.cli.helpers import invoke
from p2pnode.tests.e2e.network import BOUND_S, Network

pytestmark = pytest.mark.slow

GEMMA = "gemma3-270m"
T = TypeVar("T")


@pytest.fixture
async def gemma() -> AsyncIterator[LlamaCppEngine]:
    cfg = Config(model_path=swap_model_path(), model_id=GEMMA, n_threads=1, slots=2)
    async with open_llamacpp(cfg) as engine:
        yield engine


async def ask(net: Network, provider: Node, prompt: str = "The capital of France is") -> str:
    parts: list[str] = []

    async def deliver(text: str, _tokens: int) -> None:
        parts.append(text)

    request = Request(
        model_id=GEMMA,
        kind="completion",
        prompt=prompt,
        params=Params(max_tokens=16, temperature=0.0),
    )
    with trio.fail_after(BOUND_S):
        await net.consumer.consumer.generate(request, deliver, only=[provider.peer_id])
    return "".join(parts)


def auditor_of(net: Network) -> auditlib.Auditor:
    auditor = net.consumer.auditor
    assert auditor is not None
    return auditor


async def audits_settled(auditor: auditlib.Auditor) -> None:
    with trio.fail_after(BOUND_S):
        await auditor.drained()


def prefer(peer: str) -> object:
    """An auditor choice that takes ``peer`` whenever it may (else the first)."""

    def choose(choices: Sequence[T]) -> T:
        return next((c for c in choices if c[0] == peer), choices[0])  # type: ignore[index]

    return choose


async def test_other_providers_of_the_weights_audit_and_two_catch_a_swap(
    network: Network, gemma: LlamaCppEngine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    net = network
    auditor = auditor_of(net)
    honest = [await net.add_provider(gemma) for _ in range(2)]
    # Sells Gemma (its name and sha256), runs the bundled SmolLM2.
    assert isinstance(net.engine, LlamaCppEngine)
    cheater = await net.add_provider(Cheater("model_swap", net.engine, gemma.models()[0], gemma))

    assert await ask(net, cheater)
    await audits_settled(auditor)
    # Both other providers scored it, each paid (here: served) for a request.
    assert auditor.counters.remote == 2
    assert sorted(p.provider.counters.scored for p in honest) == [1, 1]  # type: ignore[union-attr]
    record = auditor.records[cheater.peer_id]
    assert (record.audits, record.failed) == (1, 1)
    # (SmolLM2 tokenizes the prompt otherwise than Gemma: the usage it claims is off first.)
    assert record.caught.startswith(("usage", "logprobs"))
    standing = net.consumer.reputation.standing(cheater.peer_id, trio.current_time())
    assert standing is not None
    assert standing.offences == {Offence.CHEATED.value: 1}
    # The cheater never audits: it was the one audited, and is caught now.
    assert cheater.provider is not None
    assert cheater.provider.counters.scored == 0

    # An honest provider's first answer: one other provider scores it, and it passes.
    assert await ask(net, honest[0])
    await audits_settled(auditor)
    assert auditor.counters.remote == 3
    assert auditor.records[honest[0].peer_id].passed == 1
    assert honest[1].provider is not None
    assert honest[1].provider.counters.scored == 2  # the cheater is never asked

    # `p2pnode status` says what the audits found, and what a provider scored for others.
    mine = net.consumer.control({"op": "status"})
    assert mine["audits"] == {
        "providers_audited": 2, "providers_caught": 1, "audits": 2, "passed": 1,
        "remote": 3, "disputed": 0, "unconfirmed": 0, "unauditable": 0,
    }  # fmt: skip
    assert honest[1].control({"op": "status"})["audits"]["scored_for_others"] == 2
    monkeypatch.setattr(node_cmd, "_ask_node", lambda _request: mine)
    shown = invoke(tmp_path, "status").stdout
    assert (
        "audits:    1/2 passed, of 2 providers; 1 caught (3 scored by other providers,"
        " 0 disputed, 0 unconfirmed, 0 without the weights)\n"
    ) in shown


async def test_one_lying_auditor_cannot_get_an_honest_provider_caught(
    network: Network, gemma: LlamaCppEngine
) -> None:
    net = network
    auditor = auditor_of(net)
    auditor.cfg = dataclasses.replace(auditor.cfg, rate=1.0)  # every answer audited
    victim = await net.add_provider(gemma)
    framer_engine = Framer(gemma)
    framer = await net.add_provider(framer_engine)

    # The framer is the only other holder: its finding has nobody to confirm it.
    assert await ask(net, victim)
    await audits_settled(auditor)
    assert framer_engine.scored == 1
    assert (auditor.counters.unconfirmed, auditor.counters.audits) == (1, 0)
    assert not auditor.is_caught(victim.peer_id)

    # With an honest auditor beside it, the framer (asked first) is contradicted.
    witness = await net.add_provider(gemma)
    net.consumer.consumer.choose_auditor = prefer(framer.peer_id)  # type: ignore[assignment]
    assert await ask(net, victim)
    await audits_settled(auditor)
    assert framer_engine.scored == 2
    assert auditor.counters.disputed == 1
    assert not auditor.is_caught(victim.peer_id)
    # Asked first, the honest one finds nothing: the victim passes.
    net.consumer.consumer.choose_auditor = prefer(witness.peer_id)  # type: ignore[assignment]
    assert await ask(net, victim)
    await audits_settled(auditor)
    record = auditor.records[victim.peer_id]
    assert (record.audits, record.passed, record.caught) == (1, 1, "")
    assert framer_engine.scored == 2
    # With a third honest auditor, the framer (asked first) is outvoted two to
    # one: the victim passes, and the lie counts against the framer.
    await net.add_provider(gemma)
    net.consumer.consumer.choose_auditor = prefer(framer.peer_id)  # type: ignore[assignment]
    assert await ask(net, victim)
    await audits_settled(auditor)
    assert framer_engine.scored == 3
    assert (auditor.counters.outvoted, auditor.counters.disputed) == (1, 1)
    assert auditor.records[victim.peer_id].passed == 2
    standing = net.consumer.reputation.standing(framer.peer_id, trio.current_time())
    assert standing is not None
    assert standing.offences == {Offence.BROKEN_PROMISE.value: 1}
    assert net.consumer.consumer.counters.outvoted_auditors == 1
    assert net.consumer.consumer.counters.caught == 0


async def test_paid_remote_audits_are_paid_sessions_with_other_wallets(
    gemma: LlamaCppEngine, tmp_path: Path
) -> None:
    # The cheater's wallet runs a second, honest node: a wallet may not audit
    # itself, so only the two providers of other wallets score the cheater,
    # each in a session the consumer opens (and pays) on chain.
    net = await trio.to_thread.run_sync(open_embedded)
    wallets = {"cheater": 1, "auditor_a": 3, "auditor_b": 4}
    for who in wallets.values():
        account = net.accounts[who]
        net.chain.register_provider(account, f"12D3KooWprovider{who}", MIN_PROVIDER_STAKE)
        net.chain.register_model(account, GEMMA, None)
        net.chain.post_bid(account, GEMMA, 10**15)

    def paid(who: int, **kw: object) -> NodeConfig:
        cfg = market.Config(sessions_db=tmp_path / f"sessions-{who}.db", **kw)  # type: ignore[arg-type]
        return NodeConfig(measure_tokens=0, market=cfg)

    def wallet(who: int) -> market.Wallet:
        return market.Wallet(AsyncChain(net.chain), net.accounts[who])

    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        smollm = await stack.enter_async_context(
            open_llamacpp(Config(model_path=bundled_model_path(), model_id="smollm", n_threads=1))
        )
        cheat = Cheater("model_swap", smollm, gemma.models()[0], gemma)
        consumer = (await start_node(nursery, paid(2, session_seconds=1000), wallet=wallet(2))).node
        nodes: dict[str, Node] = {}
        for name, who, engine in (
            ("cheater", 1, cheat),
            ("sibling", 1, gemma),
            ("auditor_a", 3, gemma),
            ("auditor_b", 4, gemma),
        ):
            cfg = replace(paid(who, follow_s=0.2), bootstrap=(consumer.addrs[0],))
            nodes[name] = (await start_node(nursery, cfg, [engine], wallet=wallet(who))).node
        with trio.fail_after(BOUND_S):
            for node in nodes.values():
                while consumer.offer_book.get(node.peer_id) is None:
                    await consumer.finder.refresh_offer(node.peer_id)
        auditor = consumer.auditor
        assert auditor is not None
        assert consumer.markets.consumer is not None
        # Offered the choice, the consumer would take the cheater's sibling.
        consumer.consumer.choose_auditor = prefer(nodes["sibling"].peer_id)  # type: ignore[assignment]

        request = Request(
            model_id=GEMMA,
            kind="completion",
            prompt="The capital of France is",
            params=Params(max_tokens=16, temperature=0.0),
        )
        with trio.fail_after(BOUND_S):
            await consumer.consumer.generate(request, _nothing, only=[nodes["cheater"].peer_id])
            await auditor.drained()
        assert auditor.is_caught(nodes["cheater"].peer_id)
        scored = {n: node.provider.counters.scored for n, node in nodes.items() if node.provider}
        assert scored == {"cheater": 0, "sibling": 0, "auditor_a": 1, "auditor_b": 1}
        # Three paid sessions: the answer's, and one per auditor.
        assert consumer.markets.consumer.counters.opened == 3
        nursery.cancel_scope.cancel()


async def _nothing(_text: str, _tokens: int) -> None:
    return None
