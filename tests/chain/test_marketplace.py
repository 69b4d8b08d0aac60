"""The marketplace contracts through web3 on the embedded chain: every function, every revert."""

from __future__ import annotations

import secrets
import time
from dataclasses import replace

import pytest
from eth_account.signers.local import LocalAccount

from p2pnode.chain.client import (
    CLAIM_WINDOW_S,
    AsyncChain,
    Chain,
    MarketEvents,
    Unfunded,
    model_key,
)
from p2pnode.chain.embedded import MIN_PROVIDER_STAKE, TOKEN, Embedded
from p2pnode.errors import ChainError
from p2pnode.p2p.market import (
    MAX_CHAIN_LAG_S,
    Config,
    Ledger,
    ProviderMarket,
    Wallet,
    check_contract,
)

PRICE = 10**15  # per second
PEER = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
GGUF = "ab" * 32


def _provider(
    net: Embedded, who: int = 1, model: str = "m", price: int = PRICE
) -> tuple[LocalAccount, bytes]:
    chain, provider = net.chain, net.accounts[who]
    chain.register_provider(provider, PEER, MIN_PROVIDER_STAKE)
    chain.register_model(provider, model, GGUF)
    return provider, chain.post_bid(provider, model, price).value


def _open(
    net: Embedded,
    provider: LocalAccount,
    bid: bytes,
    consumer: LocalAccount,
    stake: int,
    price: int = PRICE,
) -> bytes:
    chain = net.chain
    expiry, nonce = chain.now() + 60, secrets.token_bytes(32)
    approval = chain.sign_approval(provider, bid, consumer.address, expiry, nonce)
    return bytes(chain.open_session(consumer, bid, stake, price, expiry, nonce, approval).value[0])


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
        (lambda c, a: c.claim_session(a, bytes(32), 0, b""), "SessionNotOpen()"),
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
    with pytest.raises(Unfunded, match=rf"approve: wallet {poor.address} has \S+ ether and "
                       r"1000000 tokens, needs 1000000000000 tokens: send it"):  # fmt: skip
        chain.register_provider(poor, PEER, 10**30)


def test_models_and_bids(net: Embedded) -> None:
    chain, provider = net.chain, net.accounts[1]
    chain.register_provider(provider, PEER, MIN_PROVIDER_STAKE)
    with pytest.raises(ChainError, match=r"UnknownModel\(\)"):
        chain.post_bid(provider, "m", PRICE)
    chain.register_model(provider, "m", GGUF)
    assert chain.model_registered("m")
    assert chain.market.functions.getModel(model_key("m")).call() == ("m", provider.address)
    assert chain.declared_gguf(provider.address, "m") == GGUF
    with pytest.raises(ChainError, match=r"ZeroPrice\(\)"):
        chain.post_bid(provider, "m", 0)
    bid = chain.post_bid(provider, "m", PRICE).value
    assert chain.live_bid(provider.address, "m") == bid
    assert chain.bid(bid).gguf_sha256 == GGUF
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


def _block_time(chain: Chain, tx_hash: str) -> int:
    number = chain.w3.eth.get_transaction_receipt(tx_hash)["blockNumber"]  # type: ignore[arg-type]
    return int(chain.w3.eth.get_block(number)["timestamp"])


def _closable(net: Embedded, session_id: bytes) -> str:
    closable_at = net.chain.session(session_id).ends_at + CLAIM_WINDOW_S
    return rf"NotClosableYet\(closableAt={closable_at}\)"


def test_an_unclaimed_session_pays_nothing_and_anyone_closes_it_after_the_window(
    net: Embedded,
) -> None:
    """A provider that holds no acknowledgement (it served nothing) is paid nothing,
    and the stake comes back once the claim window has passed: none is stranded."""
    chain = net.chain
    provider, bid = _provider(net)
    consumer, stranger = net.accounts[2], net.accounts[5]
    p0, c0 = chain.balance(provider.address), chain.balance(consumer.address)
    session_id = _open(net, provider, bid, consumer, 10 * PRICE)
    assert chain.claim_window() == CLAIM_WINDOW_S
    with pytest.raises(ChainError, match=_closable(net, session_id)):
        chain.close_session(stranger, session_id)
    net.time_travel(20)  # past its end: the window is the provider's, not anyone's
    for who in (stranger, consumer):
        with pytest.raises(ChainError, match=_closable(net, session_id)):
            chain.close_session(who, session_id)
    with pytest.raises(ChainError, match=r"ProviderMustClaim\(\)"):
        chain.close_session(provider, session_id)
    net.time_travel(CLAIM_WINDOW_S)
    assert chain.close_session(stranger, session_id).value == (0, 10 * PRICE)
    assert chain.balance(provider.address) == p0
    assert chain.balance(consumer.address) == c0
    assert chain.totals() == (10 * PRICE, 0, 10 * PRICE)
    chain.deregister_provider(provider)  # nothing open any more


def test_the_provider_is_paid_exactly_the_acknowledged_seconds(net: Embedded) -> None:
    chain = net.chain
    provider, bid = _provider(net)
    consumer = net.accounts[2]
    p0, c0 = chain.balance(provider.address), chain.balance(consumer.address)
    session_id = _open(net, provider, bid, consumer, 100 * PRICE)
    held = chain.session(session_id)
    used_until = held.opened_at + 37
    ack = chain.sign_usage(consumer, session_id, used_until)
    assert chain.usage_signer(session_id, used_until, ack) == consumer.address
    net.time_travel(60)
    paid, refunded = chain.claim_session(provider, session_id, used_until, ack).value
    assert (paid, refunded) == (37 * PRICE, 63 * PRICE)
    assert not chain.session(session_id).open
    assert chain.balance(provider.address) == p0 + 37 * PRICE
    assert chain.balance(consumer.address) == c0 - 37 * PRICE
    assert chain.totals() == (100 * PRICE, 37 * PRICE, 63 * PRICE)
    with pytest.raises(ChainError, match=r"SessionNotOpen\(\)"):
        chain.claim_session(provider, session_id, used_until, ack)


def test_an_acknowledgement_is_capped_by_the_end_and_by_the_claims_block(net: Embedded) -> None:
    chain = net.chain
    provider, bid = _provider(net)
    consumer = net.accounts[2]
    # A consumer acknowledging past its session's end pays for the session, no more.
    ended = _open(net, provider, bid, consumer, 10 * PRICE)
    far = chain.session(ended).opened_at + 10_000
    net.time_travel(30)
    ack = chain.sign_usage(consumer, ended, far)
    assert chain.claim_session(provider, ended, far, ack).value == (10 * PRICE, 0)
    # An acknowledgement of time still to come pays only up to the claim's block.
    running = _open(net, provider, bid, consumer, 100 * PRICE)
    opened_at = chain.session(running).opened_at
    ack = chain.sign_usage(consumer, running, opened_at + 90)
    tx = chain.claim_session(provider, running, opened_at + 90, ack)
    claimed_at = _block_time(chain, tx.tx_hash)
    paid, refunded = tx.value
    assert paid == PRICE * (claimed_at - opened_at) < 90 * PRICE
    assert paid + refunded == 100 * PRICE


def test_a_claim_with_a_forged_acknowledgement_is_refused(net: Embedded) -> None:
    """The attack: a provider claims more time than its consumer acknowledged."""
    chain = net.chain
    provider, bid = _provider(net)
    consumer, other = net.accounts[2], net.accounts[3]
    session_id = _open(net, provider, bid, consumer, 100 * PRICE)
    another = _open(net, provider, bid, consumer, 100 * PRICE)
    used_until = chain.session(session_id).opened_at + 10
    net.time_travel(50)
    honest = chain.sign_usage(consumer, session_id, used_until)
    forgeries = {
        "signed by the provider": chain.sign_usage(provider, session_id, used_until + 30),
        "signed by another wallet": chain.sign_usage(other, session_id, used_until),
        "for another session": chain.sign_usage(consumer, another, used_until),
        "junk": b"\x01" * 65,
        "none": b"",
    }
    for what, signature in forgeries.items():
        with pytest.raises(ChainError, match=r"BadUsage\(\)"):
            chain.claim_session(provider, session_id, used_until, signature)
        assert chain.usage_signer(session_id, used_until, signature) != consumer.address, what
    # The consumer's signature of 10 seconds does not pay for 40.
    with pytest.raises(ChainError, match=r"BadUsage\(\)"):
        chain.claim_session(provider, session_id, used_until + 30, honest)
    # Only the provider claims, and with the real acknowledgement it is paid for it.
    for who in (consumer, other):
        with pytest.raises(ChainError, match=r"NotProvider\(\)"):
            chain.claim_session(who, session_id, used_until, honest)
    assert chain.claim_session(provider, session_id, used_until, honest).value == (
        10 * PRICE,
        90 * PRICE,
    )


def test_a_provider_refunds_a_session_by_claiming_nothing(net: Embedded) -> None:
    provider, bid = _provider(net)
    session_id = _open(net, provider, bid, net.accounts[2], 50 * PRICE)
    net.time_travel(5)
    with pytest.raises(ChainError, match=r"ProviderMustClaim\(\)"):
        net.chain.close_session(provider, session_id)
    assert net.chain.claim_session(provider, session_id, 0, b"").value == (0, 50 * PRICE)


def test_the_claim_window_closes(net: Embedded) -> None:
    """After its end plus the window a session is anyone's to close, paying 0; the
    provider's acknowledgement came too late."""
    chain = net.chain
    provider, bid = _provider(net)
    consumer = net.accounts[2]
    session_id = _open(net, provider, bid, consumer, 10 * PRICE)
    held = chain.session(session_id)
    ack = chain.sign_usage(consumer, session_id, held.opened_at + 5)
    net.time_travel(10 + CLAIM_WINDOW_S)
    closed_at = held.ends_at + CLAIM_WINDOW_S
    with pytest.raises(ChainError, match=rf"ClaimWindowClosed\(closedAt={closed_at}\)"):
        chain.claim_session(provider, session_id, held.opened_at + 5, ack)
    assert chain.close_session(consumer, session_id).value == (0, 10 * PRICE)


def test_the_consumer_closing_early_pays_the_elapsed_seconds_and_no_more_after_its_end(
    net: Embedded,
) -> None:
    chain = net.chain
    provider, bid = _provider(net)
    consumer = net.accounts[2]
    early = _open(net, provider, bid, consumer, 100 * PRICE)
    net.time_travel(20)
    tx = chain.close_session(consumer, early)
    closed_at = _block_time(chain, tx.tx_hash)
    assert tx.value[0] == PRICE * (closed_at - chain.session(early).opened_at)
    # From its end on, the session is the provider's to claim: the consumer waits.
    late = _open(net, provider, bid, consumer, 10 * PRICE)
    net.time_travel(30)
    with pytest.raises(ChainError, match=_closable(net, late)):
        chain.close_session(consumer, late)


def test_the_local_usage_digest_is_the_contracts(net: Embedded) -> None:
    from eth_account.messages import _hash_eip191_message, encode_typed_data

    from p2pnode.chain.client import _USAGE_TYPES

    chain = net.chain
    for session_id, used_until in ((bytes(32), 0), (secrets.token_bytes(32), 2**64 - 1)):
        local = encode_typed_data(
            domain_data=chain.domain(),
            message_types=_USAGE_TYPES,
            message_data={"sessionId": session_id, "usedUntil": used_until},
        )
        assert _hash_eip191_message(local) == chain.usage_digest(session_id, used_until)


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


# --- models: ids are names' hashes, and naming one gives no rights over it -------------


def test_a_model_id_is_the_hash_of_its_name(net: Embedded) -> None:
    chain, provider = net.chain, net.accounts[1]
    assert not chain.model_registered("llama-3-8b")
    chain.register_model(provider, "llama-3-8b", GGUF)
    assert bytes(chain.market.functions.modelIdOf("llama-3-8b").call()) == model_key("llama-3-8b")
    name, _ = chain.market.functions.getModel(model_key("llama-3-8b")).call()
    assert name == "llama-3-8b"
    with pytest.raises(ChainError, match=r"EmptyModelName\(\)"):
        chain.register_model(provider, "", GGUF)
    with pytest.raises(ChainError, match=r"ModelNameTooLong\(length=513, maximum=512\)"):
        chain.register_model(provider, "x" * 513, GGUF)


def test_a_squatted_name_neither_blocks_nor_poisons_other_providers_bids(net: Embedded) -> None:
    """The attack: the first to register a popular name gives it a wrong GGUF hash."""
    chain, squatter = net.chain, net.accounts[7]
    bogus = "66" * 32
    chain.register_model(squatter, "popular", bogus)
    honest, silent = net.accounts[1], net.accounts[2]
    chain.register_provider(honest, PEER, MIN_PROVIDER_STAKE)
    chain.register_provider(silent, PEER, MIN_PROVIDER_STAKE)
    chain.register_model(honest, "popular", GGUF)  # reverted ModelExists before
    bid = chain.post_bid(honest, "popular", PRICE).value
    assert chain.bid(bid).gguf_sha256 == GGUF
    # A provider that declared nothing bids too, claiming no file (not the squatter's).
    other = chain.post_bid(silent, "popular", PRICE).value
    assert chain.bid(other).gguf_sha256 is None
    # The squatter's declaration is its own; naming first gave it nothing over others.
    chain.register_model(squatter, "popular", "77" * 32)
    assert chain.declared_gguf(squatter.address, "popular") == "77" * 32
    assert chain.declared_gguf(honest.address, "popular") == GGUF
    assert chain.market.functions.getModel(model_key("popular")).call() == (
        "popular",
        squatter.address,
    )
    assert chain.bid(bid).gguf_sha256 == GGUF
    _open(net, honest, bid, net.accounts[4], 10 * PRICE)


def test_a_changed_declaration_makes_a_new_bid_and_open_sessions_keep_their_terms(
    net: Embedded,
) -> None:
    """A consumer's approval names a bid: the file a bid claims never changes under it."""
    chain = net.chain
    provider, bid = _provider(net)
    consumer = net.accounts[4]
    session_id = _open(net, provider, bid, consumer, 20 * PRICE)
    chain.register_model(provider, "m", "cd" * 32)
    assert chain.bid(bid).gguf_sha256 == GGUF  # the posted bid keeps its claim
    new = chain.post_bid(provider, "m", 2 * PRICE).value
    assert new != bid
    assert (chain.bid(new).gguf_sha256, chain.bid(new).price_per_s) == ("cd" * 32, 2 * PRICE)
    assert not chain.bid(bid).live
    assert chain.live_bid(provider.address, "m") == new
    assert chain.post_bid(provider, "m", 3 * PRICE).value == new  # a re-price keeps the id
    with pytest.raises(ChainError, match=r"BidNotLive\(\)"):
        _open(net, provider, bid, consumer, 10 * PRICE)
    net.time_travel(5)
    paid, refunded = chain.close_session(consumer, session_id).value
    held = chain.session(session_id)
    assert paid == PRICE * (chain.now() - held.opened_at)  # the price it opened at
    assert paid + refunded == 20 * PRICE


# --- registrations: a provider that leaves takes its bids with it ----------------------


def test_a_deregistered_providers_bids_stay_dead_when_it_registers_again(net: Embedded) -> None:
    """The attack: bids (and approvals for them) from before leaving open sessions after
    the provider comes back, at the old terms."""
    chain = net.chain
    provider, bid = _provider(net)
    consumer = net.accounts[4]
    chain.close_session(consumer, _open(net, provider, bid, consumer, 10 * PRICE))
    chain.deregister_provider(provider)
    assert not chain.bid(bid).live
    assert chain.live_bid(provider.address, "m") is None
    chain.register_provider(provider, PEER, MIN_PROVIDER_STAKE)
    assert not chain.bid(bid).live
    assert chain.live_bid(provider.address, "m") is None
    with pytest.raises(ChainError, match=r"BidNotLive\(\)"):
        _open(net, provider, bid, consumer, 10 * PRICE)
    with pytest.raises(ChainError, match=r"BidNotLive\(\)"):
        chain.delete_bid(provider, bid)
    new = chain.post_bid(provider, "m", PRICE).value
    assert new != bid
    assert chain.live_bid(provider.address, "m") == new
    session_id = _open(net, provider, new, consumer, 10 * PRICE)
    assert sum(chain.claim_session(provider, session_id, 0, b"").value) == 10 * PRICE


# --- durations and totals: nothing wraps, nothing is stranded --------------------------


def test_a_stake_buying_more_than_the_longest_session_reverts(net: Embedded) -> None:
    """The attack: 2^64 - 1 at 1 per second made endsAt wrap to openedAt - 1; closing
    then reverted for everyone (an underflow), and the provider could never deregister."""
    chain = net.chain
    provider, bid = _provider(net, price=1)
    consumer = net.accounts[4]
    longest = 365 * 24 * 3600
    for stake in (2**64 - 1, 2**64, longest + 1, 2**70):
        message = rf"SessionTooLong\(duration={stake}, maximum={longest}\)"
        with pytest.raises(ChainError, match=message):
            _open(net, provider, bid, consumer, stake, price=1)
    assert chain.max_session_seconds() == longest
    chain.deregister_provider(provider)  # nothing was opened, nothing is stranded


def test_the_longest_session_opens_and_settles(net: Embedded) -> None:
    chain = net.chain
    price = 2**128  # and a price far beyond any real one
    provider, bid = _provider(net, price=price)
    consumer, stranger = net.accounts[4], net.accounts[7]
    chain.mint(net.accounts[0], consumer.address, 2**160)
    longest = chain.max_session_seconds()
    stake = price * longest + price - 1  # not a whole number of seconds
    session_id = _open(net, provider, bid, consumer, stake, price=price)
    held = chain.session(session_id)
    assert held.ends_at - held.opened_at == longest
    net.time_travel(longest + 1)
    ack = chain.sign_usage(consumer, session_id, held.ends_at)
    with pytest.raises(ChainError, match=r"NotProvider\(\)"):
        chain.claim_session(stranger, session_id, held.ends_at, ack)
    assert chain.claim_session(provider, session_id, held.ends_at, ack).value == (
        price * longest,
        price - 1,
    )
    chain.deregister_provider(provider)


def test_life_long_totals_wrap_rather_than_stop_the_market(net: Embedded) -> None:
    """A token of vast supply, escrowed again and again, takes totalEscrowed past 2^256:
    checked, that sum reverted every openSession from then on."""
    chain = net.chain
    price = 2**232  # 2^255 buys 2^23 s, within the longest session
    provider, bid = _provider(net, price=price)
    whale = net.accounts[4]
    chain.mint(net.accounts[0], whale.address, 2**255)
    escrowed0, paid0, refunded0 = chain.totals()
    moved = 0
    for _ in range(3):
        stake = min(chain.balance(whale.address), 2**255)
        session_id = _open(net, provider, bid, whale, stake, price=price)
        chain.close_session(whale, session_id)
        moved += stake
    assert moved > 2**256
    escrowed, paid, refunded = chain.totals()
    assert escrowed == (escrowed0 + moved) % 2**256
    assert (escrowed - escrowed0) % 2**256 == (paid - paid0 + refunded - refunded0) % 2**256
    assert chain.balance(chain.market.address) == MIN_PROVIDER_STAKE


async def test_a_node_refuses_a_marketplace_without_acknowledged_time(net: Embedded) -> None:
    # A node pointed at an older deployment would see every claim revert.
    await check_contract(AsyncChain(net.chain))
    elsewhere = replace(net.chain.deployment, marketplace=net.chain.deployment.token)
    with pytest.raises(ChainError, match="redeploy"):
        await check_contract(AsyncChain(Chain(net.chain.w3, elsewhere)))


# --- following the chain: its events, its clock ---------------------------------------


def test_events_since_name_closed_sessions_and_changed_bids(net: Embedded) -> None:
    chain = net.chain
    start = chain.block_number() + 1
    assert chain.events_since(start) == (MarketEvents(), start)  # no block yet
    provider, bid = _provider(net)
    changed, after = chain.events_since(start)
    assert changed == MarketEvents(bidders=frozenset({provider.address}))
    consumer = net.accounts[2]
    session_id = _open(net, provider, bid, consumer, 10 * PRICE)
    chain.close_session(consumer, session_id)
    chain.delete_bid(provider, bid)
    changed, later = chain.events_since(after)
    assert changed == MarketEvents(closed=(session_id,), withdrawn=frozenset({bid}))
    # At most max_blocks blocks a call (a gap after an outage is caught up in steps).
    first, step = chain.events_since(start, max_blocks=1)
    assert step == start + 1
    assert first == MarketEvents()  # the stake's approval: the token's event, not ours
    assert chain.events_since(later) == (MarketEvents(), later)


async def test_an_approval_lives_its_time_to_live_by_the_clock_of_the_next_block(
    net: Embedded,
) -> None:
    """Signed by the time the consumer's openSession will meet, however long the chain
    has been idle, or however far its clock was moved; never from further back than
    the wall clock minus MAX_CHAIN_LAG_S (a node that reports an old clock)."""
    chain = net.chain
    provider, bid = _provider(net)
    consumer = net.accounts[2]
    ledger = Ledger(None)
    market = ProviderMarket(Config(), Wallet(AsyncChain(chain), provider), ledger)
    ttl = market.cfg.approval_ttl_s

    def open_by(expiry: int) -> None:
        nonce = secrets.token_bytes(32)
        approval = chain.sign_approval(provider, bid, consumer.address, expiry, nonce)
        chain.open_session(consumer, bid, 10 * PRICE, PRICE, expiry, nonce, approval)

    net.time_travel(1000)  # a dev chain's clock moved forward
    await market.follow()
    expiry = market.approval_expiry()
    assert expiry >= chain.next_block_time() + ttl - 1
    net.time_travel(ttl - 5)  # the consumer took its time: still good
    open_by(expiry)
    net.time_travel(10)  # but not much longer
    with pytest.raises(ChainError, match=r"ApprovalExpired\("):
        open_by(expiry)
    # A node that reports an old clock: the approval starts from the wall clock minus
    # the bound, not from that clock.
    market.skew = -10_000.0
    before = time.time()
    expiry = market.approval_expiry()
    assert int(before) - MAX_CHAIN_LAG_S + ttl <= expiry <= time.time() - MAX_CHAIN_LAG_S + ttl
    ledger.close()
