"""The marketplace contracts through web3 on the embedded chain: every function, every revert."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from eth_account.signers.local import LocalAccount

from p2pnode.chain.client import Chain, model_key
from p2pnode.chain.embedded import MIN_PROVIDER_STAKE, TOKEN, Embedded, open_embedded
from p2pnode.errors import ChainError

PRICE = 10**15  # per second
PEER = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"


@pytest.fixture(scope="module")
def embedded() -> Embedded:
    return open_embedded()


@pytest.fixture
def net(embedded: Embedded) -> Iterator[Embedded]:
    snapshot = embedded.tester.take_snapshot()
    yield embedded
    embedded.tester.revert_to_snapshot(snapshot)


def _provider(net: Embedded, who: int = 1, model: str = "m") -> tuple[LocalAccount, bytes]:
    chain, provider = net.chain, net.accounts[who]
    chain.register_provider(provider, PEER, MIN_PROVIDER_STAKE)
    if not chain.model_registered(model):
        chain.register_model(provider, model, "ab" * 32)
    return provider, chain.post_bid(provider, model, PRICE).value


def _open(
    net: Embedded, provider: LocalAccount, bid: bytes, consumer: LocalAccount, stake: int
) -> bytes:
    chain = net.chain
    expiry, nonce = chain.now() + 60, secrets.token_bytes(32)
    approval = chain.sign_approval(provider, bid, consumer.address, expiry, nonce)
    return chain.open_session(consumer, bid, stake, PRICE, expiry, nonce, approval).value[0]


def test_provider_registration_update_and_deregistration(net: Embedded) -> None:
    chain, provider = net.chain, net.accounts[1]
    before = chain.balance(provider.address)
    chain.register_provider(provider, PEER, MIN_PROVIDER_STAKE)
    assert chain.provider(provider.address) == (PEER, MIN_PROVIDER_STAKE, 0, True)
    assert chain.balance(provider.address) == before - MIN_PROVIDER_STAKE
    chain.update_provider(provider, "12D3KooWnew", add_stake=5 * TOKEN)
    assert chain.provider(provider.address)[:2] == ("12D3KooWnew", MIN_PROVIDER_STAKE + 5 * TOKEN)
    chain.deregister_provider(provider)
    assert chain.provider(provider.address) == ("", 0, 0, False)
    assert chain.balance(provider.address) == before


@pytest.mark.parametrize(
    ("action", "error"),
    [
        (lambda c, a: c.register_provider(a, "", MIN_PROVIDER_STAKE), "EmptyPeerId()"),
        (lambda c, a: c.register_provider(a, PEER, 1), "StakeTooLow(minimum="),
        (lambda c, a: c.update_provider(a, PEER), "NotRegistered()"),
        (lambda c, a: c.deregister_provider(a), "NotRegistered()"),
        (lambda c, a: c.post_bid(a, "m", PRICE), "NotRegistered()"),
        (lambda c, a: c.delete_bid(a, bytes(32)), "UnknownBid()"),
        (lambda c, a: c.close_session(a, bytes(32)), "SessionNotOpen()"),
    ],
)
def test_reverts_before_registration(net: Embedded, action: object, error: str) -> None:
    with pytest.raises(ChainError, match=error.replace("(", r"\(").replace(")", r"\)")):
        action(net.chain, net.accounts[3])  # type: ignore[operator]


def test_registration_reverts(net: Embedded) -> None:
    chain, provider = net.chain, net.accounts[1]
    chain.register_provider(provider, PEER, MIN_PROVIDER_STAKE)
    with pytest.raises(ChainError, match=r"AlreadyRegistered\(\)"):
        chain.register_provider(provider, PEER, MIN_PROVIDER_STAKE)
    with pytest.raises(ChainError, match=r"EmptyPeerId\(\)"):
        chain.update_provider(provider, "")
    poor = net.accounts[9]
    with pytest.raises(ChainError, match="insufficient token balance"):
        chain.register_provider(poor, PEER, 10**30)


def test_models_and_bids(net: Embedded) -> None:
    chain, provider = net.chain, net.accounts[1]
    chain.register_provider(provider, PEER, MIN_PROVIDER_STAKE)
    with pytest.raises(ChainError, match=r"UnknownModel\(\)"):
        chain.post_bid(provider, "m", PRICE)
    chain.register_model(provider, "m", "ab" * 32)
    name, sha, owner = chain.market.functions.getModel(model_key("m")).call()
    assert (name, sha, owner) == ("m", bytes.fromhex("ab" * 32), provider.address)
    with pytest.raises(ChainError, match=r"ModelExists\(\)"):
        chain.register_model(net.accounts[2], "m", None)
    with pytest.raises(ChainError, match=r"ZeroPrice\(\)"):
        chain.post_bid(provider, "m", 0)
    bid = chain.post_bid(provider, "m", PRICE).value
    assert chain.live_bid(provider.address, "m") == bid
    # Re-pricing keeps the one live bid and costs no fee (no token moves).
    before = chain.balance(provider.address)
    assert chain.post_bid(provider, "m", 2 * PRICE).value == bid
    assert chain.bid(bid).price_per_s == 2 * PRICE
    assert chain.balance(provider.address) == before
    with pytest.raises(ChainError, match=r"NotBidOwner\(\)"):
        chain.delete_bid(net.accounts[2], bid)
    chain.delete_bid(provider, bid)
    assert not chain.bid(bid).live
    assert chain.live_bid(provider.address, "m") is None
    with pytest.raises(ChainError, match=r"BidNotLive\(\)"):
        chain.delete_bid(provider, bid)
    new_bid = chain.post_bid(provider, "m", PRICE).value
    assert new_bid != bid


def test_a_session_pays_for_seconds_used_and_refunds_the_rest(net: Embedded) -> None:
    chain = net.chain
    provider, bid = _provider(net)
    consumer = net.accounts[2]
    p0, c0 = chain.balance(provider.address), chain.balance(consumer.address)
    stake = 100 * PRICE  # 100 seconds
    session_id = _open(net, provider, bid, consumer, stake)
    held = chain.session(session_id)
    assert (held.consumer, held.provider, held.stake, held.open) == (
        consumer.address,
        provider.address,
        stake,
        True,
    )
    assert held.ends_at - held.opened_at == 100
    assert chain.provider(provider.address)[2] == 1
    net.time_travel(30)
    paid, refunded = chain.close_session(consumer, session_id).value
    used = chain.session(session_id)
    assert not used.open
    assert paid == PRICE * (chain.now() - held.opened_at)
    assert 30 * PRICE <= paid <= 32 * PRICE
    assert paid + refunded == stake
    assert chain.balance(provider.address) == p0 + paid
    assert chain.balance(consumer.address) == c0 - paid
    assert chain.totals() == (stake, paid, refunded)
    with pytest.raises(ChainError, match=r"SessionNotOpen\(\)"):
        chain.close_session(consumer, session_id)


def test_after_its_end_anyone_closes_and_the_provider_gets_the_whole_stake(
    net: Embedded,
) -> None:
    chain = net.chain
    provider, bid = _provider(net)
    consumer, stranger = net.accounts[2], net.accounts[5]
    session_id = _open(net, provider, bid, consumer, 10 * PRICE)
    with pytest.raises(ChainError, match=r"NotYetEnded\(endsAt="):
        chain.close_session(stranger, session_id)
    net.time_travel(3600)
    assert chain.close_session(stranger, session_id).value == (10 * PRICE, 0)
    chain.deregister_provider(provider)  # nothing open any more


def test_the_provider_may_close_early(net: Embedded) -> None:
    provider, bid = _provider(net)
    session_id = _open(net, provider, bid, net.accounts[2], 50 * PRICE)
    paid, refunded = net.chain.close_session(provider, session_id).value
    assert paid + refunded == 50 * PRICE
    assert refunded >= 48 * PRICE


def test_approvals_are_single_use_bound_to_the_consumer_and_expire(net: Embedded) -> None:
    chain = net.chain
    provider, bid = _provider(net)
    consumer, other = net.accounts[2], net.accounts[3]
    expiry, nonce = chain.now() + 60, secrets.token_bytes(32)
    approval = chain.sign_approval(provider, bid, consumer.address, expiry, nonce)
    with pytest.raises(ChainError, match=r"BadApproval\(\)"):  # bound to the consumer
        chain.open_session(other, bid, 10 * PRICE, PRICE, expiry, nonce, approval)
    forged = chain.sign_approval(other, bid, consumer.address, expiry, nonce)
    with pytest.raises(ChainError, match=r"BadApproval\(\)"):  # signed by someone else
        chain.open_session(consumer, bid, 10 * PRICE, PRICE, expiry, nonce, forged)
    with pytest.raises(ChainError, match=r"StakeBelowOneSecond\(price="):
        chain.open_session(consumer, bid, PRICE - 1, PRICE, expiry, nonce, approval)
    chain.open_session(consumer, bid, 10 * PRICE, PRICE, expiry, nonce, approval)
    with pytest.raises(ChainError, match=r"ApprovalUsed\(\)"):
        chain.open_session(consumer, bid, 10 * PRICE, PRICE, expiry, nonce, approval)
    again = chain.sign_approval(provider, bid, consumer.address, expiry + 1, nonce)
    with pytest.raises(ChainError, match=r"SessionExists\(\)"):  # same nonce, same session id
        chain.open_session(consumer, bid, 10 * PRICE, PRICE, expiry + 1, nonce, again)
    late_nonce = secrets.token_bytes(32)
    late = chain.sign_approval(provider, bid, consumer.address, chain.now() + 5, late_nonce)
    net.time_travel(60)
    with pytest.raises(ChainError, match=r"ApprovalExpired\(expiry="):
        chain.open_session(consumer, bid, 10 * PRICE, PRICE, chain.now() - 55, late_nonce, late)


def test_a_repriced_bid_above_the_agreed_price_reverts(net: Embedded) -> None:
    chain = net.chain
    provider, bid = _provider(net)
    consumer = net.accounts[2]
    expiry, nonce = chain.now() + 60, secrets.token_bytes(32)
    approval = chain.sign_approval(provider, bid, consumer.address, expiry, nonce)
    chain.post_bid(provider, "m", 3 * PRICE)
    with pytest.raises(ChainError, match=r"PriceAboveLimit\(price=3000000000000000, limit="):
        chain.open_session(consumer, bid, 10 * PRICE, PRICE, expiry, nonce, approval)


def test_sessions_block_deregistration_and_bids_of_the_deregistered_are_dead(
    net: Embedded,
) -> None:
    chain = net.chain
    provider, bid = _provider(net)
    consumer = net.accounts[2]
    session_id = _open(net, provider, bid, consumer, 10 * PRICE)
    with pytest.raises(ChainError, match=r"SessionsOpen\(count=1\)"):
        chain.deregister_provider(provider)
    chain.close_session(consumer, session_id)
    chain.deregister_provider(provider)
    with pytest.raises(ChainError, match=r"NotRegistered\(\)"):
        _open(net, provider, bid, consumer, 10 * PRICE)
    with pytest.raises(ChainError, match=r"UnknownBid\(\)"):
        _open(net, provider, bytes(32), consumer, 10 * PRICE)


def test_a_withdrawn_bid_opens_no_session(net: Embedded) -> None:
    provider, bid = _provider(net)
    net.chain.delete_bid(provider, bid)
    with pytest.raises(ChainError, match=r"BidNotLive\(\)"):
        _open(net, provider, bid, net.accounts[2], 10 * PRICE)


def test_sessions_are_found_from_events(net: Embedded) -> None:
    provider, bid = _provider(net)
    consumer = net.accounts[2]
    first = _open(net, provider, bid, consumer, 10 * PRICE)
    second = _open(net, provider, bid, consumer, 10 * PRICE)
    assert net.chain.sessions_of(consumer.address) == [first, second]
    assert net.chain.sessions_of(provider.address) == [first, second]


def test_the_token_mints_only_for_its_owner(net: Embedded) -> None:
    with pytest.raises(ChainError, match=r"OwnableUnauthorizedAccount\(account="):
        net.chain.mint(net.accounts[1], net.accounts[1].address, 1)


def test_chain_client_reads(net: Embedded) -> None:
    chain: Chain = net.chain
    assert chain.min_provider_stake() == MIN_PROVIDER_STAKE
    assert chain.eth_balance(net.accounts[0].address) > 0
    assert chain.now() > 1_700_000_000
