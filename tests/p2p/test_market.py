"""The market's decisions one at a time, on a real in-process chain and no nodes:
what the user is told when nothing can be paid, how stakes add up against the
spend limit, which acknowledgements a provider keeps, when a session counts as
silent, and what the ledger keeps across a restart. Fast enough to run for
every mutant of p2p/market (tests/mutation.py); the flows end to end are in
tests/e2e/test_paid_*.py."""

from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3
from pathlib import Path

import pytest
import trio
from eth_account import Account
from trio.testing import MockClock

from p2pnode.chain.client import CLAIM_WINDOW_S, AsyncChain
from p2pnode.chain.embedded import MIN_PROVIDER_STAKE, Embedded, send_ether
from p2pnode.errors import ChainError, FundsError
from p2pnode.p2p import market
from p2pnode.p2p.market.ledger import Ledger, LedgerSession
from p2pnode.protocols.offers import ModelOffer, Offer

PRICE = 10**15  # 0.001 tokens per second
MODEL = "m"


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
    # Tokens but no ether for gas.
    gasless = Account.create()
    chain.chain.mint(chain.accounts[0], gasless.address, PRICE)
    with pytest.raises(FundsError, match="0 ether"):
        await market_of(gasless).check_funds(PRICE)


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
    assert seller.counters.paid_wei == 40 * PRICE
    assert net.balance(account.address) - before == 40 * PRICE
    assert ended not in seller.ends
    assert seller.ledger.open_sessions("provider") == []

    # Never claimed in its window (the chain out of reach the whole time?):
    # closed as anyone may, paying nothing, and said.
    missed, missed_ends = _session(chain, bid, 100)
    confirmed(missed, missed_ends, 100)
    chain.time_travel(100 + CLAIM_WINDOW_S)
    with caplog.at_level(logging.WARNING, logger="p2pnode.p2p.market.billing"):
        await seller.settle()
    assert not net.session(missed).open
    assert (seller.counters.settled, seller.counters.missed_claims) == (3, 1)
    assert seller.counters.paid_wei == 40 * PRICE
    assert [r.getMessage() for r in caplog.records] == [
        f"session {missed.hex()[:8]}: its claim window passed unclaimed"
    ]
