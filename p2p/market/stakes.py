"""The consumer's side of paid sessions: stakes, approvals of spending, acknowledgements, closes."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import trio
from eth_account import Account
from eth_account.messages import encode_defunct

from p2pnode.chain.client import CLAIM_WINDOW_S, Tx, model_key
from p2pnode.chain.units import format_price
from p2pnode.errors import ChainError, FundsError
from p2pnode.p2p import pricing
from p2pnode.p2p.market.config import Config, OfferMismatch, Wallet, settling_time
from p2pnode.p2p.market.ledger import Ledger
from p2pnode.protocols.offers import ModelOffer, Offer
from p2pnode.protocols.session import Approve, Hello, approval_nonce

logger = logging.getLogger(__name__)


@dataclass
class StakeCounters:
    """A consumer's stakes: opened, closed, and where the tokens went."""

    opened: int = 0
    closed: int = 0
    paid_wei: int = 0
    refunded_wei: int = 0
    left_unserved: int = 0  # taken by a provider that never served: left to close at 0
    escrowed_wei: int = 0  # the stakes of the sessions it opened
    gas_used: int = 0  # of its opens and closes
    closed_elsewhere: int = 0  # closed by the provider's claim, or another process


@dataclass
class Paid:
    """A session this consumer paid for."""

    session_id: bytes
    peer: str
    stake: int
    ends_at: int
    last_used: float
    # Requests running in it now: a session is not idle while one streams.
    active: int = 0
    # The chain time of its open, and our trio clock then: what used_until counts
    # from (None: left from before a restart, its clock reading is gone).
    opened_at: int = 0
    opened_clock: float | None = None
    # An answer in it was acknowledged: closing it before its end pays the seconds
    # used. One never served is not closed early (that would pay the provider for
    # nothing), but left until its end plus the claim window.
    served: bool = False
    # The latest used_until this consumer signed (acknowledgements never go back).
    used_until: int = 0
    # No longer used (idle, failed, ended, stopping): settled as soon as the rules allow.
    released: bool = False
    told_wait: bool = False  # its wait for the claim window was logged


class Reservation:
    """A stake held against the spend limit while its session is opened (a context
    manager: leaving it lets go of the hold; an opened session holds its own)."""

    def __init__(self, market: ConsumerMarket, stake: int) -> None:
        self.stake = stake
        self._market: ConsumerMarket | None = market
        market.reserved += stake

    def release(self) -> None:
        """Let go of the hold (once: later calls do nothing)."""
        if self._market is not None:
            self._market.reserved -= self.stake
            self._market = None

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


@dataclass
class ConsumerMarket:
    """A consumer's stakes: what it opens, what it may spend, what it acknowledges,
    what it closes, and when."""

    cfg: Config
    wallet: Wallet
    ledger: Ledger
    # Every session whose stake is escrowed, in use or waiting to be settled.
    open: dict[bytes, Paid] = field(default_factory=dict)
    # Stakes of sessions being opened (handshake and chain open under way): they
    # count against the spend limit from the moment they are chosen, so opens
    # running at once (other models, other providers) cannot exceed it together.
    reserved: int = 0
    counters: StakeCounters = field(default_factory=lambda: StakeCounters())
    open_ms: list[float] = field(default_factory=list)
    gas: dict[str, list[int]] = field(default_factory=lambda: {"open": [], "close": []})

    @property
    def address(self) -> str:
        return self.wallet.address

    def terms(self, offer: Offer, model_id: str) -> ModelOffer | None:
        """The offer's terms if this consumer would pay them (a bid, a price within limits)."""
        return pricing.acceptable(offer, model_id, self.cfg.max_price_per_s)

    def why_not(self, offers: list[Offer], model_id: str) -> str:
        """Why none of ``offers`` would be paid for ("" when one would): no live bid,
        or every bid above ``max_price_per_s``."""
        if any(self.terms(offer, model_id) is not None for offer in offers):
            return ""
        # The prices of live bids (any price: we look for the cheapest above the limit).
        prices = [
            terms.price_per_s
            for offer in offers
            if (terms := pricing.bid_terms(offer, model_id)) is not None
        ]
        limit = f"--max-price {format_price(self.cfg.max_price_per_s)}"
        if not prices:
            none = "none has" if len(offers) > 1 else "it has no"
            return f"{none} live bid on chain for this model"
        above = f"the cheapest bid, {format_price(min(prices))}, is above {limit}"
        unbid = len(offers) - len(prices)
        return f"{above}" + (f" ({unbid} more with no live bid on chain)" if unbid else "")

    async def check_funds(self, stake: int) -> None:
        """Before a session is opened: the wallet holds the stake and some ether for gas.

        A wallet with no ether or no tokens at all raises :class:`FundsError`
        naming it and what it lacks: no provider could be paid, so the request
        stops there. One that holds some tokens, but fewer than this provider's
        stake, raises ChainError: a cheaper provider may still be paid (and a
        provider cannot end every request by asking a stake above the wallet's).
        """
        chain = self.wallet.chain
        tokens = await chain.balance(self.address)
        ether = await chain.eth_balance(self.address)
        if tokens >= stake and ether > 0:
            return
        needed = None if tokens >= stake else stake  # None: it lacks ether for gas
        unfunded = await chain.unfunded(self.address, "opening a session", tokens_needed=needed)
        if ether == 0 or tokens == 0:
            raise FundsError(str(unfunded))
        raise ChainError(str(unfunded))

    def held(self) -> int:
        """What this consumer has escrowed: its sessions in use and those waiting to be
        settled (a stake is spent until it is back), and the stakes of opens under way."""
        return sum(p.stake for p in self.open.values()) + self.reserved

    def stake_for(self, price_per_s: int) -> int:
        """The stake for one session at this price, or 0 if the spend limit is reached."""
        cfg = self.cfg
        return pricing.stake_for(price_per_s, cfg.session_seconds, cfg.spend_limit, self.held())

    def reserve(self, price_per_s: int) -> Reservation:
        """Choose the stake of a session about to be opened and hold it against the
        spend limit until the open ends (then it is in :attr:`open`, or free again).

        Its ``stake`` is 0 when the limit is reached (nothing is held then).
        """
        return Reservation(self, self.stake_for(price_per_s))

    def prepare_hello(self, hello: Hello, peer: str, terms: ModelOffer, stake: int) -> Hello:
        """Hello with the provider ``peer``, the bid, our wallet and the duration, signed by
        the wallet."""
        filled = replace(
            hello,
            provider=peer,
            bid_id=terms.bid_id,
            consumer_wallet=self.address,
            duration_s=stake // terms.price_per_s,
        )
        signed = Account.sign_message(
            encode_defunct(primitive=filled.signing_bytes()), self.wallet.account.key
        )
        return replace(filled, signature=bytes(signed.signature))

    async def check_bid(self, offer: Offer, terms: ModelOffer) -> None:
        """Before paying: the bid the offer names is live, the offer's wallet's, for this
        model, at this price, and for the GGUF file the offer announces.

        Raises :class:`OfferMismatch` (the provider's offer lied) or ChainError.
        """
        chain = self.wallet.chain
        assert terms.bid_id is not None
        bid = await chain.bid(bytes.fromhex(terms.bid_id))
        wrong = (
            "not live"
            if not bid.live
            else "another wallet's"
            if offer.wallet is None or offer.wallet.lower() != bid.provider.lower()
            else "for another model"
            if bid.model != model_key(terms.model_id)
            else "at another price"
            if bid.price_per_s != terms.price_per_s
            else "for another GGUF file"
            if bid.gguf_sha256 and terms.gguf_sha256 and bid.gguf_sha256 != terms.gguf_sha256
            else None
        )
        if wrong is not None:
            stale = wrong == "at another price"
            raise OfferMismatch(f"the bid its offer names is {wrong}", stale=stale)

    async def open_session(
        self, peer: str, hello: Hello, approve: Approve, terms: ModelOffer, stake: int
    ) -> bytes:
        """Open the session on chain with the provider's approval (transaction 1 of 2)."""
        chain = self.wallet.chain
        assert terms.bid_id is not None
        started = trio.current_time()
        tx: Tx = await chain.open_session(
            self.wallet.account,
            bytes.fromhex(terms.bid_id),
            stake,
            terms.price_per_s,
            approve.expiry,
            approval_nonce(hello.nonce, approve.nonce),
            approve.approval,
        )
        session_id, ends_at = bytes(tx.value[0]), int(tx.value[1])
        now = trio.current_time()
        # The contract sets endsAt = openedAt + stake / price: the open's own block
        # time, with no read (the provider counts from the same chain time).
        opened_at = ends_at - stake // terms.price_per_s
        self.open[session_id] = Paid(
            session_id, peer, stake, ends_at, now, opened_at=opened_at, opened_clock=now
        )
        self.ledger.opened(
            "consumer", peer, session_id, bytes.fromhex(terms.bid_id), stake, ends_at
        )
        self.counters.opened += 1
        self.counters.escrowed_wei += stake
        self.counters.gas_used += tx.gas_used
        self.gas["open"].append(tx.gas_used)
        self.open_ms.append((now - started) * 1000)
        return session_id

    def usable(self, session_id: bytes) -> bool:
        """Whether new requests may go to the session (escrowed, not released)."""
        paid = self.open.get(session_id)
        return paid is not None and not paid.released

    def begin(self, session_id: bytes) -> None:
        """A request starts in the session: it is in use until :meth:`end`."""
        paid = self.open.get(session_id)
        if paid is not None:
            paid.active += 1
            paid.last_used = trio.current_time()

    def end(self, session_id: bytes) -> None:
        """A request in the session ended; the idle time counts from now."""
        paid = self.open.get(session_id)
        if paid is not None:
            paid.active = max(0, paid.active - 1)
            paid.last_used = trio.current_time()

    def _session_time(self, paid: Paid) -> float | None:
        """The session's chain time now, as counted from its open (see the module doc)."""
        if paid.opened_clock is None:
            return None
        return paid.opened_at + (trio.current_time() - paid.opened_clock)

    def acknowledge(self, session_id: bytes) -> tuple[int, bytes]:
        """Acknowledge an answer: (used_until, the wallet's EIP-712 ``Usage`` signature).

        used_until is the session's chain time now, rounded up, and never behind
        an earlier acknowledgement. The session counts as served from now on
        (closing it early pays the elapsed time). Local work: no RPC.
        """
        paid = self.open.get(session_id)
        reckoned = self._session_time(paid) if paid is not None else None
        if paid is None or reckoned is None:
            return 0, b""
        paid.used_until = max(paid.used_until, math.ceil(reckoned))
        chain = self.wallet.chain.sync
        signature = chain.sign_usage(self.wallet.account, session_id, paid.used_until)
        if not paid.served:
            paid.served = True
            self.ledger.served(session_id)
        return paid.used_until, signature

    async def release(self, session_id: bytes) -> None:
        """Stop using the session, and settle it as soon as the rules allow.

        Served: closed now (before its end the provider is paid the elapsed
        seconds; after it, the provider claims what was acknowledged). Never
        served: not closed early, which would pay the provider for nothing, but
        left open until its end plus the claim window, then closed paying 0
        (or refunded sooner, if its provider claims it). No chain call for
        those: a failing handshake stays quick.
        """
        paid = self.open.get(session_id)
        if paid is None:
            return
        if not paid.released:
            paid.released = True
            if not paid.served:
                self.counters.left_unserved += 1
        if paid.served:
            await self._settle(paid, None)
        else:
            self._tell_wait(paid)

    def _tell_wait(self, paid: Paid) -> None:
        if paid.told_wait:
            return
        paid.told_wait = True
        back = paid.ends_at + CLAIM_WINDOW_S
        logger.info(
            "session %s with %s: %s; its stake of %d is left in escrow and comes back by "
            "chain time %d (%s UTC: its end plus the claim window), or sooner if the "
            "provider settles it",
            paid.session_id.hex()[:8], paid.peer[-8:],
            "served, ended: its provider claims it" if paid.served else "never served",
            paid.stake, back, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(back)),
        )  # fmt: skip

    async def _settle(self, paid: Paid, now: int | None) -> None:
        """Close a released session if the rules allow it now; else leave it for later.

        Closable by us: served and before its end (the elapsed seconds are paid),
        or from its end plus the claim window on (paying 0 if its provider did not
        claim it). A session its provider already settled is only recorded.
        """
        chain = self.wallet.chain
        session_id = paid.session_id
        try:
            s = await chain.session(session_id)
            if not s.open:  # its provider claimed it (or we closed it by hand)
                self.open.pop(session_id, None)
                self.ledger.closed(session_id, 0, 0)
                self.counters.closed_elsewhere += 1
                return
            if now is None:
                now = await settling_time(chain)
            # Early, the consumer pays the elapsed seconds; once the session has run
            # out (by the chain, or by our own count while the chain's clock lags
            # between blocks) its provider claims what was acknowledged, which is less.
            reckoned = self._session_time(paid)
            early = paid.served and now < s.ends_at and (reckoned is None or reckoned < s.ends_at)
            if not early and now < s.ends_at + CLAIM_WINDOW_S:
                self._tell_wait(paid)
                return
            tx: Tx = await chain.close_session(self.wallet.account, session_id)
        except ChainError as exc:
            # Still escrowed: it stays counted against the spend limit, and the
            # ledger lists it for the next try (the run loop, stop, restart).
            logger.warning("cannot close session %s: %s", session_id.hex()[:8], exc)
            return
        self.open.pop(session_id, None)
        paid_wei, refunded = tx.value
        self.ledger.closed(session_id, paid_wei, refunded)
        self.counters.closed += 1
        self.counters.paid_wei += paid_wei
        self.counters.refunded_wei += refunded
        self.gas["close"].append(tx.gas_used)
        self.counters.gas_used += tx.gas_used
        logger.info(
            "closed session %s: paid %d, refunded %d", session_id.hex()[:8], paid_wei, refunded
        )

    async def close(self, session_id: bytes) -> None:
        """Release the session now (:meth:`release`): closed at once if it was served
        (transaction 2 of 2), else when the claim window allows."""
        await self.release(session_id)

    def _adopt_left(self) -> None:
        """Sessions ``sessions.db`` lists as open that this run did not open (left from
        before a restart): escrowed still, so counted against the spend limit, and
        released (their keys are gone with the old run)."""
        for row in self.ledger.open_sessions("consumer"):
            if row.session_id not in self.open:
                self.open[row.session_id] = Paid(
                    row.session_id, row.peer, row.stake, row.ends_at, trio.current_time(),
                    served=row.served, released=True,
                )  # fmt: skip

    async def close_all(self) -> None:
        """Settle every session this node holds, including any left from before a
        restart: served ones are closed now, the others once the claim window has
        passed (each left one is logged with when its stake comes back)."""
        self._adopt_left()
        await self._settle_released(release_all=True)

    async def _settle_released(self, *, release_all: bool) -> None:
        if not any(release_all or p.released for p in self.open.values()):
            return  # nothing waits: no chain call
        try:
            now: int | None = await settling_time(self.wallet.chain)
        except ChainError as exc:
            logger.warning("cannot read the chain's time: %s", exc)
            now = None
        for paid in list(self.open.values()):
            if release_all:
                paid.released = True
            if paid.released:
                await self._settle(paid, now)

    async def prepare(self) -> None:
        """At start: one unlimited token approval (so each session is one transaction)."""
        chain = self.wallet.chain
        await chain.approve_token(self.wallet.account, self.cfg.spend_limit, unlimited=True)

    async def run(self) -> None:
        """Settle sessions left from a restart, then a :meth:`round` every 30 s (or
        every ``idle_close_s``, if shorter), forever."""
        self._adopt_left()
        await self._settle_released(release_all=False)
        while True:
            await trio.sleep(min(self.cfg.idle_close_s, 30.0))
            await self.round()

    async def round(self) -> None:
        """Release the sessions idle ``idle_close_s`` or past their end (none with a
        request running), and settle the released ones the rules allow to be."""
        now = trio.current_time()
        for paid in list(self.open.values()):
            if paid.released or paid.active > 0:
                continue
            idle = now - paid.last_used > self.cfg.idle_close_s
            reckoned = self._session_time(paid)
            if idle or (reckoned is not None and reckoned >= paid.ends_at):
                await self.release(paid.session_id)
        await self._settle_released(release_all=False)
