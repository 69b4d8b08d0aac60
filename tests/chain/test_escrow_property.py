"""Stateful property test: random register/bid/open/close/time-travel sequences on the
embedded chain keep escrowed = paid + refunded + open stakes, and leave nothing locked."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from p2pnode.chain.embedded import MIN_PROVIDER_STAKE, Embedded, open_embedded
from p2pnode.errors import ChainError

_CHAIN: Embedded | None = None
PROVIDERS = (1, 2, 3)
CONSUMERS = (4, 5, 6)
STRANGER = 7


def _embedded() -> Embedded:
    global _CHAIN
    if _CHAIN is None:
        _CHAIN = open_embedded()
    return _CHAIN


class Market(RuleBasedStateMachine):
    sessions = Bundle("sessions")

    @initialize()
    def start(self) -> None:
        self.net = _embedded()
        self.snapshot = self.net.tester.take_snapshot()
        self.chain = self.net.chain
        self.registered: set[int] = set()
        self.bids: dict[int, bytes] = {}
        self.open: dict[bytes, int] = {}  # session id -> stake
        self.base = self.chain.totals()
        self.closed_paid = 0
        self.closed_refunded = 0

    @rule(who=st.sampled_from(PROVIDERS))
    def register(self, who: int) -> None:
        account = self.net.accounts[who]
        if who in self.registered:
            return
        self.chain.register_provider(account, f"12D3KooWpeer{who}", MIN_PROVIDER_STAKE)
        if not self.chain.model_registered("m"):
            self.chain.register_model(account, "m", None)
        self.registered.add(who)

    @rule(who=st.sampled_from(PROVIDERS), price=st.integers(1, 10**15))
    def bid(self, who: int, price: int) -> None:
        if who in self.registered:
            self.bids[who] = self.chain.post_bid(self.net.accounts[who], "m", price).value

    @rule(
        target=sessions,
        who=st.sampled_from(PROVIDERS),
        consumer=st.sampled_from(CONSUMERS),
        seconds=st.integers(1, 500),
    )
    def open_session(self, who: int, consumer: int, seconds: int) -> bytes:
        if who not in self.registered or who not in self.bids:
            return b""
        bid = self.bids[who]
        price = self.chain.bid(bid).price_per_s
        stake = price * seconds + (seconds % 7)  # not always a whole number of seconds
        expiry, nonce = self.chain.now() + 60, secrets.token_bytes(32)
        provider = self.net.accounts[who]
        buyer = self.net.accounts[consumer]
        approval = self.chain.sign_approval(provider, bid, buyer.address, expiry, nonce)
        session_id = self.chain.open_session(
            buyer, bid, stake, price, expiry, nonce, approval
        ).value[0]
        self.open[session_id] = stake
        return session_id

    @rule(session_id=sessions, by=st.sampled_from(("consumer", "provider", "stranger")))
    def close(self, session_id: bytes, by: str) -> None:
        if session_id not in self.open:
            return
        held = self.chain.session(session_id)
        closer = {
            "consumer": held.consumer,
            "provider": held.provider,
            "stranger": self.net.accounts[STRANGER].address,
        }[by]
        account = next(a for a in self.net.accounts if a.address == closer)
        # The next block's time is at least now + 1: a stranger may close from endsAt on.
        if by == "stranger" and self.chain.now() + 1 < held.ends_at:
            with pytest.raises(ChainError, match="NotYetEnded"):
                self.chain.close_session(account, session_id)
            return
        paid, refunded = self.chain.close_session(account, session_id).value
        assert paid + refunded == self.open.pop(session_id)
        assert paid <= held.price_per_s * (held.ends_at - held.opened_at)
        self.closed_paid += paid
        self.closed_refunded += refunded

    @rule(seconds=st.integers(1, 400))
    def time_travel(self, seconds: int) -> None:
        self.net.time_travel(seconds)

    @rule(who=st.sampled_from(PROVIDERS))
    def deregister(self, who: int) -> None:
        if who not in self.registered:
            return
        busy = self.chain.provider(self.net.accounts[who].address)[2]
        if busy:
            with pytest.raises(ChainError, match="SessionsOpen"):
                self.chain.deregister_provider(self.net.accounts[who])
            return
        self.chain.deregister_provider(self.net.accounts[who])
        self.registered.discard(who)
        self.bids.pop(who, None)

    @invariant()
    def escrow_balances(self) -> None:
        if not hasattr(self, "chain"):
            return
        escrowed, paid, refunded = self.chain.totals()
        e0, p0, r0 = self.base
        assert escrowed - e0 == (paid - p0) + (refunded - r0) + sum(self.open.values())
        assert (paid - p0, refunded - r0) == (self.closed_paid, self.closed_refunded)
        stakes = sum(self.chain.provider(self.net.accounts[w].address)[1] for w in PROVIDERS)
        held = self.chain.balance(self.chain.market.address)
        assert held == stakes + sum(self.open.values())

    def teardown(self) -> None:
        """Nothing stays locked: every session ends, anyone closes it, every provider leaves."""
        if not hasattr(self, "chain"):
            return
        try:
            self.net.time_travel(10_000)
            stranger = self.net.accounts[STRANGER]
            for session_id in list(self.open):
                self.chain.close_session(stranger, session_id)
                del self.open[session_id]
            for who in list(self.registered):
                self.chain.deregister_provider(self.net.accounts[who])
            assert self.chain.balance(self.chain.market.address) == 0
            escrowed, paid, refunded = self.chain.totals()
            assert escrowed == paid + refunded
        finally:
            self.net.tester.revert_to_snapshot(self.snapshot)


Market.TestCase.settings = settings(
    max_examples=10,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEscrow = Market.TestCase
