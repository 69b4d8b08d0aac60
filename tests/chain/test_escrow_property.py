"""Stateful property test: random sequences of provider registrations, model
declarations, bids, opens, closes and time travel on the embedded chain, checked
against a model of the market kept here.

After every step the contract holds exactly the stakes the model says; after
every open and close, the parties' balances and the contract's totals are exact
(escrowed = paid + refunded + the stakes still held); at the end, with every
session closed and every provider gone, each balance is, and the accounts hold
the token's whole supply, to the wei. Every session settles exactly by the
rules, read from the timestamps of the blocks that opened and closed it: its
consumer closing before the end pays price x elapsed; its provider claiming
with the consumer's acknowledgement is paid price x (min(usedUntil, end,
claim) - opened), and with none, or a forged one (another signer, another
session, another usedUntil: refused), nothing; after the end plus the claim
window anyone closes it, paying 0, and nobody may claim. Drawn on purpose: stakes
buying more than the longest session (once a silent uint64 wrap that stranded
them), prices up to 2^128, providers leaving and coming back (their old bids
stay dead), and a stranger squatting model names with GGUF hashes of its own.
"""

from __future__ import annotations

import itertools
import re
import secrets
from dataclasses import dataclass
from functools import cache

import pytest
from eth_account.signers.local import LocalAccount
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from web3.types import TxParams

from p2pnode.chain.client import CLAIM_WINDOW_S, Tx, model_key
from p2pnode.chain.embedded import MIN_PROVIDER_STAKE, Embedded, open_embedded
from p2pnode.errors import ChainError

PROVIDERS = (1, 2, 3)
CONSUMERS = (4, 5, 6)
STRANGER = 7
ACCOUNTS = (*PROVIDERS, *CONSUMERS, STRANGER)
NAMES = ("m", "popular")
GGUFS = (None, "aa" * 32, "bb" * 32)
WHALE = 2**220  # each consumer's extra tokens: room for any stake drawn below
LONGEST = 365 * 24 * 3600  # Marketplace.MAX_SESSION_SECONDS
MARGIN_S = 30  # the next block's time may run ahead of the last one's, with the wall clock
FAR_AHEAD_S = 50 * 365 * 24 * 3600  # the chain's clock, ahead of the wall clock (see _start)

PRICES = st.one_of(st.integers(1, 10**15), st.integers(1, 2**128))
SECONDS = st.one_of(st.integers(1, 500), st.just(LONGEST))
# 2^64 - 1 s at 1 per second once wrapped endsAt to openedAt - 1: closing reverted forever.
TOO_LONG = st.one_of(
    st.integers(LONGEST + 1, 2**64 - 1), st.just(2**64 - 1), st.integers(2**64, 2**80)
)


@dataclass(frozen=True, slots=True)
class Start:
    """The chain every example starts from (and reverts to), as it was read once."""

    net: Embedded
    snapshot: object
    balances: dict[int, int]
    in_market: int
    totals: tuple[int, int, int]


@cache
def _start() -> Start:
    """Whales, and allowances given once so that an open is one transaction; the
    chain's clock far ahead of the wall clock.

    eth-tester stamps a block with the wall clock, or its parent's time plus a
    second if that is later. Far ahead, every block is its parent plus a second:
    the chain's clock no longer depends on how fast this machine runs, so an
    example replays exactly (hypothesis replays to shrink, and a rule whose
    outcome followed the wall clock would make its data generation flaky)."""
    net = open_embedded()
    chain = net.chain
    net.time_travel(FAR_AHEAD_S)
    for who in CONSUMERS:
        chain.mint(net.accounts[0], net.accounts[who].address, WHALE)
    for who in ACCOUNTS:
        chain.approve_token(net.accounts[who], 1, unlimited=True)
    balances = {who: chain.balance(net.accounts[who].address) for who in ACCOUNTS}
    in_market = chain.balance(chain.market.address)
    return Start(net, net.tester.take_snapshot(), balances, in_market, chain.totals())


def _error(name: str, **args: int) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in args.items())
    return re.escape(f"{name}({shown})")


@dataclass(frozen=True, slots=True)
class Dead:
    """A bid that must never open a session again."""

    provider: int
    name: str
    withdrawn: bool  # deleted or replaced; if not, it died with its provider's registration


@dataclass(frozen=True, slots=True)
class Held:
    """An open session, as the model knows it."""

    consumer: int
    provider: int
    price: int
    stake: int
    opened_at: int
    ends_at: int


class Market(RuleBasedStateMachine):
    """The marketplace, modelled: who is registered, what is named, declared, bid, held."""

    def __init__(self) -> None:
        super().__init__()
        self.start = _start()
        self.net = self.start.net
        self.chain = self.net.chain
        self.base = self.start.totals
        self.balances = dict(self.start.balances)
        # Approval nonces counted, not random: a session's id follows from its
        # nonce, and the rules draw from the open sessions in id order, so a
        # random nonce made a replayed example draw differently (hypothesis:
        # FlakyStrategyDefinition, seen once in a CI run).
        self.nonces = itertools.count(1)
        self.in_market = self.start.in_market
        self.registered: set[int] = set()
        self.named: dict[str, int] = {}  # name -> who registered it first
        self.declared: dict[tuple[int, str], str | None] = {}
        self.bids: dict[tuple[int, str], tuple[bytes, int, str | None]] = {}  # id, price, gguf
        self.dead: dict[bytes, Dead] = {}
        self.open: dict[bytes, Held] = {}
        self.escrowed = self.paid = self.refunded = 0
        self.clock = self.chain.now()

    # --- helpers ---------------------------------------------------------------------

    def _account(self, who: int) -> LocalAccount:
        return self.net.accounts[who]

    def _address(self, who: int) -> str:
        return str(self.net.accounts[who].address)

    # Reads name a sender: without one, web3's eth-tester middleware asks the chain
    # for its accounts on every call (a third of a read's time).
    def _reader(self) -> TxParams:
        return {"from": self.net.accounts[STRANGER].address}

    def _balance(self, address: str) -> int:
        return int(self.chain.token.functions.balanceOf(address).call(self._reader()))

    def _totals(self) -> tuple[int, int, int]:
        f, reader = self.chain.market.functions, self._reader()
        return (
            int(f.totalEscrowed().call(reader)),
            int(f.totalPaid().call(reader)),
            int(f.totalRefunded().call(reader)),
        )

    def _check_balances(self, *whos: int) -> None:
        """The token balances of these accounts, and the contract's, are as modelled."""
        for who in whos:
            assert self._balance(self._address(who)) == self.balances[who]
        assert self._balance(self.chain.market.address) == self.in_market

    def _check_totals(self) -> None:
        """The contract's life-long totals (modulo 2^256) moved exactly as modelled."""
        moved = (self.escrowed, self.paid, self.refunded)
        expected = tuple((base + m) % 2**256 for base, m in zip(self.base, moved, strict=True))
        assert self._totals() == expected

    def _check_provider(self, who: int) -> None:
        _, stake, sessions, registered = self.chain.provider(self._address(who))
        busy = sum(h.provider == who for h in self.open.values())
        assert (registered, sessions) == (who in self.registered, busy)
        assert stake == (MIN_PROVIDER_STAKE if registered else 0)

    def _block_time(self, tx: Tx) -> int:
        """The timestamp of the block that mined ``tx``."""
        w3 = self.chain.w3
        number = w3.eth.get_transaction_receipt(tx.tx_hash)["blockNumber"]  # type: ignore[arg-type]
        return int(w3.eth.get_block(number)["timestamp"])

    def _move(self, source: int | None, to: int | None, amount: int) -> None:
        """``amount`` from one account to another (None: the market contract)."""
        for who, sign in ((source, -1), (to, 1)):
            if who is None:
                self.in_market += sign * amount
            else:
                self.balances[who] += sign * amount

    def _open(self, bid_id: bytes, provider: int, consumer: int, stake: int, price: int) -> Tx:
        expiry, nonce = self.clock + 600, next(self.nonces).to_bytes(32, "big")
        buyer = self._address(consumer)
        approval = self.chain.sign_approval(self._account(provider), bid_id, buyer, expiry, nonce)
        return self.chain.open_session(
            self._account(consumer), bid_id, stake, price, expiry, nonce, approval
        )

    def _close(self, session_id: bytes, closer: int) -> None:
        """Close without an acknowledgement: the consumer before the end pays elapsed
        time; from the end plus the claim window, anyone, paying 0."""
        held = self.open.pop(session_id)
        tx = self.chain.close_session(self._account(closer), session_id)
        closed_at = self._block_time(tx)
        if closed_at >= held.ends_at + CLAIM_WINDOW_S:
            paid = 0
        else:
            assert closer == held.consumer
            assert closed_at < held.ends_at
            paid = held.price * (closed_at - held.opened_at)
        assert tx.value == (paid, held.stake - paid)
        self._settled(held, paid, closed_at)

    def _claim(self, session_id: bytes, used_until: int, signature: bytes) -> None:
        """The provider claims with an acknowledgement the consumer signed (or none)."""
        held = self.open.pop(session_id)
        tx = self.chain.claim_session(
            self._account(held.provider), session_id, used_until, signature
        )
        claimed_at = self._block_time(tx)
        assert claimed_at < held.ends_at + CLAIM_WINDOW_S
        paid = held.price * max(0, min(used_until, held.ends_at, claimed_at) - held.opened_at)
        assert tx.value == (paid, held.stake - paid)
        self._settled(held, paid, claimed_at)

    def _settled(self, held: Held, paid: int, closed_at: int) -> None:
        self._move(None, held.provider, paid)
        self._move(None, held.consumer, held.stake - paid)
        self.paid += paid
        self.refunded += held.stake - paid
        self.clock = closed_at
        self._check_balances(held.provider, held.consumer)
        self._check_totals()

    # --- providers ---------------------------------------------------------------------

    @initialize(who=st.sampled_from(PROVIDERS), gguf=st.sampled_from(GGUFS), price=PRICES)
    def a_first_bid(self, who: int, gguf: str | None, price: int) -> None:
        """Sessions from the first step: one provider has a bid."""
        self._register(who)
        self.declare(who, NAMES[0], gguf)
        self._post_bid(who, NAMES[0], price)

    @precondition(lambda self: len(self.registered) < len(PROVIDERS))
    @rule(data=st.data())
    def register(self, data: st.DataObject) -> None:
        self._register(data.draw(st.sampled_from(sorted(set(PROVIDERS) - self.registered))))

    def _register(self, who: int) -> None:
        self.chain.register_provider(self._account(who), f"12D3KooWpeer{who}", MIN_PROVIDER_STAKE)
        self._move(who, None, MIN_PROVIDER_STAKE)
        self.registered.add(who)
        # Coming back brings no bid back.
        for name in {d.name for d in self.dead.values() if d.provider == who and not d.withdrawn}:
            assert self.chain.live_bid(self._address(who), name) is None

    @precondition(lambda self: self.registered)
    @rule(data=st.data())
    def deregister(self, data: st.DataObject) -> None:
        who = data.draw(st.sampled_from(sorted(self.registered)))
        busy = sum(held.provider == who for held in self.open.values())
        if busy:
            with pytest.raises(ChainError, match=_error("SessionsOpen", count=busy)):
                self.chain.deregister_provider(self._account(who))
        else:
            self.chain.deregister_provider(self._account(who))
            self._move(None, who, MIN_PROVIDER_STAKE)
            self.registered.discard(who)
            for key in [key for key in self.bids if key[0] == who]:
                self.dead[self.bids.pop(key)[0]] = Dead(who, key[1], withdrawn=False)
        self._check_provider(who)

    # --- models and bids ---------------------------------------------------------------

    @rule(
        who=st.sampled_from((*PROVIDERS, STRANGER)),
        name=st.sampled_from(NAMES),
        gguf=st.sampled_from(GGUFS),
    )
    def declare(self, who: int, name: str, gguf: str | None) -> None:
        """Anyone names a model and declares a file: a squat, when the stranger is first."""
        self.chain.register_model(self._account(who), name, gguf)
        self.named.setdefault(name, who)
        self.declared[(who, name)] = gguf
        record = self.chain.market.functions.getModel(model_key(name)).call()
        assert tuple(record) == (name, self._address(self.named[name]))
        assert self.chain.declared_gguf(self._address(who), name) == gguf

    @precondition(lambda self: self.registered)
    @rule(data=st.data(), name=st.sampled_from(NAMES), price=PRICES)
    def bid(self, data: st.DataObject, name: str, price: int) -> None:
        who = data.draw(st.sampled_from(sorted(self.registered)))
        if name in self.named:
            self._post_bid(who, name, price)
        else:
            with pytest.raises(ChainError, match=_error("UnknownModel")):
                self.chain.post_bid(self._account(who), name, price)

    def _post_bid(self, who: int, name: str, price: int) -> None:
        gguf = self.declared.get((who, name))
        before = self.bids.get((who, name))
        bid_id = self.chain.post_bid(self._account(who), name, price).value
        if before is not None and before[2] == gguf:
            assert bid_id == before[0]  # a re-price
        else:
            assert before is None or bid_id != before[0]
            if before is not None:
                self.dead[before[0]] = Dead(who, name, withdrawn=True)
        self.bids[(who, name)] = (bid_id, price, gguf)
        # The bid carries its provider's own declaration, whoever named the model.
        on_chain = self.chain.bid(bid_id)
        assert (on_chain.price_per_s, on_chain.gguf_sha256, on_chain.live) == (price, gguf, True)

    @precondition(lambda self: self.bids)
    @rule(data=st.data())
    def delete_bid(self, data: st.DataObject) -> None:
        who, name = data.draw(st.sampled_from(sorted(self.bids)))
        bid_id = self.bids.pop((who, name))[0]
        self.chain.delete_bid(self._account(who), bid_id)
        self.dead[bid_id] = Dead(who, name, withdrawn=True)

    # --- sessions ----------------------------------------------------------------------

    @precondition(lambda self: self.bids)
    @rule(
        data=st.data(),
        consumer=st.sampled_from(CONSUMERS),
        seconds=SECONDS,
        odd=st.integers(0, 2**128),
    )
    def open_session(self, data: st.DataObject, consumer: int, seconds: int, odd: int) -> None:
        who, name = data.draw(st.sampled_from(sorted(self.bids)))
        bid_id, price, _ = self.bids[(who, name)]
        stake = price * seconds + odd % price  # not always a whole number of seconds
        tx = self._open(bid_id, who, consumer, stake, price)
        session_id, ends_at = tx.value
        opened_at = self._block_time(tx)
        assert ends_at == opened_at + seconds
        on_chain = self.chain.session(session_id)
        assert (on_chain.opened_at, on_chain.ends_at, on_chain.stake) == (opened_at, ends_at, stake)
        assert on_chain.price_per_s == price
        self.open[session_id] = Held(consumer, who, price, stake, opened_at, ends_at)
        self._move(consumer, None, stake)
        self.escrowed += stake
        self.clock = opened_at
        self._check_balances(consumer, who)
        self._check_totals()

    @precondition(lambda self: self.bids)
    @rule(data=st.data(), consumer=st.sampled_from(CONSUMERS), seconds=TOO_LONG)
    def open_too_long(self, data: st.DataObject, consumer: int, seconds: int) -> None:
        who, name = data.draw(st.sampled_from(sorted(self.bids)))
        bid_id, price, _ = self.bids[(who, name)]
        too_long = _error("SessionTooLong", duration=seconds, maximum=LONGEST)
        with pytest.raises(ChainError, match=too_long):
            self._open(bid_id, who, consumer, price * seconds, price)

    @precondition(lambda self: self.dead)
    @rule(data=st.data(), consumer=st.sampled_from(CONSUMERS))
    def open_on_a_dead_bid(self, data: st.DataObject, consumer: int) -> None:
        """With a fresh approval from its provider: only the bid's death stops it."""
        bid_id = data.draw(st.sampled_from(sorted(self.dead)))
        dead = self.dead[bid_id]
        left = dead.provider not in self.registered
        error = "NotRegistered" if left and not dead.withdrawn else "BidNotLive"
        with pytest.raises(ChainError, match=_error(error)):
            self._open(bid_id, dead.provider, consumer, 10**30, 2**128)
        assert not self.chain.bid(bid_id).live

    # The chain's clock follows the wall clock, which differs when hypothesis
    # replays an example: what a rule draws, and its preconditions, must not depend
    # on it (or the data generation is flaky). Rules draw first, then look at the
    # clock (through _window) to know what to expect.

    def _window(self, held: Held) -> str:
        """Where the next block falls for a session: "running" (before its end),
        "claims" (its provider's claim window), "over" (after it), or "near" (too close
        to a boundary to tell: the next block's time runs ahead of the last one's)."""
        closable_at = held.ends_at + CLAIM_WINDOW_S
        if self.clock >= closable_at:
            return "over"
        if self.clock + MARGIN_S < held.ends_at:
            return "running"
        if held.ends_at <= self.clock and self.clock + MARGIN_S < closable_at:
            return "claims"
        return "near"

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def consumer_closes(self, data: st.DataObject) -> None:
        """The consumer closes before the end (paying elapsed time), or after the window
        (paying 0); in between, the session is its provider's to claim."""
        session_id = data.draw(st.sampled_from(sorted(self.open)))
        held = self.open[session_id]
        window = self._window(held)
        event(f"consumer closes: {window}")
        if window in ("running", "over"):
            self._close(session_id, held.consumer)
        elif window == "claims":
            closable = _error("NotClosableYet", closableAt=held.ends_at + CLAIM_WINDOW_S)
            with pytest.raises(ChainError, match=closable):
                self.chain.close_session(self._account(held.consumer), session_id)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def provider_closes(self, data: st.DataObject) -> None:
        """A provider's close would pay it nothing: refused until the window is over."""
        session_id = data.draw(st.sampled_from(sorted(self.open)))
        held = self.open[session_id]
        window = self._window(held)
        event(f"provider closes: {window}")
        if window == "over":
            self._close(session_id, held.provider)
        elif window != "near":
            with pytest.raises(ChainError, match=_error("ProviderMustClaim")):
                self.chain.close_session(self._account(held.provider), session_id)

    @precondition(lambda self: self.open)
    @rule(
        data=st.data(),
        used=st.one_of(st.integers(-5, 600), st.just(LONGEST + 10)),
        ack=st.sampled_from(("signed", "none", "other signer", "other session", "other time")),
    )
    def provider_claims(self, data: st.DataObject, used: int, ack: str) -> None:
        """The provider claims with the consumer's acknowledgement of ``used`` seconds
        (or none, or a forged one), inside the window or after it."""
        session_id = data.draw(st.sampled_from(sorted(self.open)))
        held = self.open[session_id]
        signer = data.draw(st.sampled_from((held.provider, STRANGER)))
        others = [sid for sid in sorted(self.open) if sid != session_id]
        other = data.draw(st.sampled_from([*others, secrets.token_bytes(32)]))
        window = self._window(held)
        event(f"provider claims: {window}, {ack}")
        if window == "near":
            return
        used_until = max(0, held.opened_at + used)
        consumer, provider = self._account(held.consumer), self._account(held.provider)
        if ack == "none":
            used_until, signature = 0, b""
        elif ack == "signed":
            signature = self.chain.sign_usage(consumer, session_id, used_until)
        elif ack == "other signer":
            signature = self.chain.sign_usage(self._account(signer), session_id, used_until)
        elif ack == "other session":
            signature = self.chain.sign_usage(consumer, other, used_until)
        else:  # signed for a second less than claimed
            signature = self.chain.sign_usage(consumer, session_id, used_until - 1)
        if window == "over":
            closed_at = _error("ClaimWindowClosed", closedAt=held.ends_at + CLAIM_WINDOW_S)
            with pytest.raises(ChainError, match=closed_at):
                self.chain.claim_session(provider, session_id, used_until, signature)
        elif ack in ("signed", "none") or used_until <= held.opened_at:
            # Nothing acknowledged after the open needs no signature; anything else
            # needs the consumer's, for this session and this usedUntil.
            self._claim(session_id, used_until, signature)
        else:
            with pytest.raises(ChainError, match=_error("BadUsage")):
                self.chain.claim_session(provider, session_id, used_until, signature)
        stranger = self._account(STRANGER)
        if session_id in self.open and window != "over":
            with pytest.raises(ChainError, match=_error("NotProvider")):
                self.chain.claim_session(stranger, session_id, used_until, signature)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def stranger_closes_after_the_window(self, data: st.DataObject) -> None:
        """Anyone may close a session whose claim window is over (the clock moves there
        first): its provider did not claim it, and is paid 0."""
        session_id = data.draw(st.sampled_from(sorted(self.open)))
        closable_at = self.open[session_id].ends_at + CLAIM_WINDOW_S
        if closable_at > self.clock:
            self.time_travel(closable_at - self.clock)
        self._close(session_id, STRANGER)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def stranger_closes_too_early(self, data: st.DataObject) -> None:
        session_id = data.draw(st.sampled_from(sorted(self.open)))
        closable_at = self.open[session_id].ends_at + CLAIM_WINDOW_S
        if closable_at <= self.clock + MARGIN_S:
            return  # not early enough to be sure (the clock is not drawn: see _window)
        with pytest.raises(ChainError, match=_error("NotClosableYet", closableAt=closable_at)):
            self.chain.close_session(self._account(STRANGER), session_id)

    @rule(seconds=st.one_of(st.integers(1, 400), st.just(CLAIM_WINDOW_S), st.just(LONGEST + 1)))
    def time_travel(self, seconds: int) -> None:
        self.net.time_travel(seconds)
        self.clock = self.chain.now()

    # --- the books ---------------------------------------------------------------------

    @invariant()
    def books_balance(self) -> None:
        """The contract holds exactly the providers' stakes and the sessions' stakes.

        Opening and closing check more (the parties' balances, and the totals:
        escrowed = paid + refunded + the stakes held); the end checks everything."""
        held = sum(h.stake for h in self.open.values())
        assert self.escrowed == self.paid + self.refunded + held
        assert self.in_market == len(self.registered) * MIN_PROVIDER_STAKE + held
        assert self._balance(self.chain.market.address) == self.in_market
        self.clock = self.chain.now()

    def teardown(self) -> None:
        """Nothing stays locked: every other session still open is claimed by its
        provider with an acknowledgement of a few seconds (if its window is open),
        the rest end, anyone closes them (paying 0), every provider leaves."""
        try:
            for n, session_id in enumerate(sorted(self.open)):
                opened = self.open[session_id]
                if n % 2 == 0 and self._window(opened) in ("running", "claims"):
                    used_until = opened.opened_at + 7
                    ack = self.chain.sign_usage(
                        self._account(opened.consumer), session_id, used_until
                    )
                    self._claim(session_id, used_until, ack)
            self.net.time_travel(LONGEST + CLAIM_WINDOW_S + 1)
            self.clock = self.chain.now()
            for session_id in sorted(self.open):
                self._close(session_id, STRANGER)
            for who in sorted(self.registered):
                self.chain.deregister_provider(self._account(who))
                self._move(None, who, MIN_PROVIDER_STAKE)
            self.registered.clear()
            for who in PROVIDERS:
                self._check_provider(who)
            held = [self._balance(str(a.address)) for a in self.net.accounts]
            assert {who: held[who] for who in ACCOUNTS} == self.balances
            assert self._balance(self.chain.market.address) == self.in_market == 0
            # The accounts hold the token's whole supply, to the wei.
            assert sum(held) == int(self.chain.token.functions.totalSupply().call())
            self._check_totals()
            assert self.escrowed == self.paid + self.refunded
        finally:
            self.net.tester.revert_to_snapshot(self.start.snapshot)


Market.TestCase.settings = settings(
    max_examples=20,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEscrow = Market.TestCase
