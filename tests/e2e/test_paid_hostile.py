"""Paid sessions against strangers: nobody is served free, nobody is paid for nothing.

Real nodes on 127.0.0.1 and the embedded chain (eth-tester on py-evm). The
provider serves the synthetic engine (named as such: these tests are about
payment, not about the model), so long generations cost no model time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import msgpack
import pytest
import requests
import trio
import trio.lowlevel
from libp2p.crypto.ed25519 import create_new_key_pair

from p2pnode.chain.client import CLAIM_WINDOW_S, AsyncChain
from p2pnode.chain.embedded import MIN_PROVIDER_STAKE, Embedded, open_embedded
from p2pnode.errors import EngineError, NoProviderError, SpendLimitError
from p2pnode.inference.engine import Engine, Params, Request
from p2pnode.inference.llamacpp import Config, bundled_model_path, open_llamacpp
from p2pnode.inference.synthetic import WORD, SyntheticEngine
from p2pnode.p2p import market
from p2pnode.p2p.discovery import verify_peer_signature
from p2pnode.p2p.node import Node, NodeConfig, open_node
from p2pnode.p2p.reputation import Offence
from p2pnode.protocols.infer.messages import RECEIPT_DOMAIN, Receipt
from p2pnode.protocols.session import RejectCode
from p2pnode.simnet.cheaters import Cheater

pytestmark = pytest.mark.slow
BOUND_S = 60
PRICE = 10**15
MODEL = "synthetic"


@dataclass
class Paid:
    embedded: Embedded
    provider: Node
    consumer: Node

    @property
    def provider_market(self) -> market.ProviderMarket:
        assert self.provider.markets.provider is not None
        return self.provider.markets.provider

    @property
    def consumer_market(self) -> market.ConsumerMarket:
        assert self.consumer.markets.consumer is not None
        return self.consumer.markets.consumer

    @property
    def consumer_address(self) -> str:
        return str(self.embedded.accounts[2].address)

    def balances(self) -> tuple[int, int]:
        """The provider's and the consumer's tokens, on chain."""
        chain = self.embedded.chain
        provider, consumer = (chain.balance(a.address) for a in self.embedded.accounts[1:3])
        return provider, consumer


def _market(net: Embedded, who: int, home: Path, **kw: object) -> market.Config:
    return market.Config(sessions_db=home / f"sessions-{who}.db", **kw)  # type: ignore[arg-type]


def _wallet(net: Embedded, who: int) -> market.Wallet:
    return market.Wallet(AsyncChain(net.chain), net.accounts[who])


@pytest.fixture
async def paid(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Paid]:
    """A provider and a consumer on one chain. ``request.param`` "cheap_quant":
    the provider serves a Q4_0 copy of the bundled model under the model's
    name and weights (simnet/cheaters.py); otherwise the synthetic engine."""
    net = await trio.to_thread.run_sync(open_embedded)
    provider_account = net.accounts[1]
    net.chain.register_provider(provider_account, "12D3KooWprovider", MIN_PROVIDER_STAKE)
    net.chain.register_model(provider_account, MODEL, None)
    net.chain.post_bid(provider_account, MODEL, PRICE)
    async with AsyncExitStack() as stack:
        engine: Engine = SyntheticEngine()
        if getattr(request, "param", None) == "cheap_quant":
            cheap = request.getfixturevalue("degraded_gguf")
            vocab = await stack.enter_async_context(
                open_llamacpp(Config(model_path=bundled_model_path(), model_id=MODEL, n_threads=1))
            )
            quant = await stack.enter_async_context(
                open_llamacpp(Config(model_path=cheap, model_id="q4_0", n_threads=1))
            )
            engine = Cheater("cheap_quant", quant, vocab.models()[0], vocab)
        provider = await stack.enter_async_context(
            open_node(
                NodeConfig(measure_tokens=0, market=_market(net, 1, tmp_path, follow_s=0.2)),
                key_pair=create_new_key_pair(),
                wallet=_wallet(net, 1),
                engines=[engine],
            )
        )
        consumer = await stack.enter_async_context(
            open_node(
                NodeConfig(
                    bootstrap=(provider.addrs[0],),
                    market=_market(net, 2, tmp_path, session_seconds=1000),
                ),
                key_pair=create_new_key_pair(),
                wallet=_wallet(net, 2),
            )
        )
        with trio.fail_after(BOUND_S):
            while consumer.offer_book.get(provider.peer_id) is None:
                await consumer.finder.refresh_offer(provider.peer_id)
        yield Paid(net, provider, consumer)


def _request(tokens: int) -> Request:
    return Request(model_id=MODEL, kind="completion", prompt="hi", params=Params(max_tokens=tokens))


async def _nothing(_text: str, _tokens: int) -> None:
    return None


async def test_a_session_closed_on_chain_is_not_served_again(paid: Paid) -> None:
    # The attack: open with a large stake, close at once (pay ~a second, the
    # rest refunded), and keep sending requests in the session.
    with trio.fail_after(BOUND_S):
        await paid.consumer.generate(_request(4), _nothing)
    (session_id,) = paid.consumer_market.open
    consumer_account = paid.embedded.accounts[2]
    await trio.to_thread.run_sync(paid.embedded.chain.close_session, consumer_account, session_id)
    requests_before = paid.provider.provider.counters.requests  # type: ignore[union-attr]
    with trio.fail_after(BOUND_S):
        outcome = await paid.consumer.generate(_request(4), _nothing)
    # Served, but only in a new session the consumer paid for: the closed one
    # was refused before anything was generated in it.
    assert outcome.completion_tokens == 4
    assert paid.consumer_market.counters.opened == 2
    assert session_id not in paid.consumer_market.open
    provider = paid.provider.provider
    assert provider is not None
    assert provider.counters.requests == requests_before + 1
    assert paid.provider_market.counters.closed_early == 1


async def test_a_generation_stops_when_its_session_closes_on_chain(paid: Paid) -> None:
    provider = paid.provider.provider
    assert provider is not None
    first_chunk = trio.Event()

    async def deliver(_text: str, _tokens: int) -> None:
        first_chunk.set()
        await trio.sleep(0.001)  # a slow reader: the answer takes minutes

    async def ask() -> None:
        # The consumer may continue in a new session or give up: either is
        # fine here, where what is measured is the provider's stop.
        with contextlib.suppress(NoProviderError):
            await paid.consumer.generate(_request(10_000_000), deliver)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        with trio.fail_after(BOUND_S):
            await first_chunk.wait()
            while not paid.consumer_market.open:  # noqa: ASYNC110 - opened before the first chunk
                await trio.sleep(0.01)
        (session_id,) = paid.consumer_market.open
        await trio.to_thread.run_sync(
            paid.embedded.chain.close_session, paid.embedded.accounts[2], session_id
        )
        closed_at = trio.current_time()
        with trio.fail_after(BOUND_S):
            while provider.counters.ended_mid_request == 0:  # noqa: ASYNC110 - provider counter
                await trio.sleep(0.02)
        stopped_after = trio.current_time() - closed_at
        nursery.cancel_scope.cancel()
    # It follows the chain every 0.2 s here (5 s by default).
    assert stopped_after < 10
    assert paid.provider_market.counters.closed_early == 1


async def _after_the_claim_window(paid: Paid, session_id: bytes) -> None:
    """Move the chain past the session's end plus the claim window, and settle."""
    chain = paid.embedded.chain
    paid.embedded.time_travel(chain.session(session_id).ends_at - chain.now() + CLAIM_WINDOW_S)
    with trio.fail_after(BOUND_S):
        await paid.consumer_market.close_all()


@pytest.mark.parametrize("code", [RejectCode.BAD_SESSION, RejectCode.BUSY])
async def test_a_provider_that_takes_the_stake_and_refuses_is_paid_nothing(
    paid: Paid, monkeypatch: pytest.MonkeyPatch, code: RejectCode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="p2pnode.p2p.market.stakes")

    # The attack: a provider rejects every session after the consumer opened it
    # on chain. It used to be paid until the idle close, session after session,
    # then the seconds until the consumer's close at once: now exactly nothing.
    # Saying "busy" then (an honest provider says it at the Hello) used to be
    # asked again, a new on-chain open each round.
    async def reject(*_args: object) -> RejectCode:
        return code

    monkeypatch.setattr(paid.provider_market, "confirm", reject)
    chain = paid.embedded.chain
    consumer_addr = paid.consumer_address
    before = paid.balances()
    with trio.fail_after(BOUND_S), pytest.raises(NoProviderError):
        await paid.consumer.generate(_request(4), _nothing)
    counters = paid.consumer_market.counters
    assert counters.opened == 1
    (session_id,) = chain.sessions_of(consumer_addr)
    stake = chain.session(session_id).stake
    # Not closed early (that would pay the thief the seconds since the open): left
    # in escrow, no longer used, and still counted against the spend limit.
    assert chain.session(session_id).open
    assert not paid.consumer_market.usable(session_id)
    assert paid.consumer_market.held() == stake
    assert counters.left_unserved == 1
    # It is remembered: no second session is opened with it.
    standing = paid.consumer.reputation.standing(paid.provider.peer_id, trio.current_time())
    assert standing is not None
    assert standing.offences[Offence.PAID_NO_SERVICE.value] == 1
    assert standing.banned
    with trio.fail_after(BOUND_S), pytest.raises(NoProviderError):
        await paid.consumer.generate(_request(4), _nothing)
    assert counters.opened == 1
    consumer = paid.consumer.consumer
    assert consumer is not None
    assert (consumer.counters.paid_not_served, consumer.counters.sessions_opened) == (1, 0)
    # Stopping before the claim window has passed leaves it in escrow (logged) ...
    with trio.fail_after(BOUND_S):
        await paid.consumer_market.close_all()
    assert chain.session(session_id).open
    # ... which the user was told once, with when it comes back.
    back = chain.session(session_id).ends_at + CLAIM_WINDOW_S
    told = [
        r.getMessage()
        for r in caplog.records
        if r.name == "p2pnode.p2p.market.stakes" and "escrow" in r.getMessage()
    ]
    assert told == [
        f"session {session_id.hex()[:8]} with {paid.provider.peer_id[-8:]}: never served; "
        f"its stake of {stake} is left in escrow and comes back by chain time {back} "
        f"({time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(back))} UTC: its end plus the "
        "claim window), or sooner if the provider settles it"
    ]
    # ... and once it has passed, the consumer closes it: the thief gained nothing.
    await _after_the_claim_window(paid, session_id)
    assert not chain.session(session_id).open
    assert paid.balances() == before
    assert paid.consumer_market.held() == 0
    assert (counters.closed, counters.paid_wei, counters.refunded_wei) == (1, 0, stake)
    assert counters.escrowed_wei == stake
    assert counters.gas_used == sum(
        paid.consumer_market.gas["open"] + paid.consumer_market.gas["close"]
    )


async def test_a_provider_that_cannot_read_the_chain_after_the_open_is_not_blamed(
    paid: Paid, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its RPC failed while checking the session we opened: an honest failure.
    # The session is left in escrow as any unserved one (nothing is paid for
    # it), but the provider is not counted as having taken a stake.
    async def unavailable(*_args: object) -> RejectCode:
        return RejectCode.CHAIN_UNAVAILABLE

    monkeypatch.setattr(paid.provider_market, "confirm", unavailable)
    with trio.fail_after(BOUND_S), pytest.raises(NoProviderError):
        await paid.consumer.generate(_request(4), _nothing)
    consumer = paid.consumer.consumer
    assert consumer is not None
    assert consumer.counters.paid_not_served == 0
    assert paid.consumer_market.counters.left_unserved == 1
    standing = paid.consumer.reputation.standing(paid.provider.peer_id, trio.current_time())
    assert standing is None or Offence.PAID_NO_SERVICE.value not in standing.offences


async def test_a_provider_that_opens_and_fails_the_first_request_is_paid_nothing(
    paid: Paid, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The attack: approve and confirm the session (the stake is escrowed),
    # then fail the request it was opened for. A failure before a single
    # request was served is taking a stake for nothing: the worst offence,
    # and the session is not closed early (that would pay the seconds since
    # the open) but left to its end plus the claim window.
    @contextlib.asynccontextmanager
    async def fail(_request: Request) -> AsyncIterator[trio.abc.ReceiveChannel[object]]:
        raise EngineError("out of memory, or so it says")
        yield  # an async generator, for asynccontextmanager

    (engine,) = paid.provider.offering.engines
    monkeypatch.setattr(engine, "stream", fail)
    chain = paid.embedded.chain
    consumer_addr = paid.consumer_address
    before = paid.balances()
    with trio.fail_after(BOUND_S), pytest.raises(NoProviderError):
        await paid.consumer.generate(_request(4), _nothing)
    (session_id,) = chain.sessions_of(consumer_addr)
    assert chain.session(session_id).open
    assert not paid.consumer_market.usable(session_id)
    assert paid.consumer_market.counters.left_unserved == 1
    standing = paid.consumer.reputation.standing(paid.provider.peer_id, trio.current_time())
    assert standing is not None
    assert standing.offences == {Offence.PAID_NO_SERVICE.value: 1}
    assert standing.banned
    # Once its ban is over (here: at once), the same again counts again.
    monkeypatch.setattr(paid.consumer.reputation, "banned", lambda *_: False)
    with trio.fail_after(BOUND_S), pytest.raises(NoProviderError):
        await paid.consumer.generate(_request(4), _nothing)
    consumer = paid.consumer.consumer
    assert consumer is not None
    assert consumer.counters.paid_not_served == 2
    assert paid.consumer_market.counters.left_unserved == 2
    await _after_the_claim_window(paid, chain.sessions_of(consumer_addr)[-1])  # both
    assert paid.balances() == before


async def test_a_provider_that_never_answers_the_opened_message_is_paid_nothing(
    paid: Paid, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The attack: take the stake, then stall. The consumer gives up after its
    # handshake bound, and used to close at once, paying those seconds.
    async def stall(*_args: object) -> RejectCode:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(paid.provider_market, "confirm", stall)
    consumer = paid.consumer.consumer
    assert consumer is not None
    monkeypatch.setattr(consumer, "cfg", replace(consumer.cfg, handshake_s=2.0))
    chain = paid.embedded.chain
    consumer_addr = paid.consumer_address
    before = paid.balances()
    with trio.fail_after(BOUND_S), pytest.raises(NoProviderError):
        await paid.consumer.generate(_request(4), _nothing)
    (session_id,) = chain.sessions_of(consumer_addr)
    assert chain.session(session_id).open
    assert not paid.consumer_market.usable(session_id)
    await _after_the_claim_window(paid, session_id)
    assert not chain.session(session_id).open
    assert paid.balances() == before


async def test_a_provider_is_paid_exactly_the_seconds_its_consumer_acknowledged(
    paid: Paid, tmp_path: Path
) -> None:
    chain = paid.embedded.chain
    before = paid.balances()
    with trio.fail_after(BOUND_S):
        for _ in range(2):
            await paid.consumer.generate(_request(4), _nothing)
        while paid.provider_market.counters.acks < 2:  # noqa: ASYNC110 - the last Ack in flight
            await trio.sleep(0.01)
    (session_id,) = paid.consumer_market.open
    held = chain.session(session_id)
    used_until, signature = paid.provider_market.usage[session_id]
    # What the consumer signed last is what the provider holds, in memory and on disk.
    assert paid.consumer_market.open[session_id].used_until == used_until
    (row,) = paid.provider_market.ledger.open_sessions("provider")
    assert (row.used_until, row.usage_signature) == (used_until, signature)
    assert held.opened_at < used_until < held.ends_at
    # Both sessions.db keep the latest receipt, signed by one and countersigned by the other.
    rows = []
    for who in (1, 2):
        with contextlib.closing(sqlite3.connect(tmp_path / f"sessions-{who}.db")) as db:
            rows.append(db.execute("SELECT * FROM receipts").fetchall())
    assert rows[0] == rows[1]
    ((sid, requests, prompt, completion, provider_sig, consumer_sig, signed),) = rows[0]
    assert (sid, requests, completion) == (session_id, 2, 8)
    # The row alone proves the receipt: the bytes both signatures cover, which
    # hold the same counts and the provider's commitment for the last answer.
    receipt = Receipt(session_id=sid, requests=requests, prompt_tokens=prompt,
                      completion_tokens=completion, signature=provider_sig)  # fmt: skip
    assert signed.startswith(RECEIPT_DOMAIN)
    assert signed != receipt.signing_bytes()
    body = msgpack.unpackb(signed[len(RECEIPT_DOMAIN) :])
    assert (body["requests"], body["prompt_tokens"], body["completion_tokens"]) == (
        requests, prompt, completion)  # fmt: skip
    assert body["commitment"]["completion_tokens"] > 0
    assert verify_peer_signature(paid.provider.peer_id, signed, provider_sig)
    assert verify_peer_signature(paid.consumer.peer_id, signed, consumer_sig)
    # A claim with a forged acknowledgement (more time than was signed) is refused.
    paid.provider_market.usage[session_id] = (used_until + 60, signature)
    paid.embedded.time_travel(held.ends_at - chain.now() + 1)  # the session has run out
    with trio.fail_after(BOUND_S):
        await paid.provider_market.settle()
    assert chain.session(session_id).open
    assert paid.provider_market.counters.settled == 0
    # With the real one, it is paid exactly the acknowledged seconds.
    paid.provider_market.usage[session_id] = (used_until, signature)
    with trio.fail_after(BOUND_S):
        await paid.provider_market.settle()
    assert not chain.session(session_id).open
    owed = PRICE * (used_until - held.opened_at)
    assert paid.provider_market.counters.paid_wei == owed
    p0, c0 = before
    assert paid.balances() == (p0 + owed, c0 - owed)


async def test_a_long_answer_pauses_to_be_acknowledged_and_goes_on(paid: Paid) -> None:
    # Without pauses one answer could run for the whole session and never be
    # acknowledged: the provider would claim nothing for it.
    provider = paid.provider.provider
    assert provider is not None
    provider.cfg = replace(provider.cfg, pause_unacked_s=0.2)
    texts: list[str] = []

    async def deliver(text: str, _tokens: int) -> None:
        texts.append(text)
        await trio.lowlevel.checkpoint()

    with trio.fail_after(BOUND_S):
        outcome = await paid.consumer.generate(_request(30_000), deliver)
        while paid.provider_market.counters.acks < provider.counters.requests:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert "".join(texts) == WORD * 30_000
    assert (outcome.finish_reason, outcome.completion_tokens) == ("length", 30_000)
    assert outcome.failovers == 0
    # Several requests in one session, each acknowledged; none refused.
    assert provider.counters.requests >= 2
    assert provider.counters.unacknowledged == 0
    assert len(paid.consumer_market.open) == 1


@pytest.mark.parametrize("ack", ["junk signature", "stale time"])
async def test_a_consumer_that_does_not_acknowledge_gets_one_answer_per_session(
    paid: Paid, monkeypatch: pytest.MonkeyPatch, ack: str
) -> None:
    # The attack: take answers and never sign for the time they took (the provider
    # would be paid nothing). Each session then serves one answer, no more.
    honest = paid.consumer_market.acknowledge

    def cheat(session_id: bytes) -> tuple[int, bytes]:
        used_until, signature = honest(session_id)
        if ack == "junk signature":
            return used_until, b"\x01" * 65
        stale = used_until - 600
        return stale, paid.embedded.chain.sign_usage(paid.embedded.accounts[2], session_id, stale)

    monkeypatch.setattr(paid.consumer_market, "acknowledge", cheat)
    provider = paid.provider.provider
    assert provider is not None
    with trio.fail_after(BOUND_S):
        for _ in range(2):
            outcome = await paid.consumer.generate(_request(4), _nothing)
            assert outcome.completion_tokens == 4
    # The second request was refused in the first session (UNACKNOWLEDGED), and
    # served in a new one: one answer each.
    with trio.fail_after(BOUND_S):
        while provider.counters.bad_acks < 2:  # noqa: ASYNC110 - the last Ack in flight
            await trio.sleep(0.01)
    assert provider.counters.requests == 2
    assert provider.counters.refused == 1
    assert paid.consumer_market.counters.opened == 2
    assert paid.provider_market.usage == {}


async def test_an_answer_cancelled_after_its_first_tokens_ends_the_sessions_credit(
    paid: Paid,
) -> None:
    # The attack: take the tokens and leave before Done, so that there is nothing
    # to acknowledge. The provider serves nothing more in that session.
    class Enough(Exception):
        pass

    async def leave(_text: str, _tokens: int) -> None:
        raise Enough

    provider = paid.provider.provider
    assert provider is not None
    with trio.fail_after(BOUND_S), pytest.raises(Enough):
        await paid.consumer.generate(_request(10_000), leave)
    with trio.fail_after(BOUND_S):
        while provider.counters.unacknowledged == 0:  # noqa: ASYNC110 - the provider's watch
            await trio.sleep(0.01)
        outcome = await paid.consumer.generate(_request(4), _nothing)
    assert outcome.completion_tokens == 4
    assert provider.counters.refused == 1  # code 15 in the first session
    assert paid.consumer_market.counters.opened == 2
    # The first session was never acknowledged: left in escrow, not closed early.
    assert paid.consumer_market.counters.left_unserved == 1


async def test_a_chain_that_drops_a_connection_costs_the_provider_nothing(
    paid: Paid, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The attack (or an accident): one RPC error during the settle loop used
    # to end the provider.
    chain = paid.embedded.chain
    real_now = chain.now
    failures = 0

    def flaky_now() -> int:
        nonlocal failures
        if failures < 3:
            failures += 1
            raise requests.exceptions.ConnectionError("connection reset by peer")
        return real_now()

    monkeypatch.setattr(chain, "now", flaky_now)
    monkeypatch.setattr(
        paid.provider_market, "cfg", _replace_cfg(paid.provider_market.cfg, settle_every_s=0.1)
    )
    with trio.fail_after(BOUND_S):
        while failures < 3:  # noqa: ASYNC110 - the settle loop reads the chain's clock
            await trio.sleep(0.05)
        outcome = await paid.consumer.generate(_request(4), _nothing)
    assert outcome.completion_tokens == 4
    assert paid.provider_market.counters.chain_errors >= 1


async def test_a_consumer_survives_a_chain_error_while_closing(
    paid: Paid, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(BOUND_S):
        await paid.consumer.generate(_request(4), _nothing)
    (session_id,) = paid.consumer_market.open

    def down(*_args: object) -> object:
        raise requests.exceptions.ConnectionError("no route to host")

    monkeypatch.setattr(paid.embedded.chain, "session", down)
    with trio.fail_after(BOUND_S):
        await paid.consumer_market.close(session_id)  # logged, not raised
    monkeypatch.undo()
    with trio.fail_after(BOUND_S):
        await paid.consumer_market.close_all()  # the ledger still lists it: closed now
    assert not paid.embedded.chain.session(session_id).open


def _replace_cfg(cfg: market.Config, **kw: object) -> market.Config:
    return replace(cfg, **kw)  # type: ignore[arg-type]


async def test_a_session_is_not_idle_while_a_request_runs(paid: Paid, tmp_path: Path) -> None:
    # A long answer used to count as idle time: the consumer closed its own
    # session under the request (and then the provider stopped serving it).
    cfg = _market(paid.embedded, 3, tmp_path, session_seconds=1000, idle_close_s=0.5)
    async with open_node(
        NodeConfig(bootstrap=(paid.provider.addrs[0],), market=cfg),
        key_pair=create_new_key_pair(),
        wallet=_wallet(paid.embedded, 3),
    ) as consumer:
        with trio.fail_after(BOUND_S):
            while consumer.offer_book.get(paid.provider.peer_id) is None:
                await consumer.finder.refresh_offer(paid.provider.peer_id)

        async def slow_reader(_text: str, _tokens: int) -> None:
            await trio.sleep(0.6)  # longer than the idle close, for every chunk

        market_ = consumer.markets.consumer
        assert market_ is not None
        with trio.fail_after(BOUND_S):
            outcome = await consumer.generate(_request(600), slow_reader)
        assert outcome.completion_tokens == 600
        assert market_.counters.opened == 1
        assert market_.counters.closed == 0
        # Idle now: closed at the next look.
        with trio.fail_after(BOUND_S):
            while market_.counters.closed == 0:  # noqa: ASYNC110 - the idle-close loop
                await trio.sleep(0.05)


async def test_an_offer_the_chain_contradicts_opens_nothing(paid: Paid) -> None:
    # The provider gossips half its on-chain price: a consumer that believed
    # the offer would send an open bound to revert (and pay its gas). A price
    # behind the chain is what a re-pricing looks like for a few seconds, so
    # it is no offence: the offer is dropped and asked for afresh.
    bid_id, price = paid.provider_market.bids[MODEL]
    paid.provider_market.bids[MODEL] = (bid_id, price // 2)
    paid.provider.offering.set_models(paid.provider.offering.models)
    with trio.fail_after(BOUND_S):
        while (o := paid.consumer.offer_book.get(paid.provider.peer_id)) is None or (
            o.models[0].price_per_s != price // 2
        ):
            await paid.consumer.finder.refresh_offer(paid.provider.peer_id)
            await trio.sleep(0.05)
    consumer_addr = paid.consumer_address
    with trio.fail_after(BOUND_S), pytest.raises(NoProviderError, match="another price"):
        await paid.consumer.generate(_request(4), _nothing)
    assert paid.embedded.chain.sessions_of(consumer_addr) == []
    assert paid.consumer.reputation.standing(paid.provider.peer_id, trio.current_time()) is None


async def test_an_offer_naming_another_wallets_bid_is_a_broken_promise(paid: Paid) -> None:
    # A stranger copies an honest provider's bid into its own signed offer.
    offer = paid.consumer.offer_book.get(paid.provider.peer_id)
    assert offer is not None
    terms = offer.serves(MODEL)
    assert terms is not None
    stranger = replace(offer, wallet=paid.embedded.accounts[5].address)
    with trio.fail_after(BOUND_S), pytest.raises(market.OfferMismatch) as mismatch:
        await paid.consumer_market.check_bid(stranger, terms)
    assert "another wallet's" in str(mismatch.value)
    assert not mismatch.value.stale


async def test_a_hello_meant_for_another_provider_gets_no_approval(paid: Paid) -> None:
    # A peer relays a consumer's Hello (meant for itself) to an honest provider,
    # to have the consumer pay that provider for a session it cannot use.
    import secrets as secrets_

    from p2pnode.protocols.session import Hello

    offer = paid.consumer.offer_book.get(paid.provider.peer_id)
    assert offer is not None
    terms = offer.serves(MODEL)
    assert terms is not None
    hello = Hello(
        model_id=MODEL, ephemeral=bytes(32), nonce=secrets_.token_bytes(16), timestamp=0.0
    )
    relayed = paid.consumer_market.prepare_hello(hello, "12D3KooWrelayer", terms, 10 * PRICE)
    own = str(paid.provider.provider.peer_id)  # type: ignore[union-attr]
    assert paid.provider_market.check_hello(relayed, own) is RejectCode.BAD_SESSION
    meant = paid.consumer_market.prepare_hello(hello, own, terms, 10 * PRICE)
    assert paid.provider_market.check_hello(meant, own) is None


async def test_a_paid_hello_that_does_not_check_out_is_refused_with_its_reason(paid: Paid) -> None:
    # Each field a stranger could get wrong or forge, one at a time; the
    # well-formed Hello beside them is admitted.
    import secrets as secrets_

    from eth_account import Account
    from eth_account.messages import encode_defunct

    from p2pnode.protocols.session import Hello

    market_ = paid.provider_market
    own = str(paid.provider.provider.peer_id)  # type: ignore[union-attr]
    offer = paid.consumer.offer_book.get(paid.provider.peer_id)
    assert offer is not None
    terms = offer.serves(MODEL)
    assert terms is not None
    bare = Hello(model_id=MODEL, ephemeral=bytes(32), nonce=secrets_.token_bytes(16), timestamp=0.0)
    good = paid.consumer_market.prepare_hello(bare, own, terms, 10 * PRICE)
    assert market_.check_hello(good, own) is None
    # Free: no bid or no wallet named.
    assert market_.check_hello(bare, own) is RejectCode.PAYMENT_REQUIRED
    assert market_.check_hello(replace(good, bid_id=None), own) is RejectCode.PAYMENT_REQUIRED
    # Signed by a key that is not the wallet's.
    stranger = Account.create()
    forged = Account.sign_message(encode_defunct(primitive=good.signing_bytes()), stranger.key)
    assert market_.check_hello(replace(good, signature=bytes(forged.signature)), own) is (
        RejectCode.BAD_SESSION
    )
    assert market_.check_hello(replace(good, signature=b""), own) is RejectCode.BAD_SESSION
    # A bid that is not our live one (re-priced since the consumer read it).
    stale = replace(good, bid_id="00" * 32)
    assert market_.check_hello(stale, own) is RejectCode.PRICE_CHANGED


async def test_an_opened_message_naming_a_session_that_is_not_this_one_is_refused(
    paid: Paid,
) -> None:
    # The consumer says it opened a session: the provider reads it on chain and
    # serves only its own, this consumer's, for the bid of the Hello, not over.
    import secrets as secrets_

    from p2pnode.protocols.session import Hello

    net = paid.embedded
    provider_account, other = net.accounts[1], net.accounts[4]
    bid = net.chain.live_bid(provider_account.address, MODEL)
    assert bid is not None
    net.chain.approve_token(other, 20 * PRICE)
    expiry, nonce = net.chain.now() + 60, secrets_.token_bytes(32)
    approval = net.chain.sign_approval(provider_account, bid, other.address, expiry, nonce)
    tx = net.chain.open_session(other, bid, 10 * PRICE, PRICE, expiry, nonce, approval)
    session_id = bytes(tx.value[0])

    def hello_of(wallet: str, bid_id: bytes = bid) -> Hello:
        return Hello(
            model_id=MODEL,
            ephemeral=bytes(32),
            nonce=bytes(16),
            timestamp=0.0,
            bid_id=bid_id.hex(),
            consumer_wallet=wallet,
        )

    market_ = paid.provider_market
    peer = paid.consumer.peer_id
    with trio.fail_after(BOUND_S):
        # Another consumer's session, named by this one.
        mine = net.accounts[2].address
        assert await market_.confirm(hello_of(mine), session_id, peer) is RejectCode.BAD_SESSION
        # Its own consumer, but the Hello named another bid.
        other_bid = hello_of(other.address, bytes(32))
        assert await market_.confirm(other_bid, session_id, peer) is RejectCode.BAD_SESSION
        # A session that does not exist.
        unknown = secrets_.token_bytes(32)
        assert await market_.confirm(hello_of(other.address), unknown, peer) is (
            RejectCode.BAD_SESSION
        )
        # Its own consumer and bid, before its end: served.
        assert await market_.confirm(hello_of(other.address), session_id, peer) is None
        # After its end: refused, though everything else checks out.
        await trio.to_thread.run_sync(net.time_travel, 11)
        while market_.chain_time() < net.chain.now():  # noqa: ASYNC110 - follows the chain
            await trio.sleep(0.05)
        assert await market_.confirm(hello_of(other.address), session_id, peer) is (
            RejectCode.BAD_SESSION
        )


async def test_a_closed_paid_session_leaves_the_providers_table(paid: Paid) -> None:
    with trio.fail_after(BOUND_S):
        await paid.consumer.generate(_request(4), _nothing)
    provider = paid.provider.provider
    assert provider is not None
    (session_id,) = paid.consumer_market.open
    assert session_id in provider.sessions
    with trio.fail_after(BOUND_S):
        await paid.consumer_market.close(session_id)
        while paid.provider_market.serving(session_id):  # noqa: ASYNC110 - follows the chain
            await trio.sleep(0.05)
    # Room is made for the next session: the closed one goes, paid or not.
    assert provider.make_room(paid.consumer.peer_id, trio.current_time())
    assert session_id not in provider.sessions


async def test_opens_at_once_for_two_models_stay_within_the_spend_limit(tmp_path: Path) -> None:
    # Two chats for different models open two sessions at once (each model has
    # its own open lock). Each stake is chosen before either open reaches the
    # chain: both must count against the one spend limit.
    net = await trio.to_thread.run_sync(open_embedded)
    provider_account = net.accounts[1]
    net.chain.register_provider(provider_account, "12D3KooWprovider", MIN_PROVIDER_STAKE)
    for model in ("a", "b", "c"):
        net.chain.register_model(provider_account, model, None)
        net.chain.post_bid(provider_account, model, PRICE)
    seconds = 100
    full = PRICE * seconds
    limit = full * 3 // 2
    async with AsyncExitStack() as stack:
        provider = await stack.enter_async_context(
            open_node(
                NodeConfig(measure_tokens=0, market=_market(net, 1, tmp_path)),
                key_pair=create_new_key_pair(),
                wallet=_wallet(net, 1),
                engines=[SyntheticEngine(m) for m in ("a", "b", "c")],
            )
        )
        terms = _market(net, 2, tmp_path, session_seconds=seconds, spend_limit=limit)
        consumer = await stack.enter_async_context(
            open_node(
                NodeConfig(bootstrap=(provider.addrs[0],), market=terms),
                key_pair=create_new_key_pair(),
                wallet=_wallet(net, 2),
            )
        )
        with trio.fail_after(BOUND_S):
            while consumer.offer_book.get(provider.peer_id) is None:
                await consumer.finder.refresh_offer(provider.peer_id)
            async with trio.open_nursery() as nursery:
                for model in ("a", "b"):
                    request = Request(
                        model_id=model, kind="completion", prompt="hi", params=Params(max_tokens=2)
                    )
                    nursery.start_soon(consumer.generate, request, _nothing)
        stakes = consumer.markets.consumer.open.values()  # type: ignore[union-attr]
        # The first stake chosen is a whole session, the second what the limit leaves.
        assert sorted(p.stake for p in stakes) == [limit - full, full]
        assert consumer.markets.consumer.reserved == 0  # type: ignore[union-attr]
        assert consumer.consumer.counters.sessions_opened == 2
        # How long each open took (shown in the node's status): the chain's open included.
        assert len(consumer.consumer.open_ms) == 2
        assert all(1.0 < ms < BOUND_S * 1000 for ms in consumer.consumer.open_ms)
        # A third model: nothing is left to stake, and the user is told so.
        third = Request(model_id="c", kind="completion", prompt="hi", params=Params(max_tokens=2))
        with trio.fail_after(BOUND_S), pytest.raises(SpendLimitError) as refused:
            await consumer.generate(third, _nothing)
        assert str(refused.value) == (
            "spend limit reached: 0.15 tokens held in open sessions of 0.15 tokens (--spend-limit)"
        )


async def test_a_provider_claims_on_its_own_once_its_consumer_falls_silent(paid: Paid) -> None:
    # Nobody calls settle(): the provider's loop claims a session whose
    # consumer has sent nothing for claim_idle_s, paid the acknowledged seconds.
    market_ = paid.provider_market
    market_.cfg = replace(market_.cfg, claim_idle_s=0.5, settle_every_s=0.2)
    chain = paid.embedded.chain
    provider_addr = paid.embedded.accounts[1].address
    p0 = chain.balance(provider_addr)
    with trio.fail_after(BOUND_S):
        await paid.consumer.generate(_request(4), _nothing)
        while market_.counters.acks < 1:  # noqa: ASYNC110 - the Ack in flight
            await trio.sleep(0.01)
        (session_id,) = paid.consumer_market.open
        used_until, _signature = market_.usage[session_id]
        while market_.counters.claimed_silent < 1:  # noqa: ASYNC110 - the provider's own loop
            await trio.sleep(0.05)
    held = chain.session(session_id)
    assert not held.open
    owed = PRICE * (used_until - held.opened_at)
    assert owed > 0
    assert market_.counters.paid_wei == owed
    assert chain.balance(provider_addr) == p0 + owed


async def test_a_restarted_provider_claims_what_it_left_open(tmp_path: Path) -> None:
    # The provider stops with an acknowledged session still open on chain; the
    # same wallet started again on the same sessions.db claims it, from the
    # acknowledgement on disk, once the session has run out.
    net = await trio.to_thread.run_sync(open_embedded)
    provider_account = net.accounts[1]
    net.chain.register_provider(provider_account, "12D3KooWprovider", MIN_PROVIDER_STAKE)
    net.chain.register_model(provider_account, MODEL, None)
    net.chain.post_bid(provider_account, MODEL, PRICE)
    provider_terms = _market(net, 1, tmp_path, settle_every_s=0.2, follow_s=0.2)
    p0 = net.chain.balance(provider_account.address)

    def provider_node() -> AbstractAsyncContextManager[Node]:
        return open_node(
            NodeConfig(measure_tokens=0, market=provider_terms),
            key_pair=create_new_key_pair(),
            wallet=_wallet(net, 1),
            engines=[SyntheticEngine()],
        )

    consumer_node = open_node(
        NodeConfig(market=_market(net, 2, tmp_path, session_seconds=100)),
        key_pair=create_new_key_pair(),
        wallet=_wallet(net, 2),
    )
    async with consumer_node as consumer:
        async with provider_node() as first:
            billing = first.markets.provider
            assert billing is not None
            with trio.fail_after(BOUND_S):
                await consumer.dialer.connect(first.addrs[0])
                while consumer.offer_book.get(first.peer_id) is None:
                    await consumer.finder.refresh_offer(first.peer_id)
                await consumer.generate(_request(4), _nothing)
                while billing.counters.acks < 1:  # noqa: ASYNC110 - the Ack in flight
                    await trio.sleep(0.01)
            (session_id,) = billing.usage
            used_until, _signature = billing.usage[session_id]
        held = net.chain.session(session_id)
        assert held.open  # the provider stopped; the session is still escrowed
        await trio.to_thread.run_sync(net.time_travel, held.ends_at - net.chain.now() + 1)
        async with provider_node() as restarted:
            claims = restarted.markets.provider
            assert claims is not None
            with trio.fail_after(BOUND_S):
                while claims.counters.settled < 1:  # noqa: ASYNC110 - its own settle loop
                    await trio.sleep(0.05)
    assert not net.chain.session(session_id).open
    owed = PRICE * (used_until - held.opened_at)
    assert owed > 0
    assert claims.counters.paid_wei == owed
    assert net.chain.balance(provider_account.address) == p0 + owed


async def test_a_settle_under_way_when_the_node_stops_finishes_before_the_ledger_closes(
    tmp_path: Path,
) -> None:
    # A chain read runs in a thread and cannot be cancelled: the settle loop
    # that was in one when the node stopped goes on to write what it read.
    # Seen once as "Cannot operate on a closed database" at a provider's stop.
    net = await trio.to_thread.run_sync(open_embedded)
    provider_account = net.accounts[1]
    net.chain.register_provider(provider_account, "12D3KooWprovider", MIN_PROVIDER_STAKE)
    net.chain.register_model(provider_account, MODEL, None)
    net.chain.post_bid(provider_account, MODEL, PRICE)
    entered, finished = trio.Event(), trio.Event()
    async with open_node(
        NodeConfig(measure_tokens=0, market=_market(net, 1, tmp_path, settle_every_s=0.1)),
        key_pair=create_new_key_pair(),
        wallet=_wallet(net, 1),
        engines=[SyntheticEngine()],
    ) as node:
        billing = node.markets.provider
        assert billing is not None
        ledger = billing.ledger

        async def settle_behind_a_slow_read() -> None:
            entered.set()
            with trio.CancelScope(shield=True):  # as a read in a thread is
                await trio.sleep(0.3)
            ledger.open_sessions("provider")  # what settle() does next, before any checkpoint
            finished.set()

        billing.settle = settle_behind_a_slow_read  # type: ignore[method-assign]
        with trio.fail_after(BOUND_S):
            await entered.wait()
    assert finished.is_set()


async def test_a_paid_answer_ended_by_a_stop_string_is_still_acknowledged(paid: Paid) -> None:
    # The consumer finds the stop string itself (the synthetic engine ignores
    # stops). Paid, it reads the rest to Done and acknowledges it: the session
    # stays usable, no second open, nothing counted against the provider.
    stopping = Request(
        model_id=MODEL,
        kind="completion",
        prompt="hi",
        params=Params(max_tokens=12, stop=(" tok tok",)),
    )
    texts: list[str] = []

    async def deliver(text: str, _tokens: int) -> None:
        texts.append(text)

    with trio.fail_after(BOUND_S):
        outcome = await paid.consumer.generate(stopping, deliver)
        while paid.provider_market.counters.acks < 1:  # noqa: ASYNC110 - the Ack in flight
            await trio.sleep(0.01)
        again = await paid.consumer.generate(_request(4), _nothing)
    assert "".join(texts) == ""  # the answer began with the stop string
    assert outcome.finish_reason == "stop"
    assert again.finish_reason == "length"
    provider = paid.provider.provider
    assert provider is not None
    assert (provider.counters.unacknowledged, provider.counters.bad_acks) == (0, 0)
    assert paid.consumer_market.counters.opened == 1


@pytest.mark.parametrize("paid", ["cheap_quant"], indirect=True)
async def test_a_provider_caught_cheating_is_paid_no_more_and_the_evidence_is_kept(
    paid: Paid, tmp_path: Path
) -> None:
    auditor = paid.consumer.auditor
    assert auditor is not None
    with trio.fail_after(BOUND_S):
        await paid.consumer.generate(_request(16), _nothing)
    (session_id,) = paid.consumer_market.open
    with trio.fail_after(BOUND_S):
        await auditor.wait_for(1)
    provider = paid.provider.peer_id
    assert auditor.is_caught(provider)
    # Its session is closed on chain at once (paying the seconds acknowledged).
    assert session_id not in paid.consumer_market.open
    assert not paid.embedded.chain.session(session_id).open
    # The evidence: its signed receipt (with the commitment) and what was measured.
    with contextlib.closing(sqlite3.connect(tmp_path / "sessions-2.db")) as db:
        rows = db.execute("SELECT * FROM evidence").fetchall()
    ((peer, sid, _at, finding, signed, signature, measured),) = rows
    assert (peer, sid) == (provider, session_id)
    assert finding.startswith("logprobs:")
    assert verify_peer_signature(provider, signed, signature)
    commitment = msgpack.unpackb(signed[len(RECEIPT_DOMAIN) :])["commitment"]
    figures = json.loads(measured)
    assert len(figures["logprobs"]) == len(commitment["token_ids"]) == len(commitment["logprobs"])
    assert figures["logprob_mean_diff"] > 0.15
    # And it is not asked (nor paid) again.
    with trio.fail_after(BOUND_S), pytest.raises(NoProviderError, match="caught by audits"):
        await paid.consumer.generate(_request(16), _nothing)
    assert paid.consumer_market.counters.opened == 1
