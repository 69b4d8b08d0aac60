"""The provider's side of paid sessions: bids, approvals, session checks, acks, claims."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from p2pnode.chain.client import CLAIM_WINDOW_S, Tx
from p2pnode.chain.units import format_price
from p2pnode.errors import ChainError
from p2pnode.p2p import pricing
from p2pnode.p2p.market.config import CONFIRM_RETRY_S, MAX_CHAIN_LAG_S, Config, Wallet
from p2pnode.p2p.market.ledger import Ledger
from p2pnode.protocols.offers import ModelOffer
from p2pnode.protocols.session import Hello, RejectCode, admission, approval_nonce

logger = logging.getLogger(__name__)


@dataclass
class BillingCounters:
    """A provider's sessions as the chain settled them."""

    settled: int = 0
    paid_wei: int = 0
    closed_early: int = 0  # closed by their consumer before the end
    chain_errors: int = 0
    acks: int = 0
    claimed_silent: int = 0  # claimed after the consumer went silent
    missed_claims: int = 0  # sessions whose claim window passed unclaimed
    gas_used: int = 0  # of its claims and closes


@dataclass
class ProviderMarket:
    """A provider's bids, approvals, session checks, settlement, and the chain it follows.

    Payment is enforced while it is used: a confirmed session is read from
    the chain again before each request (:meth:`check`), ``SessionClosed``
    events are followed every ``follow_s`` (:meth:`follow`), and a request
    in progress stops when its session closes or reaches its end
    (:meth:`until_ended`). When the chain cannot be read, what was last read
    stands: a session is served until its known end, never past it.

    Payment is earned by acknowledgement: :meth:`check_usage` keeps the
    consumer's best signed ``used_until`` per session (memory and
    ``sessions.db``), and :meth:`settle` claims each session with it once
    the session has ended, or its consumer has been silent ``claim_idle_s``,
    well inside the contract's claim window (``CLAIM_WINDOW_S``).
    """

    cfg: Config
    wallet: Wallet
    ledger: Ledger
    # model id -> (bid id, price per second), read from the chain.
    bids: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    # session id -> its end (chain time), for sessions this provider confirmed
    # and has not seen closed.
    ends: dict[bytes, int] = field(default_factory=dict)
    counters: BillingCounters = field(default_factory=lambda: BillingCounters())
    # session id -> the consumer's best acknowledgement: (used_until, signature).
    usage: dict[bytes, tuple[int, bytes]] = field(default_factory=dict)
    # session id -> (its consumer's wallet, chain time of its open, our trio clock
    # when we read it): what an acknowledgement is checked against.
    _confirmed: dict[bytes, tuple[str, int, float]] = field(default_factory=dict)
    # session id -> requests running in it, and the trio time of the last start or end.
    _running: dict[bytes, int] = field(default_factory=dict)
    _last_active: dict[bytes, float] = field(default_factory=dict)
    # The next block's time minus the wall clock's, as last read (follow() reads
    # it every follow_s): a dev chain's clock can be moved forward, and a chain's
    # block times trail the wall clock by up to a slot.
    skew: float = 0.0
    # Set when a session closes (on chain, or here): stops its requests.
    _closed: dict[bytes, trio.Event] = field(default_factory=dict)
    # The first block follow() has not looked at yet.
    _next_block: int | None = None
    # The models whose bids are followed, and who to tell when they change.
    served: tuple[str, ...] = ()
    on_bids_changed: Callable[[], None] | None = None
    # Served models with no live bid, already warned about.
    _unbid: set[str] = field(default_factory=set)
    # The wall clock (seconds since the epoch), which chain time follows between
    # readings; tests move it with trio's clock.
    wall: Callable[[], float] = time.time

    @property
    def address(self) -> str:
        return self.wallet.address

    def chain_time(self) -> float:
        """The chain's clock now (the time a block mined now would carry), estimated
        from the last reading: no RPC."""
        return self.wall() + self.skew

    def approval_expiry(self) -> int:
        """When an approval signed now lapses: ``approval_ttl_s`` after the chain's
        time now, counted from no earlier than the wall clock minus
        ``MAX_CHAIN_LAG_S``.

        No RPC (Hellos are unauthenticated: they must not cost a chain call);
        follow() keeps the reading of the chain's clock at most ``follow_s`` old.
        What the consumer says plays no part.
        """
        start = max(self.chain_time(), self.wall() - MAX_CHAIN_LAG_S)
        return int(start) + self.cfg.approval_ttl_s

    async def _read_chain_time(self) -> int:
        """Read the chain's clock: the time the next block will carry."""
        now = await self.wallet.chain.next_block_time()
        self.skew = now - self.wall()
        return now

    async def load_bids(self, model_ids: list[str]) -> None:
        """Read this provider's live bids for the models it serves (and, the first
        time, the chain's clock and block: follow() looks for changes from there on)."""
        chain = self.wallet.chain
        if self._next_block is None:
            await self._read_chain_time()
            self._next_block = await chain.block_number()
        for model_id in model_ids:
            bid_id = await chain.live_bid(self.address, model_id)
            if bid_id is None:
                self.bids.pop(model_id, None)
                if model_id not in self._unbid:
                    self._unbid.add(model_id)
                    logger.warning(
                        "no live bid for %s on chain, so it is not offered: run "
                        "'p2pnode provider register', 'p2pnode model register %s' and "
                        "'p2pnode bid post %s --price <per second>' (those not done yet); "
                        "this node picks the bid up within %g s, no restart needed",
                        model_id, model_id, model_id, self.cfg.follow_s,
                    )  # fmt: skip
                continue
            bid = await chain.bid(bid_id)
            if self.bids.get(model_id) != (bid_id, bid.price_per_s):
                price = format_price(bid.price_per_s)
                logger.info("bid for %s: %s at %s", model_id, bid_id.hex()[:8], price)
            self._unbid.discard(model_id)
            self.bids[model_id] = (bid_id, bid.price_per_s)

    def offer_terms(self, models: tuple[ModelOffer, ...]) -> tuple[ModelOffer, ...]:
        """The models with their bid id and price, as offers carry them."""
        return pricing.offer_terms(models, self.bids)

    def check_hello(self, hello: Hello, peer_id: str) -> RejectCode | None:
        """Whether a Hello names our live bid and us (``peer_id``), and its wallet signed it."""
        if not hello.bid_id or not hello.consumer_wallet:
            return RejectCode.PAYMENT_REQUIRED
        if hello.provider != peer_id:
            return RejectCode.BAD_SESSION
        bid = self.bids.get(hello.model_id)
        if bid is None or hello.bid_id != bid[0].hex():
            return RejectCode.PRICE_CHANGED
        if not admission.signed_by_wallet(hello):
            return RejectCode.BAD_SESSION
        return None

    async def approval(self, hello: Hello, approve_nonce: bytes) -> tuple[bytes, int]:
        """The EIP-712 approval of this session and when it lapses.

        Signing is local work: it does not take the chain's lane, which
        unauthenticated Hellos could otherwise keep busy.
        """
        chain = self.wallet.chain
        assert hello.bid_id is not None
        assert hello.consumer_wallet is not None
        expiry = self.approval_expiry()
        nonce = approval_nonce(hello.nonce, approve_nonce)
        signature = await trio.to_thread.run_sync(
            chain.sync.sign_approval,
            self.wallet.account,
            bytes.fromhex(hello.bid_id),
            hello.consumer_wallet,
            expiry,
            nonce,
        )
        return signature, expiry

    async def confirm(self, hello: Hello, session_id: bytes, peer: str) -> RejectCode | None:
        """Read the session the consumer says it opened: ours, theirs, this bid, not over."""
        chain = self.wallet.chain
        try:
            for delay in CONFIRM_RETRY_S:
                s = await chain.session(session_id)
                # A session the chain does not know yet may be in a block our
                # RPC node has not seen: look again before refusing.
                if s.open or int(s.consumer, 16) != 0:
                    break
                await trio.sleep(delay)
        except ChainError as exc:
            self.counters.chain_errors += 1
            logger.warning("cannot read session %s: %s", session_id.hex()[:8], exc)
            return RejectCode.CHAIN_UNAVAILABLE
        # The clock as follow() last read it (at most follow_s old): a made-up
        # session id must not cost us one more RPC than the session read.
        now = self.chain_time()
        ok = (
            s.open
            and s.provider.lower() == self.address.lower()
            and hello.consumer_wallet is not None
            and s.consumer.lower() == hello.consumer_wallet.lower()
            and hello.bid_id is not None
            and s.bid_id.hex() == hello.bid_id
            and s.ends_at > now
        )
        if not ok:
            return RejectCode.BAD_SESSION
        self.ends[session_id] = s.ends_at
        self._confirmed[session_id] = (s.consumer, s.opened_at, trio.current_time())
        self._running[session_id] = 0
        self._last_active[session_id] = trio.current_time()
        self._closed.setdefault(session_id, trio.Event())
        self.ledger.opened("provider", peer, session_id, s.bid_id, s.stake, s.ends_at)
        return None

    def used_until_now(self, session_id: bytes) -> float | None:
        """This provider's reckoning of the session's chain time now (None: not confirmed
        here): its open's chain time plus the seconds since, as the consumer counts."""
        confirmed = self._confirmed.get(session_id)
        if confirmed is None:
            return None
        _wallet, opened_at, read_at = confirmed
        return opened_at + (trio.current_time() - read_at)

    def check_usage(self, session_id: bytes, used_until: int, signature: bytes) -> str | None:
        """Check the consumer's acknowledgement in an Ack and keep it if it is the best.

        Returns why it is refused (None: accepted): not near this provider's own
        reckoning of the session's time (``ack_tolerance_s`` either way), behind an
        acknowledgement already held, or not signed by the session's consumer
        wallet (so ``claimSession`` would revert). Local work: no RPC.
        """
        confirmed = self._confirmed.get(session_id)
        expected = self.used_until_now(session_id)
        if confirmed is None or expected is None:
            return "not a session confirmed here"
        wallet = confirmed[0]
        tolerance = self.cfg.ack_tolerance_s
        if not expected - tolerance <= used_until <= expected + tolerance:
            return f"used_until is {used_until - expected:+.0f} s from this provider's reckoning"
        best = self.usage.get(session_id)
        if best is not None and used_until < best[0]:
            return f"used_until {used_until} is behind an earlier acknowledgement ({best[0]})"
        signer = self.wallet.chain.sync.usage_signer(session_id, used_until, signature)
        if signer is None or signer.lower() != wallet.lower():
            return "usage not signed by the session's consumer wallet"
        self.usage[session_id] = (used_until, signature)
        self.ledger.usage(session_id, used_until, signature)
        self.counters.acks += 1
        return None

    def begin(self, session_id: bytes) -> None:
        """A request starts in the session (a silent consumer's session is claimed early)."""
        self._running[session_id] = self._running.get(session_id, 0) + 1
        self._last_active[session_id] = trio.current_time()

    def end(self, session_id: bytes) -> None:
        """A request in the session ended; silence counts from now."""
        # One whose start this run never saw (a restart between) ends its last request.
        self._running[session_id] = max(0, self._running.get(session_id, 1) - 1)
        self._last_active[session_id] = trio.current_time()

    def silent(self, session_id: bytes) -> bool:
        """Whether the session's consumer has sent no request for ``claim_idle_s``
        (one running counts as not silent): it is claimed before its end."""
        last = self._last_active.get(session_id)
        if last is None:  # never seen here: silence counts from now
            return False
        idle = trio.current_time() - last > self.cfg.claim_idle_s
        return idle and self._running[session_id] == 0

    def serving(self, session_id: bytes) -> bool:
        """Whether a paid session may still be served, by what was last read."""
        ends = self.ends.get(session_id)
        return ends is not None and self.chain_time() < ends

    async def check(self, session_id: bytes) -> bool:
        """Read the session from the chain before a request: still open, not past its end.

        A consumer that closed its session early (its stake refunded) is not
        served one more request. If the chain cannot be read, the session is
        served within its known end.
        """
        if not self.serving(session_id):
            return False
        chain = self.wallet.chain
        try:
            s = await chain.session(session_id)
            # The chain's clock too: the contract ends a session by its block
            # time, which an estimate from the wall clock can trail by seconds
            # (a dev chain mines each block at least a second after the last).
            await self._read_chain_time()
        except ChainError as exc:
            self.counters.chain_errors += 1
            logger.info("cannot re-read session %s: %s", session_id.hex()[:8], exc)
            return self.serving(session_id)
        if not s.open:
            self._ended(session_id, early=True)
            return False
        return self.serving(session_id)

    async def until_ended(self, session_id: bytes) -> None:
        """Return once the session may no longer be served (closed, or past its end)."""
        while self.serving(session_id):
            closed = self._closed.get(session_id)
            ends = self.ends.get(session_id)
            if closed is None or ends is None:
                return
            # Chain time runs with the wall clock (skew aside); wake at the
            # end as last estimated, or when follow() may have read the
            # chain's clock again, and look again.
            wait = min(max(0.0, ends - self.chain_time()) + 0.05, self.cfg.follow_s)
            with trio.move_on_after(wait):
                await closed.wait()

    def _ended(self, session_id: bytes, *, early: bool) -> None:
        if self.ends.pop(session_id, None) is not None and early:
            self.counters.closed_early += 1
            logger.info("session %s was closed on chain", session_id.hex()[:8])
        self._confirmed.pop(session_id, None)
        self._running.pop(session_id, None)
        self._last_active.pop(session_id, None)
        self.usage.pop(session_id, None)
        event = self._closed.pop(session_id, None)
        if event is not None:
            event.set()

    async def follow(self) -> None:
        """One look at the chain: its clock, and the Marketplace's events since the
        last look (sessions closed; bids posted, re-priced or deleted; registrations).

        The clock first, on its own: requests in progress stop at a session's end
        by it, and approvals are signed by it. An event that may change this
        provider's bids reloads them, so a bid posted while it runs is offered
        within ``follow_s``, with no restart.
        """
        chain = self.wallet.chain
        await self._read_chain_time()
        if self._next_block is None:
            self._next_block = await chain.block_number()
        events, self._next_block = await chain.events_since(self._next_block)
        for session_id in events.closed:
            if session_id in self.ends:
                self._ended(session_id, early=True)
        ours = {bid_id for bid_id, _price in self.bids.values()}
        me = self.address.lower()
        if any(b.lower() == me for b in events.bidders) or events.withdrawn & ours:
            await self.reload_bids()

    async def settle(self) -> None:
        """Claim the sessions (confirmed here or left from before a restart) that have
        ended, and those whose consumer has been silent ``claim_idle_s``."""
        # As settling_time: the next block's time, or the wall clock's if later.
        now = max(await self._read_chain_time(), int(self.wall()))
        left = {row.session_id: row for row in self.ledger.open_sessions("provider")}
        ends = {sid: row.ends_at for sid, row in left.items()} | self.ends
        due = {sid for sid, ends_at in ends.items() if ends_at <= now}
        silent = {sid for sid in self.ends if sid not in due and self.silent(sid)}
        for session_id in due | silent:
            best = self.usage.get(session_id)
            row = left.get(session_id)
            if best is None and row is not None and row.used_until:
                best = (row.used_until, row.usage_signature)
            if await self._claim(session_id, best, now) and session_id in silent:
                self.counters.claimed_silent += 1

    async def _claim(self, session_id: bytes, best: tuple[int, bytes] | None, now: int) -> bool:
        """Settle the session with the best acknowledgement held (none: paid 0, the
        consumer refunded). Past the claim window only a close paying 0 is left.

        Returns whether this provider settled it now (False: the chain could not
        be reached, or someone else had closed it, which is only recorded)."""
        chain = self.wallet.chain
        try:
            s = await chain.session(session_id)
            if s.open:
                tx: Tx
                if now >= s.ends_at + CLAIM_WINDOW_S:
                    # Too late to claim (the chain was out of reach the whole
                    # window?): close it as anyone may, so nothing stays locked.
                    self.counters.missed_claims += 1
                    logger.warning(
                        "session %s: its claim window passed unclaimed", session_id.hex()[:8]
                    )
                    tx = await chain.close_session(self.wallet.account, session_id)
                else:
                    used_until, signature = best if best is not None else (0, b"")
                    tx = await chain.claim_session(
                        self.wallet.account,
                        session_id,
                        used_until,
                        signature,
                    )
                paid, refunded = tx.value
                self.counters.gas_used += tx.gas_used
                self.counters.settled += 1
                self.counters.paid_wei += paid
                logger.info("claimed session %s: paid %d", session_id.hex()[:8], paid)
            else:
                paid = refunded = 0
            self.ledger.closed(session_id, paid, refunded)
            self._ended(session_id, early=False)
            return s.open
        except ChainError as exc:
            logger.warning("cannot claim session %s: %s", session_id.hex()[:8], exc)
            return False

    async def run(self) -> None:
        """Follow the chain and settle ended sessions, forever (the node's nursery runs this).

        A chain that fails is tried again at the next round: the provider
        keeps serving within what it last read.
        """
        last_settle = -math.inf
        while True:
            # Each step on its own: a chain that fails one (say, a log range
            # its RPC refuses) must not stop the others.
            due = trio.current_time() - last_settle >= self.cfg.settle_every_s
            steps = [self.follow, self.settle, self.reload_bids] if due else [self.follow]
            if due:
                last_settle = trio.current_time()
            for step in steps:
                try:
                    await step()
                except ChainError as exc:
                    self.counters.chain_errors += 1
                    logger.warning("chain: %s (trying again in %g s)", exc, self.cfg.follow_s)
            await trio.sleep(self.cfg.follow_s)

    async def reload_bids(self) -> None:
        """Read the bids again and announce a change (a bid posted, re-priced or deleted
        while the node runs takes effect without a restart). follow() calls it when the
        chain's events say they changed, and run() every ``settle_every_s`` besides,
        in case an event was missed."""
        held = dict(self.bids)
        await self.load_bids(list(self.served))
        if self.bids != held and self.on_bids_changed is not None:
            self.on_bids_changed()
