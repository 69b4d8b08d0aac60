"""The market's decisions one at a time, on a real in-process chain and no nodes:
what the user is told when nothing can be paid, how stakes add up against the
spend limit, which acknowledgements a provider keeps, when a session counts as
silent, and what the ledger keeps across a restart. Fast enough to run for
every mutant of p2p/market (tests/mutation.py); the flows end to end are in
tests/e2e/test_paid_*.py."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import secrets
import sqlite3
import time
from pathlib import Path

import pytest
import requests
import trio
from eth_account import Account
from trio.testing import MockClock

from p2pnode.chain.client import CLAIM_WINDOW_S, AsyncChain
from p2pnode.chain.embedded import MIN_PROVIDER_STAKE, Embedded, send_ether
from p2pnode.errors import ChainError, ConfigError, FundsError
from p2pnode.p2p import market
from p2pnode.p2p.market.ledger import Ledger, LedgerSession
from p2pnode.protocols.offers import ModelOffer, Offer
from p2pnode.protocols.session import Approve, Hello, RejectCode

PRICE = 10**15  # 0.001 tokens per second
MODEL = "m"
GGUF = "ab" * 32
PROVIDER_PEER = "12D3KooWtheprovider"
# What a chain call meets when its RPC node is out of reach.
DOWN = "no chain answers at the chain's RPC URL (ConnectionError)"


@pytest.fixture
def chain(net: Embedded) -> Embedded:
    """The chain as each test finds it (tests/conftest.py:net)."""
    return net


def offer(price: int, *, bid: bool = True, model: str = MODEL) -> Offer:
    terms = ModelOffer(model_id=model, price_per_s=price, bid_id="ab" * 32 if bid else None)
    return Offer(
        peer_id="p", addrs=(), models=(terms,), slots_free=1, queue_len=0, seq=1, timestamp=0.0
    )


def consumer(net: Embedded, tmp_path: Path, who: int = 2, **cfg: object) -> market.ConsumerMarket:
    terms = market.Config(sessions_db=None, **cfg)  # type: ignore[arg-type]
    wallet = market.Wallet(AsyncChain(net.chain), net.accounts[who])
    return market.ConsumerMarket(terms, wallet, Ledger(tmp_path / "c.db"))


def provider(net: Embedded, tmp_path: Path, **cfg: object) -> market.ProviderMarket:
    terms = market.Config(sessions_db=None, **cfg)  # type: ignore[arg-type]
    wallet = market.Wallet(AsyncChain(net.chain), net.accounts[1])
    return market.ProviderMarket(terms, wallet, Ledger(tmp_path / "p.db"))


def on_trio_time(seller: market.ProviderMarket) -> market.ProviderMarket:
    """The provider's wall clock moved by trio's (a MockClock): its estimate of the
    chain's time runs with it between readings."""
    base = time.time() - trio.current_time()
    seller.wall = lambda: base + trio.current_time()
    return seller


def unreachable(*_args: object) -> object:
    """A chain call whose RPC node is out of reach (monkeypatched over the real one)."""
    raise requests.exceptions.ConnectionError("no route to host")


def bid_on(net: Embedded) -> bytes:
    """The provider (account 1) registered, its model declared with GGUF, a bid at PRICE."""
    chain, account = net.chain, net.accounts[1]
    chain.register_provider(account, PROVIDER_PEER, MIN_PROVIDER_STAKE)
    chain.register_model(account, MODEL, GGUF)
    return bytes(chain.post_bid(account, MODEL, PRICE).value)


async def bidding(
    net: Embedded, tmp_path: Path, **cfg: object
) -> tuple[market.ProviderMarket, bytes]:
    """A provider with its bid at PRICE on chain and loaded, on trio's clock."""
    bid = bid_on(net)
    seller = on_trio_time(provider(net, tmp_path, **cfg))
    await seller.load_bids([MODEL])
    return seller, bid


def said(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """What the market logged (level, text)."""
    return [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name.startswith("p2pnode.p2p.market")
    ]


def test_why_nothing_can_be_paid_is_said_exactly(chain: Embedded, tmp_path: Path) -> None:
    stingy = consumer(chain, tmp_path, max_price_per_s=PRICE)
    cheap, dear = offer(PRICE), offer(3 * PRICE)
    assert stingy.terms(cheap, MODEL) == cheap.models[0]
    assert stingy.terms(dear, MODEL) is None
    assert stingy.terms(offer(PRICE, bid=False), MODEL) is None
    assert stingy.terms(offer(0), MODEL) is None
    assert stingy.why_not([dear, cheap], MODEL) == ""
    assert stingy.why_not([dear, offer(2 * PRICE)], MODEL) == (
        "the cheapest bid, 0.002 tokens/s, is above --max-price 0.001 tokens/s"
    )
    assert stingy.why_not([dear, offer(PRICE, bid=False), offer(0)], MODEL) == (
        "the cheapest bid, 0.003 tokens/s, is above --max-price 0.001 tokens/s"
        " (2 more with no live bid on chain)"
    )
    assert stingy.why_not([offer(PRICE, bid=False)], MODEL) == (
        "it has no live bid on chain for this model"
    )
    assert stingy.why_not([offer(PRICE, bid=False), offer(0)], MODEL) == (
        "none has live bid on chain for this model"
    )
    # Any price is looked at for the cheapest, however high.
    assert stingy.why_not([offer(10**30)], MODEL) == (
        "the cheapest bid, 1000000000000 tokens/s, is above --max-price 0.001 tokens/s"
    )


def test_stakes_add_up_against_the_spend_limit(chain: Embedded, tmp_path: Path) -> None:
    buyer = consumer(chain, tmp_path, session_seconds=100, spend_limit=250 * PRICE)
    assert buyer.stake_for(PRICE) == 100 * PRICE
    with buyer.reserve(PRICE) as first:
        assert (first.stake, buyer.reserved, buyer.held()) == (100 * PRICE,) * 3
        with buyer.reserve(PRICE) as second, buyer.reserve(PRICE) as third:
            # The third gets what the limit leaves; a fourth nothing at all.
            assert (second.stake, third.stake) == (100 * PRICE, 50 * PRICE)
            assert buyer.held() == 250 * PRICE
            with buyer.reserve(PRICE) as fourth:
                assert fourth.stake == 0
                assert buyer.held() == 250 * PRICE
        assert buyer.held() == 100 * PRICE
    assert (buyer.reserved, buyer.held()) == (0, 0)
    # Not even a second's price left: nothing is staked.
    assert consumer(chain, tmp_path, spend_limit=PRICE - 1).stake_for(PRICE) == 0
    assert consumer(chain, tmp_path, spend_limit=PRICE).stake_for(PRICE) == PRICE


async def test_funds_are_checked_before_an_open(chain: Embedded, tmp_path: Path) -> None:
    rich = consumer(chain, tmp_path)
    await rich.check_funds(PRICE)
    broke, short = Account.create(), Account.create()
    for account in (broke, short):
        send_ether(chain.chain.w3, chain.accounts[0], account.address, 10**18)
    chain.chain.mint(chain.accounts[0], short.address, PRICE)

    def market_of(account: object) -> market.ConsumerMarket:
        wallet = market.Wallet(AsyncChain(chain.chain), account)  # type: ignore[arg-type]
        return market.ConsumerMarket(market.Config(), wallet, Ledger(None))

    # No tokens at all: nobody can be paid, the request stops there.
    with pytest.raises(FundsError, match="has 1 ether and 0 tokens"):
        await market_of(broke).check_funds(PRICE)
    # Some, fewer than this stake: a cheaper provider may still be paid.
    with pytest.raises(ChainError, match="needs 0.002 tokens") as lacking:
        await market_of(short).check_funds(2 * PRICE)
    assert not isinstance(lacking.value, FundsError)
    await market_of(short).check_funds(PRICE)  # exactly enough
    # At start, one approval of any amount: each open is then one transaction.
    await market_of(short).prepare()
    token, marketplace = chain.chain.token, chain.chain.market.address
    assert token.functions.allowance(short.address, marketplace).call() == 2**256 - 1
    # Tokens but no ether for gas.
    gasless = Account.create()
    chain.chain.mint(chain.accounts[0], gasless.address, PRICE)
    with pytest.raises(FundsError) as gas:
        await market_of(gasless).check_funds(PRICE)
    # The stake it has: only the ether is asked for.
    assert str(gas.value) == (
        f"opening a session: wallet {gasless.address} has 0 ether and 0.001 tokens, needs "
        f"ether for gas: send it ether for gas on chain {chain.chain.w3.eth.chain_id}"
    )


async def test_a_provider_keeps_only_acknowledgements_it_can_claim_with(
    chain: Embedded, tmp_path: Path, autojump_clock: MockClock
) -> None:
    seller = provider(chain, tmp_path, ack_tolerance_s=30.0)
    buyer, stranger = chain.accounts[2], chain.accounts[3]
    session = b"\x01" * 32
    sign = chain.chain.sign_usage
    assert seller.check_usage(session, 1000, sign(buyer, session, 1000)) == (
        "not a session confirmed here"
    )
    await trio.sleep(5)
    seller._confirmed[session] = (buyer.address, 1000, trio.current_time())
    await trio.sleep(10)  # the provider reckons the session's time at 1010
    assert seller.used_until_now(session) == 1010
    assert seller.check_usage(session, 1041, sign(buyer, session, 1041)) == (
        "used_until is +31 s from this provider's reckoning"
    )
    assert seller.check_usage(session, 979, sign(buyer, session, 979)) == (
        "used_until is -31 s from this provider's reckoning"
    )
    assert seller.check_usage(session, 1040, sign(stranger, session, 1040)) == (
        "usage not signed by the session's consumer wallet"
    )
    assert seller.check_usage(session, 1040, b"\x00" * 65) == (
        "usage not signed by the session's consumer wallet"
    )
    # At the edges of the tolerance, in order: kept, and never taken back.
    assert seller.check_usage(session, 980, sign(buyer, session, 980)) is None
    assert seller.check_usage(session, 1040, sign(buyer, session, 1040)) is None
    assert seller.check_usage(session, 1039, sign(buyer, session, 1039)) == (
        "used_until 1039 is behind an earlier acknowledgement (1040)"
    )
    assert seller.check_usage(session, 1040, sign(buyer, session, 1040)) is None
    assert seller.usage[session] == (1040, sign(buyer, session, 1040))
    assert seller.counters.acks == 3


async def test_a_session_is_silent_only_with_no_request_for_the_whole_idle_time(
    chain: Embedded, tmp_path: Path, autojump_clock: MockClock
) -> None:
    seller = provider(chain, tmp_path, claim_idle_s=900.0)
    session = b"\x02" * 32
    assert not seller.silent(session)  # never seen: silence counts from now
    seller.begin(session)
    seller.begin(session)
    await trio.sleep(1000)
    assert not seller.silent(session)  # two requests running
    seller.end(session)
    await trio.sleep(1000)
    assert not seller.silent(session)  # one still running
    seller.end(session)
    await trio.sleep(900)
    assert not seller.silent(session)  # exactly the idle time: not past it
    await trio.sleep(1)
    assert seller.silent(session)
    seller.end(session)  # an end with nothing running stays at none running
    await trio.sleep(901)
    assert seller.silent(session)
    # An end of a session whose start it never saw (a restart between) counts
    # as its last request ending.
    unseen = b"\x03" * 32
    seller.end(unseen)
    await trio.sleep(900)
    assert not seller.silent(unseen)
    await trio.sleep(1)
    assert seller.silent(unseen)


def test_the_ledger_keeps_sessions_receipts_and_evidence_across_a_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sessions.db"
    ledger = Ledger(path)
    a, b, c = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32
    ledger.opened("consumer", "peerA", a, b"bid", 10, 2000)
    ledger.opened("provider", "peerB", b, b"bid", 20, 3000)
    ledger.opened("provider", "peerC", c, b"bid", 30, 4000)
    ledger.served(a)
    ledger.usage(b, 1600, b"usage")
    ledger.receipt(a, (1, 2, 3), b"psig", b"csig", b"signed")
    ledger.receipt(a, (2, 4, 6), b"psig2", b"csig2", b"signed2")  # the latest replaces
    ledger.evidence("peerA", a, 5, "logprobs: off", b"signed", b"psig", "{}")
    ledger.closed(c, 7, 23)
    ledger.close()

    again = Ledger(path)
    assert again.open_sessions("consumer") == [
        LedgerSession(a, "peerA", 10, 2000, served=True, used_until=0, usage_signature=b"")
    ]
    assert again.open_sessions("provider") == [
        LedgerSession(b, "peerB", 20, 3000, served=False, used_until=1600, usage_signature=b"usage")
    ]
    again.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT * FROM receipts").fetchall() == [
            (a, 2, 4, 6, b"psig2", b"csig2", b"signed2")
        ]
        assert db.execute("SELECT * FROM evidence").fetchall() == [
            ("peerA", a, 5, "logprobs: off", b"signed", b"psig", "{}")
        ]
        closed = db.execute("SELECT state, paid, refunded FROM sessions WHERE session_id=?", (c,))
        assert closed.fetchall() == [("closed", "7", "23")]


def _session(net: Embedded, bid: bytes, seconds: int) -> tuple[bytes, int]:
    """A session of the consumer (account 2) on ``bid``: its id and end."""
    chain, consumer = net.chain, net.accounts[2]
    expiry, nonce = chain.now() + 60, secrets.token_bytes(32)
    approval = chain.sign_approval(net.accounts[1], bid, consumer.address, expiry, nonce)
    opened = chain.open_session(consumer, bid, seconds * PRICE, PRICE, expiry, nonce, approval)
    session_id = bytes(opened.value[0])
    return session_id, chain.session(session_id).ends_at


async def test_a_provider_claims_what_was_acknowledged_early_when_silent_and_late_for_nothing(
    chain: Embedded, tmp_path: Path, autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    net, account = chain.chain, chain.accounts[1]
    net.register_provider(account, "12D3KooWprovider", MIN_PROVIDER_STAKE)
    net.register_model(account, MODEL, None)
    bid = net.post_bid(account, MODEL, PRICE).value
    seller = provider(chain, tmp_path, claim_idle_s=60.0)
    consumer = chain.accounts[2]
    before = net.balance(account.address)

    def confirmed(session_id: bytes, ends_at: int, seconds: int) -> None:
        seller.ends[session_id] = ends_at
        seller.ledger.opened("provider", "peer", session_id, bid, seconds * PRICE, ends_at)
        opened_at = ends_at - seconds
        seller._confirmed[session_id] = (consumer.address, opened_at, trio.current_time())

    # Ended, 30 s acknowledged: paid exactly those.
    ended, ends_at = _session(chain, bid, 100)
    confirmed(ended, ends_at, 100)
    used = ends_at - 70
    seller.usage[ended] = (used, net.sign_usage(consumer, ended, used))
    # Running long, its consumer silent past claim_idle_s: claimed now, 10 s acknowledged.
    silent, silent_ends = _session(chain, bid, 10_000)
    confirmed(silent, silent_ends, 10_000)
    used_silent = silent_ends - 10_000 + 10
    seller.usage[silent] = (used_silent, net.sign_usage(consumer, silent, used_silent))
    seller.begin(silent)
    seller.end(silent)
    await trio.sleep(61)
    chain.time_travel(120)
    await seller.settle()
    assert not net.session(ended).open
    assert not net.session(silent).open
    assert (seller.counters.settled, seller.counters.claimed_silent) == (2, 1)
    assert seller.counters.closed_early == 0  # claimed, not closed by their consumer
    assert seller.counters.paid_wei == 40 * PRICE
    assert net.balance(account.address) - before == 40 * PRICE
    assert ended not in seller.ends
    assert seller.ledger.open_sessions("provider") == []

    # Never claimed in its window (the chain out of reach the whole time?):
    # closed as anyone may, paying nothing, and said.
    missed = [_session(chain, bid, 100) for _ in range(2)]
    for session_id, missed_ends in missed:
        confirmed(session_id, missed_ends, 100)
    chain.time_travel(100 + CLAIM_WINDOW_S)
    with caplog.at_level(logging.WARNING, logger="p2pnode.p2p.market.billing"):
        await seller.settle()
    assert not any(net.session(session_id).open for session_id, _ in missed)
    assert (seller.counters.settled, seller.counters.missed_claims) == (4, 2)
    assert seller.counters.paid_wei == 40 * PRICE
    assert sorted(r.getMessage() for r in caplog.records) == sorted(
        f"session {session_id.hex()[:8]}: its claim window passed unclaimed"
        for session_id, _ in missed
    )


def unbid(model: str) -> tuple[str, str]:
    return (
        "WARNING",
        f"no live bid for {model} on chain, so it is not offered: run 'p2pnode provider "
        f"register', 'p2pnode model register {model}' and 'p2pnode bid post {model} --price "
        "<per second>' (those not done yet); this node picks the bid up within 5 s, no "
        "restart needed",
    )


async def test_a_provider_offers_a_bid_once_the_chain_has_it_and_says_what_is_missing_once(
    chain: Embedded, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seller = provider(chain, tmp_path, follow_s=5.0)
    seller.served = (MODEL, "other")
    changes: list[dict[str, tuple[bytes, int]]] = []
    seller.on_bids_changed = lambda: changes.append(dict(seller.bids))
    caplog.set_level(logging.INFO, logger="p2pnode.p2p.market")
    await seller.load_bids(list(seller.served))
    await seller.reload_bids()  # still none: said once, no change announced
    assert (seller.bids, changes) == ({}, [])
    assert said(caplog) == [unbid(MODEL), unbid("other")]
    caplog.clear()

    # Posted while the node runs: the next look at the chain's events offers it
    # (events since the first load, so none is missed in between).
    bid = bid_on(chain)
    chain.time_travel(1)  # a block after the bid's
    await seller.follow()
    assert seller.bids == {MODEL: (bid, PRICE)}
    assert changes == [{MODEL: (bid, PRICE)}]
    assert said(caplog) == [("INFO", f"bid for {MODEL}: {bid.hex()[:8]} at 0.001 tokens/s")]
    caplog.clear()
    await seller.reload_bids()
    real_live_bid = chain.chain.live_bid
    reads: list[str] = []

    def live_bid(address: str, model: str) -> object:
        reads.append(model)
        return real_live_bid(address, model)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chain.chain, "live_bid", live_bid)
        await seller.follow()  # no event of ours: the bids are not read again
    assert (len(changes), said(caplog), reads) == (1, [], [])

    # Withdrawn: no longer offered, and said again.
    chain.chain.delete_bid(chain.accounts[1], bid)
    await seller.follow()
    assert (seller.bids, changes[-1]) == ({}, {})
    assert said(caplog) == [unbid(MODEL)]


def hello_for(net: Embedded, bid: bytes, wallet: str | None = None) -> Hello:
    wallet = net.accounts[2].address if wallet is None else wallet
    return Hello(
        model_id=MODEL,
        ephemeral=bytes(32),
        nonce=bytes(16),
        timestamp=0.0,
        bid_id=bid.hex(),
        consumer_wallet=wallet,
    )


async def test_a_provider_confirms_only_the_open_session_of_this_hello(
    chain: Embedded,
    tmp_path: Path,
    autojump_clock: MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seller, bid = await bidding(chain, tmp_path)
    session_id, ends_at = _session(chain, bid, 100)
    hello = hello_for(chain, bid)
    real = chain.chain.session
    reads: list[bytes] = []

    def lagging(asked: bytes) -> object:
        # An RPC node that has not seen the open's block for its first two reads.
        reads.append(asked)
        return real(secrets.token_bytes(32) if len(reads) <= 2 else asked)

    monkeypatch.setattr(chain.chain, "session", lagging)
    started = trio.current_time()
    assert await seller.confirm(hello, session_id, "peer") is None
    assert (len(reads), trio.current_time() - started) == (3, 0.75)  # looked again twice
    assert seller.ends == {session_id: ends_at}
    assert [r.session_id for r in seller.ledger.open_sessions("provider")] == [session_id]
    monkeypatch.setattr(chain.chain, "session", real)

    other = chain.accounts[3].address
    for wrong in (
        hello_for(chain, bid, wallet=other),  # another consumer's session
        dataclasses.replace(hello, consumer_wallet=None),
        hello_for(chain, b"\x07" * 32),  # another bid
    ):
        assert await seller.confirm(wrong, session_id, "peer") == RejectCode.BAD_SESSION

    # A session the chain knows closed is refused at its first read.
    closed, _ = _session(chain, bid, 100)
    chain.chain.close_session(chain.accounts[2], closed)
    reads.clear()
    monkeypatch.setattr(chain.chain, "session", lagging)
    reads.extend([b"", b""])  # no lag this time
    started = trio.current_time()
    assert await seller.confirm(hello, closed, "peer") == RejectCode.BAD_SESSION
    assert (len(reads), trio.current_time()) == (3, started)
    monkeypatch.setattr(chain.chain, "session", real)

    # One past its end, by the chain's clock as last read.
    chain.time_travel(101)
    await seller.follow()
    assert await seller.confirm(hello, session_id, "peer") == RejectCode.BAD_SESSION

    monkeypatch.setattr(chain.chain, "session", unreachable)
    caplog.set_level(logging.INFO, logger="p2pnode.p2p.market")
    for _ in range(2):
        assert await seller.confirm(hello, session_id, "peer") == RejectCode.CHAIN_UNAVAILABLE
    assert seller.counters.chain_errors == 2
    assert said(caplog) == [("WARNING", f"cannot read session {session_id.hex()[:8]}: {DOWN}")] * 2


async def test_a_provider_reads_a_session_again_before_each_request(
    chain: Embedded,
    tmp_path: Path,
    autojump_clock: MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seller, bid = await bidding(chain, tmp_path)
    session_id, _ = _session(chain, bid, 100)
    assert not await seller.check(session_id)  # never confirmed here
    assert await seller.confirm(hello_for(chain, bid), session_id, "peer") is None
    assert await seller.check(session_id)

    # The chain out of reach: served within the end last read, and said (twice).
    caplog.set_level(logging.INFO, logger="p2pnode.p2p.market")
    monkeypatch.setattr(chain.chain, "session", unreachable)
    assert await seller.check(session_id)
    assert await seller.check(session_id)
    assert seller.counters.chain_errors == 2
    told = ("INFO", f"cannot re-read session {session_id.hex()[:8]}: {DOWN}")
    assert said(caplog) == [told, told]
    caplog.clear()
    monkeypatch.undo()

    # Its consumer closed it early: not served again, counted once.
    chain.chain.close_session(chain.accounts[2], session_id)
    assert not await seller.check(session_id)
    assert not await seller.check(session_id)
    assert seller.counters.closed_early == 1
    assert said(caplog) == [("INFO", f"session {session_id.hex()[:8]} was closed on chain")]

    also, _ = _session(chain, bid, 100)
    assert await seller.confirm(hello_for(chain, bid), also, "peer") is None
    chain.chain.close_session(chain.accounts[2], also)
    assert not await seller.check(also)
    assert seller.counters.closed_early == 2

    # Past its end by the provider's own clock: refused with no read at all.
    later, _ = _session(chain, bid, 100)
    assert await seller.confirm(hello_for(chain, bid), later, "peer") is None
    await trio.sleep(101)
    monkeypatch.setattr(chain.chain, "session", unreachable)
    assert not await seller.check(later)
    assert seller.counters.chain_errors == 2
    assert seller.counters.closed_early == 2


async def test_a_request_stops_at_its_sessions_end_or_close(
    chain: Embedded, tmp_path: Path, autojump_clock: MockClock
) -> None:
    seller, bid = await bidding(chain, tmp_path, follow_s=10.0)
    await seller.until_ended(b"\x09" * 32)  # not a session here: at once
    session_id, ends_at = _session(chain, bid, 100)
    assert await seller.confirm(hello_for(chain, bid), session_id, "peer") is None
    left = ends_at - seller.chain_time()
    started = trio.current_time()
    await seller.until_ended(session_id)
    # At its end by the chain's clock, not a follow_s round later.
    assert trio.current_time() - started == pytest.approx(left + 0.05)

    await seller.follow()  # as the node does every follow_s: the chain's clock read again
    closing, _ = _session(chain, bid, 100)
    assert await seller.confirm(hello_for(chain, bid), closing, "peer") is None
    ended_at = 0.0

    async def request() -> None:
        nonlocal ended_at
        await seller.until_ended(closing)
        ended_at = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await trio.sleep(3)
        chain.chain.close_session(chain.accounts[2], closing)
        closed_at = trio.current_time()
        # The clock held while follow() reads the chain in a worker thread: a
        # MockClock would jump the request's timers meanwhile.
        autojump_clock.autojump_threshold = math.inf
        await seller.follow()
        autojump_clock.autojump_threshold = 0
    assert ended_at == closed_at  # woken by the close, not by the next round
    assert seller.counters.closed_early == 1

    # Half a second left: stopped half a second later.
    await seller.follow()
    ending, ends_at = _session(chain, bid, 100)
    assert await seller.confirm(hello_for(chain, bid), ending, "peer") is None
    await trio.sleep(ends_at - seller.chain_time() - 0.5)
    started = trio.current_time()
    await seller.until_ended(ending)
    assert trio.current_time() - started == pytest.approx(0.55)


async def test_a_provider_claims_again_after_a_failed_claim_and_records_what_others_closed(
    chain: Embedded,
    tmp_path: Path,
    autojump_clock: MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seller, bid = await bidding(chain, tmp_path, claim_idle_s=60.0)
    hello = hello_for(chain, bid)
    unacked, _ = _session(chain, bid, 10_000)
    also, _ = _session(chain, bid, 10_000)
    elsewhere, _ = _session(chain, bid, 10_000)
    busy, _ = _session(chain, bid, 10_000)
    for session_id in (unacked, also, elsewhere, busy):
        assert await seller.confirm(hello, session_id, "peer") is None
    chain.chain.close_session(chain.accounts[2], elsewhere)  # its consumer closed it
    seller.begin(busy)  # a request running the whole time
    await trio.sleep(61)  # the others silent now: claimed early
    caplog.set_level(logging.INFO, logger="p2pnode.p2p.market")

    monkeypatch.setattr(chain.chain, "claim_session", unreachable)
    await seller.settle()
    assert sorted(said(caplog)) == sorted(
        ("WARNING", f"cannot claim session {s.hex()[:8]}: {DOWN}") for s in (unacked, also)
    )
    assert sorted(seller.ends) == sorted([unacked, also, busy])  # kept for the next round
    assert (seller.counters.settled, seller.counters.claimed_silent) == (0, 0)
    assert closed_in(seller.ledger, unacked) is None
    # Closed by someone else: recorded as settled here, with nothing claimed.
    assert closed_in(seller.ledger, elsewhere) == (0, 0)

    monkeypatch.undo()
    caplog.clear()
    await seller.settle()
    assert not chain.chain.session(unacked).open
    assert sorted(said(caplog)) == sorted(
        ("INFO", f"claimed session {s.hex()[:8]}: paid 0") for s in (unacked, also)
    )
    # Nothing acknowledged: the provider is paid nothing, its consumer refunded all.
    assert closed_in(seller.ledger, unacked) == (0, 10_000 * PRICE)
    counters = seller.counters
    assert (counters.settled, counters.claimed_silent, counters.paid_wei) == (2, 2, 0)
    assert (list(seller.ends), counters.closed_early) == ([busy], 0)
    assert chain.chain.session(busy).open


class Stop(Exception):
    """Ends a run() loop in a test (it runs forever in a node)."""


async def test_a_provider_follows_the_chain_every_round_settles_less_often_and_outlives_errors(
    chain: Embedded,
    tmp_path: Path,
    autojump_clock: MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seller = on_trio_time(provider(chain, tmp_path, follow_s=5.0, settle_every_s=20.0))
    steps: list[tuple[str, float]] = []

    def counted(name: str) -> None:
        real = getattr(seller, name)

        async def step() -> None:
            steps.append((name, trio.current_time()))
            if trio.current_time() > 40:
                raise Stop  # not a ChainError: ends the loop
            await real()

        setattr(seller, name, step)

    for name in ("follow", "settle", "reload_bids"):
        counted(name)
    real_events = chain.chain.events_since
    failures = [requests.exceptions.ConnectionError("no route to host")] * 2

    def flaky_events(*args: object) -> object:
        if failures:
            raise failures.pop()
        return real_events(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(chain.chain, "events_since", flaky_events)
    caplog.set_level(logging.INFO, logger="p2pnode.p2p.market")
    with pytest.raises(Stop):
        await seller.run()
    # Every follow_s a look at the chain; every settle_every_s (from the first
    # round on) a settle and a reload of the bids besides.
    assert steps == [
        *(("follow", 0.0), ("settle", 0.0), ("reload_bids", 0.0)),
        ("follow", 5.0), ("follow", 10.0), ("follow", 15.0),
        *(("follow", 20.0), ("settle", 20.0), ("reload_bids", 20.0)),
        ("follow", 25.0), ("follow", 30.0), ("follow", 35.0),
        *(("follow", 40.0), ("settle", 40.0), ("reload_bids", 40.0)),
        ("follow", 45.0),
    ]  # fmt: skip
    # The chain failed the first two looks: counted, said, and looked at again.
    assert seller.counters.chain_errors == 2
    told = ("WARNING", f"chain: {DOWN} (trying again in 5 s)")
    assert [line for line in said(caplog) if line[0] == "WARNING"] == [told, told]


async def test_a_consumer_pays_only_a_bid_the_chain_confirms_as_offered(
    chain: Embedded, tmp_path: Path
) -> None:
    bid = bid_on(chain)
    buyer = consumer(chain, tmp_path)
    wallet = chain.accounts[1].address

    async def mismatch(offered_by: str | None = wallet, **terms: object) -> tuple[str, bool] | None:
        named = {"model_id": MODEL, "price_per_s": PRICE, "bid_id": bid.hex(), "gguf_sha256": GGUF}
        model = ModelOffer(**{**named, **terms})  # type: ignore[arg-type]
        made = dataclasses.replace(offer(PRICE), wallet=offered_by, models=(model,))
        try:
            await buyer.check_bid(made, model)
        except market.OfferMismatch as exc:
            return str(exc), exc.stale
        return None

    assert await mismatch() is None
    assert await mismatch(gguf_sha256=None) is None  # no claim to check
    wrong = "the bid its offer names is"
    assert await mismatch(chain.accounts[3].address) == (f"{wrong} another wallet's", False)
    assert await mismatch(None) == (f"{wrong} another wallet's", False)
    assert await mismatch(model_id="other") == (f"{wrong} for another model", False)
    # Only the price: an offer re-priced since it was signed (stale, not a lie).
    assert await mismatch(price_per_s=2 * PRICE) == (f"{wrong} at another price", True)
    assert await mismatch(gguf_sha256="cd" * 32) == (f"{wrong} for another GGUF file", False)
    chain.chain.delete_bid(chain.accounts[1], bid)
    assert await mismatch() == (f"{wrong} not live", False)


async def open_paid(
    net: Embedded, buyer: market.ConsumerMarket, seller: market.ProviderMarket, seconds: int
) -> bytes:
    """A session opened as nodes open one: the consumer's signed Hello, the provider's
    approval, the consumer's open on chain."""
    terms = ModelOffer(
        model_id=MODEL, price_per_s=PRICE, bid_id=seller.bids[MODEL][0].hex(), gguf_sha256=GGUF
    )
    asked = Hello(model_id=MODEL, ephemeral=bytes(32), nonce=secrets.token_bytes(16), timestamp=0)
    hello = buyer.prepare_hello(asked, PROVIDER_PEER, terms, seconds * PRICE)
    assert hello.duration_s == seconds
    assert seller.check_hello(hello, PROVIDER_PEER) is None
    nonce = secrets.token_bytes(16)
    approval, expiry = await seller.approval(hello, nonce)
    approve = Approve(ephemeral=bytes(32), nonce=nonce, approval=approval, expiry=expiry)
    return await buyer.open_session(PROVIDER_PEER, hello, approve, terms, seconds * PRICE)


async def market_pair(
    net: Embedded, tmp_path: Path, **cfg: object
) -> tuple[market.ConsumerMarket, market.ProviderMarket]:
    seller, _bid = await bidding(net, tmp_path)
    buyer = consumer(net, tmp_path, **cfg)
    await buyer.prepare()
    return buyer, seller


def closed_in(ledger: Ledger, session_id: bytes) -> tuple[int, int] | None:
    """(paid, refunded) as sessions.db recorded the session's close (None: open)."""
    rows = ledger._db.execute(
        "SELECT state, paid, refunded FROM sessions WHERE session_id=?", (session_id,)
    ).fetchall()
    ((state, paid, refunded),) = rows
    return None if state == "open" else (int(paid), int(refunded))


async def test_a_consumer_acknowledges_what_it_used_and_closes_early_paying_it(
    chain: Embedded,
    tmp_path: Path,
    autojump_clock: MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    buyer, seller = await market_pair(chain, tmp_path)
    assert buyer.acknowledge(b"\x05" * 32) == (0, b"")  # not a session of this consumer
    real_open = chain.chain.open_session

    def slow_open(*args: object) -> object:
        # The open's transaction takes a quarter second of trio's clock.
        trio.from_thread.run_sync(autojump_clock.jump, 0.25)
        return real_open(*args)  # type: ignore[arg-type]

    await trio.sleep(1)
    monkeypatch.setattr(chain.chain, "open_session", slow_open)
    first = await open_paid(chain, buyer, seller, 100)
    monkeypatch.undo()
    assert buyer.open_ms == [250.0]  # what `simnet --scenario market` reports
    ends_at = chain.chain.session(first).ends_at
    assert buyer.ledger.open_sessions("consumer") == [
        LedgerSession(first, PROVIDER_PEER, 100 * PRICE, ends_at, False, 0, b"")
    ]
    buyer.begin(first)
    buyer.begin(first)
    buyer.end(first)
    assert buyer.open[first].active == 1  # one request still streams
    await trio.sleep(10)
    used, signature = buyer.acknowledge(first)
    assert used == ends_at - 100 + 10  # the open's chain time and the seconds since
    assert chain.chain.usage_signer(first, used, signature) == chain.accounts[2].address
    assert buyer.ledger.open_sessions("consumer")[0].served
    buyer.end(first)
    second = await open_paid(chain, buyer, seller, 100)
    buyer.acknowledge(second)

    # The chain out of reach: the session stays escrowed, said, and held against
    # the spend limit until a later close.
    caplog.set_level(logging.INFO, logger="p2pnode.p2p.market")
    monkeypatch.setattr(chain.chain, "session", unreachable)
    await buyer.close(first)
    assert said(caplog) == [("WARNING", f"cannot close session {first.hex()[:8]}: {DOWN}")]
    assert buyer.held() == 200 * PRICE
    monkeypatch.undo()
    caplog.clear()

    await buyer.close(first)
    await buyer.close_all()  # the second, in use but not released: closed too
    assert buyer.open == {}
    closes = [closed_in(buyer.ledger, s) for s in (first, second)]
    assert all(c is not None and c[0] > 0 and sum(c) == 100 * PRICE for c in closes)
    paid = [c[0] for c in closes if c is not None]
    refunded = [c[1] for c in closes if c is not None]
    counters = buyer.counters
    assert (counters.opened, counters.closed) == (2, 2)
    assert (counters.paid_wei, counters.refunded_wei) == (sum(paid), sum(refunded))
    assert said(caplog) == [
        ("INFO", f"closed session {s.hex()[:8]}: paid {p}, refunded {r}")
        for s, p, r in zip((first, second), paid, refunded, strict=True)
    ]


async def test_a_consumer_records_sessions_its_provider_settled_and_waits_for_unserved_ones(
    chain: Embedded,
    tmp_path: Path,
    autojump_clock: MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    buyer, seller = await market_pair(chain, tmp_path)
    claimed = [await open_paid(chain, buyer, seller, 100) for _ in range(2)]
    for session_id in claimed:
        buyer.acknowledge(session_id)
    unserved = [await open_paid(chain, buyer, seller, 100) for _ in range(2)]
    chain.time_travel(101)
    for session_id in claimed:  # the provider's claims, with the acknowledgements
        used, signature = buyer.acknowledge(session_id)
        chain.chain.claim_session(chain.accounts[1], session_id, used, signature)
    caplog.set_level(logging.INFO, logger="p2pnode.p2p.market")
    for session_id in claimed:
        await buyer.close(session_id)
        assert closed_in(buyer.ledger, session_id) == (0, 0)  # the provider's claim did it
    assert buyer.counters.closed_elsewhere == 2
    assert (buyer.counters.closed, buyer.counters.left_unserved) == (0, 0)
    assert said(caplog) == []

    for session_id in (*unserved, unserved[0]):  # each said once
        await buyer.close(session_id)
    assert said(caplog) == [("INFO", waits(buyer, s, "never served")) for s in unserved]
    assert buyer.counters.left_unserved == 2
    assert list(buyer.open) == unserved  # left in escrow until their claim window passes


def waits(buyer: market.ConsumerMarket, session_id: bytes, why: str) -> str:
    """What a consumer says of a session it leaves in escrow."""
    paid = buyer.open[session_id]
    back = paid.ends_at + CLAIM_WINDOW_S
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(back))
    return (
        f"session {session_id.hex()[:8]} with provider: {why}; its stake of {paid.stake} is "
        f"left in escrow and comes back by chain time {back} ({when} UTC: its end plus the "
        "claim window), or sooner if the provider settles it"
    )


async def test_a_consumer_releases_sessions_idle_or_past_their_end_but_none_in_use(
    chain: Embedded,
    tmp_path: Path,
    autojump_clock: MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    buyer, seller = await market_pair(chain, tmp_path, idle_close_s=120.0)
    busy = await open_paid(chain, buyer, seller, 10_000)
    idle = await open_paid(chain, buyer, seller, 10_000)
    for session_id in (busy, idle):
        buyer.acknowledge(session_id)
    buyer.begin(busy)  # a request that streams the whole time
    await trio.sleep(120)
    await buyer.round()
    assert buyer.usable(idle)  # idle exactly 120 s: not past it
    assert buyer.usable(busy)
    await trio.sleep(1)
    await buyer.round()
    assert buyer.usable(busy)
    assert idle not in buyer.open  # served and idle: closed, paying the seconds used
    assert closed_in(buyer.ledger, idle) is not None

    # Past its end by the consumer's own count (the chain's clock may lag), in
    # use until a moment before: released at its end, and left to its provider's
    # claim.
    short = await open_paid(chain, buyer, seller, 90)
    buyer.acknowledge(short)
    opened = trio.current_time()
    await trio.sleep(89)
    buyer.begin(short)
    buyer.end(short)
    await buyer.round()
    assert buyer.usable(short)
    await trio.sleep(opened + 90 - trio.current_time())
    caplog.set_level(logging.INFO, logger="p2pnode.p2p.market")
    await buyer.round()
    assert not buyer.usable(short)
    assert short in buyer.open  # not closed: its provider claims what was acknowledged
    assert said(caplog) == [("INFO", waits(buyer, short, "served, ended: its provider claims it"))]
    assert buyer.usable(busy)


async def test_a_consumer_settles_what_a_restart_left_before_its_first_round(
    chain: Embedded,
    tmp_path: Path,
    autojump_clock: MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before, seller = await market_pair(chain, tmp_path)
    left = await open_paid(chain, before, seller, 10_000)
    before.acknowledge(left)  # served, then the node stopped without closing it
    stuck = await open_paid(chain, before, seller, 10_000)
    before.acknowledge(stuck)
    after = consumer(chain, tmp_path)  # the same sessions.db
    after.ledger.closed(stuck, 0, 0)  # only `left` is listed as open
    rounds: list[float] = []

    async def counted() -> None:
        rounds.append(trio.current_time())
        if len(rounds) == 3:
            raise Stop

    after.round = counted  # type: ignore[method-assign]
    with pytest.raises(Stop):
        await after.run()
    assert rounds == [30.0, 60.0, 90.0]
    assert not chain.chain.session(left).open  # closed at start, paying the seconds used
    assert after.counters.closed == 1

    # Restarted with the chain out of reach: said, and left listed for the next try.
    again = consumer(chain, tmp_path)
    again.ledger.opened("consumer", "peer", stuck, seller.bids[MODEL][0], 10_000 * PRICE, 0)
    again.ledger.served(stuck)
    monkeypatch.setattr(chain.chain, "next_block_time", unreachable)
    monkeypatch.setattr(chain.chain, "session", unreachable)
    caplog.set_level(logging.INFO, logger="p2pnode.p2p.market")
    await again.close_all()
    assert said(caplog) == [
        ("WARNING", f"cannot read the chain's time: {DOWN}"),
        ("WARNING", f"cannot close session {stuck.hex()[:8]}: {DOWN}"),
    ]
    assert [row.session_id for row in again.ledger.open_sessions("consumer")] == [stuck]


async def test_a_provider_approves_only_a_signed_hello_for_its_live_bid_and_itself(
    chain: Embedded, tmp_path: Path, autojump_clock: MockClock
) -> None:
    buyer, seller = await market_pair(chain, tmp_path)
    bid = seller.bids[MODEL][0]
    assert seller.offer_terms((ModelOffer(model_id=MODEL), ModelOffer(model_id="other"))) == (
        ModelOffer(model_id=MODEL, price_per_s=PRICE, bid_id=bid.hex()),
        ModelOffer(model_id="other"),
    )
    terms = ModelOffer(model_id=MODEL, price_per_s=PRICE, bid_id=bid.hex())
    asked = Hello(model_id=MODEL, ephemeral=bytes(32), nonce=bytes(16), timestamp=0)
    hello = buyer.prepare_hello(asked, PROVIDER_PEER, terms, 100 * PRICE)
    assert seller.check_hello(hello, PROVIDER_PEER) is None
    change = dataclasses.replace
    for refused, code in (
        (asked, RejectCode.PAYMENT_REQUIRED),  # a free Hello
        (change(hello, bid_id=None), RejectCode.PAYMENT_REQUIRED),
        (change(hello, consumer_wallet=None), RejectCode.PAYMENT_REQUIRED),
        (change(hello, provider="12D3KooWother"), RejectCode.BAD_SESSION),
        (change(hello, bid_id="07" * 32), RejectCode.PRICE_CHANGED),  # not our bid (now)
        (change(hello, model_id="other"), RejectCode.PRICE_CHANGED),
        (change(hello, duration_s=1), RejectCode.BAD_SESSION),  # not what the wallet signed
        (change(hello, consumer_wallet=chain.accounts[3].address), RejectCode.BAD_SESSION),
    ):
        assert seller.check_hello(refused, PROVIDER_PEER) == code, refused


async def test_an_approval_lapses_by_the_chains_clock_never_much_behind_the_wall_clock(
    chain: Embedded, tmp_path: Path, autojump_clock: MockClock
) -> None:
    seller = on_trio_time(provider(chain, tmp_path, approval_ttl_s=120))
    wall = seller.wall()
    seller.skew = 5.0  # the chain's clock ahead (moved forward, or the wall clock slow)
    assert seller.approval_expiry() == int(wall + 5.0) + 120
    seller.skew = -29.0  # a chain whose blocks trail the wall clock
    assert seller.approval_expiry() == int(wall - 29.0) + 120
    # Far behind (no pending block reported): the block the open lands in will
    # carry about the wall clock's time, so the approval must not be dead on arrival.
    seller.skew = -3600.0
    assert seller.approval_expiry() == int(wall - 30) + 120
    await trio.sleep(10)
    assert seller.approval_expiry() == int(wall + 10 - 30) + 120


async def test_a_restarted_provider_claims_the_sessions_its_ledger_left_open(
    chain: Embedded, tmp_path: Path, autojump_clock: MockClock
) -> None:
    buyer, seller = await market_pair(chain, tmp_path)
    acked = await open_paid(chain, buyer, seller, 100)
    unacked = await open_paid(chain, buyer, seller, 100)
    running = await open_paid(chain, buyer, seller, 10_000)
    for session_id in (acked, unacked, running):
        hello = hello_for(chain, seller.bids[MODEL][0])
        assert await seller.confirm(hello, session_id, "peer") is None
    await trio.sleep(30)
    used, signature = buyer.acknowledge(acked)
    assert seller.check_usage(acked, used, signature) is None
    seller.ledger.close()

    again = on_trio_time(provider(chain, tmp_path))  # the same sessions.db, nothing in memory
    chain.time_travel(101)
    await again.settle()
    opened_at = chain.chain.session(acked).opened_at
    assert closed_in(again.ledger, acked) == ((used - opened_at) * PRICE, (100 - 30) * PRICE)
    assert closed_in(again.ledger, unacked) == (0, 100 * PRICE)
    assert closed_in(again.ledger, running) is None  # not over, not silent: left for later
    assert chain.chain.session(running).open
    assert (again.counters.settled, again.counters.paid_wei) == (2, 30 * PRICE)


async def test_a_session_is_claimed_from_the_second_it_ends(
    chain: Embedded, tmp_path: Path, autojump_clock: MockClock
) -> None:
    seller, bid = await bidding(chain, tmp_path)
    confirmed, ends_at = _session(chain, bid, 100)
    assert await seller.confirm(hello_for(chain, bid), confirmed, "peer") is None
    left, _ = _session(chain, bid, 100)  # in sessions.db only (from before a restart)
    seller.ledger.opened("provider", "peer", left, bid, 100 * PRICE, ends_at)
    # The wall clock half a second into the second the sessions end in.
    await trio.sleep(ends_at + 0.5 - seller.wall())
    await seller.settle()
    assert not chain.chain.session(confirmed).open
    assert not chain.chain.session(left).open
    assert seller.counters.settled == 2


async def test_a_node_refuses_a_marketplace_with_another_claim_window(
    chain: Embedded, monkeypatch: pytest.MonkeyPatch
) -> None:
    async_chain = AsyncChain(chain.chain)
    await market.check_contract(async_chain)
    monkeypatch.setattr(chain.chain, "claim_window", lambda: CLAIM_WINDOW_S + 1)
    with pytest.raises(ConfigError) as other:
        await market.check_contract(async_chain)
    assert str(other.value) == (
        f"the Marketplace's claim window is {CLAIM_WINDOW_S + 1} s, this node's "
        f"{CLAIM_WINDOW_S} s: a different contract version"
    )
    monkeypatch.setattr(chain.chain, "claim_window", unreachable)
    with pytest.raises(ChainError) as unread:
        await market.check_contract(async_chain)
    assert str(unread.value) == (
        f"cannot read the Marketplace's CLAIM_WINDOW ({DOWN}): a deployment from before "
        "acknowledged-time billing, or no chain; redeploy the contracts"
    )


def test_a_ledger_with_no_file_writes_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ledger = Ledger(None)
    ledger.opened("consumer", "peer", b"\x01", b"\x02", 5, 7)
    assert len(ledger.open_sessions("consumer")) == 1
    ledger.close()
    assert list(tmp_path.iterdir()) == []


def test_an_older_sessions_db_is_migrated_and_a_newer_one_refused(tmp_path: Path) -> None:
    """sessions.db from before acknowledgements: its open sessions count as served (the
    old rules closed every one at once), and the new columns start empty."""
    path = tmp_path / "sessions.db"
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.executescript(
            """
            CREATE TABLE sessions (
                session_id BLOB PRIMARY KEY, role TEXT NOT NULL, peer TEXT NOT NULL,
                bid_id BLOB NOT NULL, stake TEXT NOT NULL, ends_at INTEGER NOT NULL,
                state TEXT NOT NULL, paid TEXT, refunded TEXT);
            CREATE TABLE receipts (
                session_id BLOB PRIMARY KEY, requests INTEGER, prompt_tokens INTEGER,
                completion_tokens INTEGER, provider_signature BLOB, consumer_signature BLOB);
            INSERT INTO sessions VALUES (x'01', 'consumer', 'peer', x'02', '5', 7, 'open', NULL,
                NULL);
            INSERT INTO receipts VALUES (x'01', 1, 2, 3, x'aa', x'bb');
            """
        )
        old.commit()
    ledger = Ledger(path)
    (row,) = ledger.open_sessions("consumer")
    assert row == LedgerSession(b"\x01", "peer", 5, 7, True, 0, b"")
    ledger.opened("provider", "peer", b"\x03", b"\x02", 9, 11)
    ledger.usage(b"\x03", 10, b"sig")
    ledger.close()
    again = Ledger(path)  # migrated once: reopening changes nothing
    assert again.open_sessions("provider") == [
        LedgerSession(b"\x03", "peer", 9, 11, False, 10, b"sig")
    ]
    assert again.open_sessions("consumer") == [row]
    again.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (Ledger.VERSION,)
        assert db.execute("SELECT * FROM receipts").fetchall() == [
            (b"\x01", 1, 2, 3, b"\xaa", b"\xbb", b"")
        ]
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(ConfigError) as newer:
        Ledger(path)
    assert str(newer.value) == (
        f"{path} was written by a newer p2pnode (schema 99, this one reads {Ledger.VERSION})"
    )


async def test_a_consumer_closes_early_only_before_the_end_and_unserved_only_after_the_window(
    chain: Embedded,
    tmp_path: Path,
    autojump_clock: MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    buyer, seller = await market_pair(chain, tmp_path)
    served = await open_paid(chain, buyer, seller, 10_000)
    buyer.acknowledge(served)
    unserved = await open_paid(chain, buyer, seller, 10_000)
    ends_at = chain.chain.session(served).ends_at
    # A chain whose next block carries exactly the session's end: too late for an
    # early close (that would pay every second; the provider's claim pays what
    # was acknowledged).
    monkeypatch.setattr(chain.chain, "next_block_time", lambda: ends_at)
    await buyer.close(served)
    assert chain.chain.session(served).open
    # An unserved one is left to its provider until its end plus the claim
    # window, and closed by the first round from then on.
    await buyer.close(unserved)
    unserved_end = chain.chain.session(unserved).ends_at
    monkeypatch.setattr(chain.chain, "next_block_time", lambda: unserved_end + CLAIM_WINDOW_S - 1)
    await buyer.round()
    assert chain.chain.session(unserved).open
    monkeypatch.setattr(chain.chain, "next_block_time", lambda: unserved_end + CLAIM_WINDOW_S)
    await buyer.round()
    assert not chain.chain.session(unserved).open


async def test_a_session_ending_at_the_chains_time_now_is_not_confirmed(
    chain: Embedded, tmp_path: Path, autojump_clock: MockClock
) -> None:
    seller, bid = await bidding(chain, tmp_path)
    session_id, ends_at = _session(chain, bid, 100)
    seller.wall = lambda: 1000.0
    seller.skew = float(ends_at - 1000)  # the chain's time is its end, to the second
    assert await seller.confirm(hello_for(chain, bid), session_id, "p") == RejectCode.BAD_SESSION
    seller.skew -= 1
    assert await seller.confirm(hello_for(chain, bid), session_id, "p") is None
