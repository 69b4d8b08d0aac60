"""Paid sessions: the chain's part of the handshake, for both sides.

Wire side: docs/protocols.md#paid-handshake; prices: docs/architecture.md#where-a-price-is-chosen.

Theory of operation. With a chain, a session is paid from the consumer's
stake held in escrow, and costs the consumer at most two transactions::

    consumer                                          provider
    Hello{bid_id, consumer_wallet, duration_s,
          signature (wallet, over the Hello)}  ──►   the bid is ours and live, the
                                                     wallet signed: approve, with an
                                      ◄── Approve{approval (EIP-712), expiry}
    openSession(bid, stake, approval)   (tx 1)
    Opened{on-chain session id}               ──►   reads the session from the chain:
                                      ◄── Ready      open, this consumer, this bid, not ended
    … requests; each Done is answered by an
      Ack{used_until, usage_signature}        ──►   checks it, keeps the best one
    closeSession (tx 2), when idle or at stop        claimSession with the best Ack, at
      (only a session it was served in)              the end (or when the consumer is silent)

The approval nonce (32 bytes) is sha256 of the Hello and Approve nonces, so
both sides know it and the on-chain session id (keccak of bid, consumer and
nonce) without another message. Stake = price × ``session_seconds``, within
the consumer's ``spend_limit`` (the sum of the stakes it has escrowed).

Nobody is paid for nothing (README, "Security model"). The provider is paid
only for time the consumer acknowledged: every Ack carries the consumer's
EIP-712 ``Usage(sessionId, usedUntil)`` signature, and ``claimSession`` pays
price × (min(usedUntil, end, now) − opened). A consumer closing before the
end pays the elapsed seconds (its own choice), so it closes early only a
session it was served in; one the provider took and never served (refused
after the open, stalled, failed) is left open, and closed once its end plus
the claim window (``CLAIM_WINDOW_S``) has passed, paying 0. Both sides keep
their sessions, the consumer's "served" mark and the provider's best
acknowledgement in ``sessions.db``, so that a restarted node settles what it
left open.

Chain time of an acknowledgement. Both sides measure a session's time from
the same point: the chain time of its open (the consumer reads it from the
open's own ``endsAt``, the provider from the session it confirms), plus the
seconds their own clocks have run since. So they agree to within the
handshake's latency whatever the chain's clock does between blocks (a dev
chain's stands still while idle, and runs ahead after a burst of blocks);
the contract caps an acknowledgement at the claim's block time anyway.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import trio
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount

from p2pnode.chain.client import CLAIM_WINDOW_S, AsyncChain, Tx, model_key
from p2pnode.chain.units import format_price
from p2pnode.errors import ChainError, ConfigError, FundsError
from p2pnode.p2p import pricing
from p2pnode.protocols.offers import ModelOffer, Offer
from p2pnode.protocols.session import Approve, Hello, RejectCode, admission, approval_nonce

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """A node's terms on the chain (present: chain mode; absent: free mode)."""

    chain: AsyncChain
    account: LocalAccount
    # Provider: how long an approval may wait for its openSession.
    approval_ttl_s: int = 120
    # Provider: how often ended sessions are looked for and closed.
    settle_every_s: float = 30.0
    # Provider: how often it reads the chain's clock and looks for sessions
    # closed and bids changed on chain (one eth_getLogs for all of them); a
    # request in progress in a session closed early stops within this, and a
    # bid posted or re-priced is offered within this. New requests read the
    # session first anyway.
    follow_s: float = 5.0
    # Consumer: the time a stake buys (stake = price x this).
    session_seconds: int = 600
    # Consumer: the most it escrows at once, over all its open sessions.
    spend_limit: int = 10**20
    # Consumer: the highest price per second it accepts.
    max_price_per_s: int = 10**18
    # Consumer: a session unused this long is closed (its stake mostly refunded).
    idle_close_s: float = 120.0
    # Provider: how far an Ack's used_until may be from its own reckoning of the
    # session's time (either way). Both sides count from the session's open, so an
    # honest Ack is off by the network's latency; 30 s leaves room for a slow link
    # and a stalled event loop, and bounds what a consumer acking stale times gets
    # for free (README, "Security model").
    ack_tolerance_s: float = 30.0
    # Provider: a session with no request for this long is claimed before its end
    # (its consumer went silent), with what it acknowledged. Far above a consumer's
    # idle close (2 minutes), which pays the elapsed time, more than the Acks do.
    claim_idle_s: float = 900.0
    sessions_db: Path | None = None


# Confirm's second looks at a session not (yet) on chain: ~2 s, within the handshake.
_CONFIRM_RETRY_S = (0.25, 0.5, 1.0, 0.0)

# How far behind the wall clock an approval's clock may start (seconds). The
# block an openSession lands in carries about the wall clock's time on any
# chain whose block producers keep true time, even after a long idle spell in
# which the latest block grew old; a chain whose node reports no pending block
# (so the chain's time is read from that old block) must not make approvals
# expire as they are signed. 30 s: well over a real chain's slot (12 s on
# Ethereum), well under the approval's time to live (120 s), so a consumer
# always has 90 s or more to open the session.
MAX_CHAIN_LAG_S = 30


class OfferMismatch(ChainError):
    """The chain contradicts a provider's signed offer (its bid, price, wallet or file).

    ``stale``: only the price differs, as after a re-pricing the offer has not
    caught up with yet.
    """

    def __init__(self, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale


async def settling_time(chain: AsyncChain) -> int:
    """The chain's time for deciding what may be settled now: the time the next block
    will carry (``Chain.next_block_time``), or the wall clock's if that is later.

    The next block's time, not the latest's: a chain that mines only when asked
    (anvil's default, a quiet chain) keeps an old latest block while idle, so its
    clock would never reach a session's end or claim window by itself; the block
    that settles it carries the time it is mined at. The wall clock for a node
    that reports no pending block. Deciding a moment early costs nothing: every
    write is simulated first against the pending block, so a close the contract
    refuses yet is never sent, and the next round tries again.
    """
    return max(await chain.run(chain.sync.next_block_time), int(time.time()))


async def check_contract(chain: AsyncChain) -> None:
    """At start: the Marketplace is one that pays by acknowledged time, with our window.

    A node pointed at an older deployment would have every claim revert, and
    leave unserved sessions to a close that pays elapsed time.
    """
    try:
        window = await chain.run(chain.sync.claim_window)
    except ChainError as exc:
        raise ChainError(
            f"cannot read the Marketplace's CLAIM_WINDOW ({exc}): a deployment from "
            "before acknowledged-time billing, or no chain; redeploy the contracts"
        ) from exc
    if window != CLAIM_WINDOW_S:
        raise ConfigError(
            f"the Marketplace's claim window is {window} s, this node's {CLAIM_WINDOW_S} s: "
            "a different contract version"
        )


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


@dataclass
class StakeCounters:
    """A consumer's stakes: opened, closed, and where the tokens went."""

    opened: int = 0
    closed: int = 0
    paid_wei: int = 0
    refunded_wei: int = 0
    left_unserved: int = 0  # taken by a provider that never served: left to close at 0
    closed_elsewhere: int = 0  # closed by the provider's claim, or another process


@dataclass(frozen=True, slots=True)
class LedgerSession:
    """A session ``sessions.db`` lists as open (not yet seen settled)."""

    session_id: bytes
    peer: str
    stake: int
    ends_at: int
    # Consumer: an answer in it was acknowledged (closing it early pays the seconds used).
    served: bool
    # Provider: the consumer's best acknowledgement (0 and b"": none).
    used_until: int
    usage_signature: bytes


class Ledger:
    """``sessions.db``: the sessions a node holds and the receipts it has (sqlite).

    Versioned with sqlite's ``user_version``: a database an older p2pnode wrote
    (version 0) gains the columns of version 1, and its sessions count as served
    (they were opened under the old rules, which closed every session at once); a
    database from a newer p2pnode is refused rather than misread.
    """

    VERSION = 1

    def __init__(self, path: Path | None) -> None:
        self._db = sqlite3.connect(str(path) if path else ":memory:", isolation_level=None)
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > self.VERSION:
            self._db.close()
            raise ConfigError(
                f"{path} was written by a newer p2pnode (schema {version}, this one reads "
                f"{self.VERSION})"
            )
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS sessions (
                session_id BLOB PRIMARY KEY, role TEXT NOT NULL, peer TEXT NOT NULL,
                bid_id BLOB NOT NULL, stake TEXT NOT NULL, ends_at INTEGER NOT NULL,
                state TEXT NOT NULL, paid TEXT, refunded TEXT);
            CREATE TABLE IF NOT EXISTS receipts (
                session_id BLOB PRIMARY KEY, requests INTEGER, prompt_tokens INTEGER,
                completion_tokens INTEGER, provider_signature BLOB, consumer_signature BLOB);
            """
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}
        if "served" not in columns:
            with self._db:  # one transaction: a crash leaves version 0, migrated again
                self._db.execute("BEGIN")
                self._db.execute(
                    "ALTER TABLE sessions ADD COLUMN served INTEGER NOT NULL DEFAULT 0"
                )
                self._db.execute(
                    "ALTER TABLE sessions ADD COLUMN used_until INTEGER NOT NULL DEFAULT 0"
                )
                self._db.execute(
                    "ALTER TABLE sessions ADD COLUMN usage_signature BLOB NOT NULL DEFAULT x''"
                )
                self._db.execute("UPDATE sessions SET served = 1")
                self._db.execute(f"PRAGMA user_version = {self.VERSION}")
        elif version < self.VERSION:
            self._db.execute(f"PRAGMA user_version = {self.VERSION}")

    def opened(
        self, role: str, peer: str, session_id: bytes, bid_id: bytes, stake: int, ends_at: int
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO sessions (session_id, role, peer, bid_id, stake, ends_at,"
            " state, served, used_until, usage_signature)"
            " VALUES (?, ?, ?, ?, ?, ?, 'open', 0, 0, x'')",
            (session_id, role, peer, bid_id, str(stake), ends_at),
        )

    def served(self, session_id: bytes) -> None:
        """The consumer acknowledged an answer in the session."""
        self._db.execute("UPDATE sessions SET served=1 WHERE session_id=?", (session_id,))

    def usage(self, session_id: bytes, used_until: int, signature: bytes) -> None:
        """The provider's best acknowledgement of the session so far (what it claims with)."""
        self._db.execute(
            "UPDATE sessions SET used_until=?, usage_signature=? WHERE session_id=?",
            (used_until, signature, session_id),
        )

    def closed(self, session_id: bytes, paid: int, refunded: int) -> None:
        self._db.execute(
            "UPDATE sessions SET state='closed', paid=?, refunded=? WHERE session_id=?",
            (str(paid), str(refunded), session_id),
        )

    def open_sessions(self, role: str) -> list[LedgerSession]:
        rows = self._db.execute(
            "SELECT session_id, peer, stake, ends_at, served, used_until, usage_signature"
            " FROM sessions WHERE role=? AND state='open'",
            (role,),
        )
        return [
            LedgerSession(bytes(r[0]), str(r[1]), int(r[2]), int(r[3]), bool(r[4]), int(r[5]),
                          bytes(r[6]))
            for r in rows
        ]  # fmt: skip

    def receipt(
        self,
        session_id: bytes,
        counts: tuple[int, int, int],
        provider_sig: bytes,
        consumer_sig: bytes,
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO receipts VALUES (?, ?, ?, ?, ?, ?)",
            (session_id, *counts, provider_sig, consumer_sig),
        )

    def close(self) -> None:
        self._db.close()


# --- provider ---------------------------------------------------------------------


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
    # session id -> (requests running, trio time of the last start or end).
    _activity: dict[bytes, tuple[int, float]] = field(default_factory=dict)
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

    @property
    def address(self) -> str:
        return str(self.cfg.account.address)

    def chain_time(self) -> float:
        """The chain's clock now (the time a block mined now would carry), estimated
        from the last reading: no RPC."""
        return time.time() + self.skew

    def approval_expiry(self) -> int:
        """When an approval signed now lapses: ``approval_ttl_s`` after the chain's
        time now, counted from no earlier than the wall clock minus
        ``MAX_CHAIN_LAG_S``.

        No RPC (Hellos are unauthenticated: they must not cost a chain call);
        follow() keeps the reading of the chain's clock at most ``follow_s`` old.
        What the consumer says plays no part.
        """
        start = max(self.chain_time(), time.time() - MAX_CHAIN_LAG_S)
        return int(start) + self.cfg.approval_ttl_s

    async def _read_chain_time(self) -> int:
        """Read the chain's clock: the time the next block will carry."""
        now = await self.cfg.chain.run(self.cfg.chain.sync.next_block_time)
        self.skew = now - time.time()
        return now

    async def load_bids(self, model_ids: list[str]) -> None:
        """Read this provider's live bids for the models it serves (and, the first
        time, the chain's clock and block: follow() looks for changes from there on)."""
        chain = self.cfg.chain
        if self._next_block is None:
            await self._read_chain_time()
            self._next_block = await chain.run(chain.sync.block_number)
        for model_id in model_ids:
            bid_id = await chain.run(chain.sync.live_bid, self.address, model_id)
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
            bid = await chain.run(chain.sync.bid, bid_id)
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
        chain = self.cfg.chain
        assert hello.bid_id is not None
        assert hello.consumer_wallet is not None
        expiry = self.approval_expiry()
        nonce = approval_nonce(hello.nonce, approve_nonce)
        signature = await trio.to_thread.run_sync(
            chain.sync.sign_approval,
            self.cfg.account,
            bytes.fromhex(hello.bid_id),
            hello.consumer_wallet,
            expiry,
            nonce,
        )
        return signature, expiry

    async def confirm(self, hello: Hello, session_id: bytes, peer: str) -> RejectCode | None:
        """Read the session the consumer says it opened: ours, theirs, this bid, not over."""
        chain = self.cfg.chain
        try:
            for delay in _CONFIRM_RETRY_S:
                s = await chain.run(chain.sync.session, session_id)
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
            and s.consumer.lower() == (hello.consumer_wallet or "").lower()
            and hello.bid_id is not None
            and s.bid_id.hex() == hello.bid_id
            and s.ends_at > now
        )
        if not ok:
            return RejectCode.BAD_SESSION
        self.ends[session_id] = s.ends_at
        self._confirmed[session_id] = (s.consumer, s.opened_at, trio.current_time())
        self._activity[session_id] = (0, trio.current_time())
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
        signer = self.cfg.chain.sync.usage_signer(session_id, used_until, signature)
        if signer is None or signer.lower() != wallet.lower():
            return "usage not signed by the session's consumer wallet"
        self.usage[session_id] = (used_until, signature)
        self.ledger.usage(session_id, used_until, signature)
        self.counters.acks += 1
        return None

    def begin(self, session_id: bytes) -> None:
        """A request starts in the session (a silent consumer's session is claimed early)."""
        running, _ = self._activity.get(session_id, (0, 0.0))
        self._activity[session_id] = (running + 1, trio.current_time())

    def end(self, session_id: bytes) -> None:
        """A request in the session ended; silence counts from now."""
        running, _ = self._activity.get(session_id, (1, 0.0))
        self._activity[session_id] = (max(0, running - 1), trio.current_time())

    def _silent(self, session_id: bytes) -> bool:
        running, last = self._activity.get(session_id, (0, trio.current_time()))
        return running == 0 and trio.current_time() - last > self.cfg.claim_idle_s

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
        chain = self.cfg.chain
        try:
            s = await chain.run(chain.sync.session, session_id)
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
        self._activity.pop(session_id, None)
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
        chain = self.cfg.chain
        await self._read_chain_time()
        if self._next_block is None:
            self._next_block = await chain.run(chain.sync.block_number)
        events, self._next_block = await chain.run(chain.sync.events_since, self._next_block)
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
        now = max(await self._read_chain_time(), int(time.time()))
        due = {sid for sid, ends in self.ends.items() if ends <= now}
        silent = {sid for sid in self.ends if sid not in due and self._silent(sid)}
        left = {row.session_id: row for row in self.ledger.open_sessions("provider")}
        due |= {sid for sid, row in left.items() if row.ends_at <= now}
        for session_id in due | silent:
            best = self.usage.get(session_id)
            row = left.get(session_id)
            if best is None and row is not None and row.used_until:
                best = (row.used_until, row.usage_signature)
            if await self._claim(session_id, best, now) and session_id in silent:
                self.counters.claimed_silent += 1

    async def _claim(self, session_id: bytes, best: tuple[int, bytes] | None, now: int) -> bool:
        """Settle the session with the best acknowledgement held (none: paid 0, the
        consumer refunded). Past the claim window only a close paying 0 is left."""
        chain = self.cfg.chain
        try:
            s = await chain.run(chain.sync.session, session_id)
            if s.open:
                tx: Tx
                if now >= s.ends_at + CLAIM_WINDOW_S:
                    # Too late to claim (the chain was out of reach the whole
                    # window?): close it as anyone may, so nothing stays locked.
                    self.counters.missed_claims += 1
                    logger.warning(
                        "session %s: its claim window passed unclaimed", session_id.hex()[:8]
                    )
                    tx = await chain.run(chain.sync.close_session, self.cfg.account, session_id)
                else:
                    used_until, signature = best if best is not None else (0, b"")
                    tx = await chain.run(
                        chain.sync.claim_session,
                        self.cfg.account,
                        session_id,
                        used_until,
                        signature,
                    )
                paid, refunded = tx.value
                self.counters.settled += 1
                self.counters.paid_wei += paid
                logger.info("claimed session %s: paid %d", session_id.hex()[:8], paid)
            else:
                paid = refunded = 0
            self.ledger.closed(session_id, paid, refunded)
            self._ended(session_id, early=False)
            return True
        except ChainError as exc:
            logger.warning("cannot claim session %s: %s", session_id.hex()[:8], exc)
            return False

    async def run(self) -> None:
        """Follow the chain and settle ended sessions, forever (the node's nursery runs this).

        A chain that fails is tried again at the next round: the provider
        keeps serving within what it last read.
        """
        last_settle = -float("inf")
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


# --- consumer ---------------------------------------------------------------------


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


@dataclass
class ConsumerMarket:
    """A consumer's stakes: what it opens, what it may spend, what it acknowledges,
    what it closes, and when."""

    cfg: Config
    ledger: Ledger
    # Every session whose stake is escrowed, in use or waiting to be settled.
    open: dict[bytes, Paid] = field(default_factory=dict)
    counters: StakeCounters = field(default_factory=lambda: StakeCounters())
    open_ms: list[float] = field(default_factory=list)
    gas: dict[str, list[int]] = field(default_factory=lambda: {"open": [], "close": []})

    @property
    def address(self) -> str:
        return str(self.cfg.account.address)

    def terms(self, offer: Offer, model_id: str) -> ModelOffer | None:
        """The offer's terms if this consumer would pay them (a bid, a price within limits)."""
        return pricing.acceptable(offer, model_id, self.cfg.max_price_per_s)

    def why_not(self, offers: list[Offer], model_id: str) -> str:
        """Why none of ``offers`` would be paid for ("" when one would): no live bid,
        or every bid above ``max_price_per_s``."""
        prices = []
        for offer in offers:
            terms = offer.serves(model_id)
            if terms is not None and terms.bid_id and terms.price_per_s > 0:
                prices.append(terms.price_per_s)
        if any(p <= self.cfg.max_price_per_s for p in prices):
            return ""
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
        chain = self.cfg.chain
        tokens = await chain.run(chain.sync.balance, self.address)
        ether = await chain.run(chain.sync.eth_balance, self.address)
        if tokens >= stake and ether > 0:
            return
        needed = None if tokens >= stake else stake  # None: it lacks ether for gas
        unfunded = await chain.run(
            partial(chain.sync.unfunded, tokens_needed=needed), self.address, "opening a session"
        )
        if ether == 0 or tokens == 0:
            raise FundsError(str(unfunded))
        raise ChainError(str(unfunded))

    def held(self) -> int:
        """What this consumer has escrowed: its sessions in use and those waiting to be
        settled (a stake is spent until it is back)."""
        return sum(p.stake for p in self.open.values())

    def stake_for(self, price_per_s: int) -> int:
        """The stake for one session at this price, or 0 if the spend limit is reached."""
        cfg = self.cfg
        return pricing.stake_for(price_per_s, cfg.session_seconds, cfg.spend_limit, self.held())

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
            encode_defunct(primitive=filled.signing_bytes()), self.cfg.account.key
        )
        return replace(filled, signature=bytes(signed.signature))

    async def check_bid(self, offer: Offer, terms: ModelOffer) -> None:
        """Before paying: the bid the offer names is live, the offer's wallet's, for this
        model, at this price, and for the GGUF file the offer announces.

        Raises :class:`OfferMismatch` (the provider's offer lied) or ChainError.
        """
        chain = self.cfg.chain
        assert terms.bid_id is not None
        bid = await chain.run(chain.sync.bid, bytes.fromhex(terms.bid_id))
        wrong = (
            "not live"
            if not bid.live
            else "another wallet's"
            if (offer.wallet or "").lower() != bid.provider.lower()
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
        chain = self.cfg.chain
        assert terms.bid_id is not None
        started = trio.current_time()
        tx: Tx = await chain.run(
            chain.sync.open_session,
            self.cfg.account,
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
        chain = self.cfg.chain.sync
        signature = chain.sign_usage(self.cfg.account, session_id, paid.used_until)
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
        chain = self.cfg.chain
        session_id = paid.session_id
        try:
            s = await chain.run(chain.sync.session, session_id)
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
            tx: Tx = await chain.run(chain.sync.close_session, self.cfg.account, session_id)
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
            now: int | None = await settling_time(self.cfg.chain)
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
        chain = self.cfg.chain
        await chain.run(
            partial(chain.sync.approve_token, unlimited=True),
            self.cfg.account,
            self.cfg.spend_limit,
        )

    async def run(self) -> None:
        """Settle sessions left from a restart, then release those idle or past their
        end, and settle released ones when the rules allow, forever."""
        self._adopt_left()
        await self._settle_released(release_all=False)
        while True:
            await trio.sleep(min(self.cfg.idle_close_s, 30.0))
            now = trio.current_time()
            for paid in list(self.open.values()):
                if paid.released or paid.active > 0:
                    continue
                idle = now - paid.last_used > self.cfg.idle_close_s
                reckoned = self._session_time(paid)
                if idle or (reckoned is not None and reckoned >= paid.ends_at):
                    await self.release(paid.session_id)
            await self._settle_released(release_all=False)


__all__ = [
    "Config",
    "ConsumerMarket",
    "Ledger",
    "LedgerSession",
    "ProviderMarket",
]


class Markets:
    """A node's part in the market: the ledger, and each role's market it needs.

    Free mode (no ``cfg``) has none of them. A node with engines bills as a
    provider; every paid node can pay as a consumer.
    """

    def __init__(self, cfg: Config | None, *, serving: bool) -> None:
        self.cfg = cfg
        self.ledger = Ledger(cfg.sessions_db) if cfg is not None else None
        self.provider = (
            ProviderMarket(cfg, self.ledger)
            if cfg is not None and self.ledger is not None and serving
            else None
        )
        self.consumer = (
            ConsumerMarket(cfg, self.ledger)
            if cfg is not None and self.ledger is not None
            else None
        )

    async def start(
        self,
        nursery: trio.Nursery,
        served: Callable[[], tuple[str, ...]],
        terms_changed: Callable[[], None],
    ) -> None:
        """Check the contract, read the bids of the ``served`` models, start both roles' loops.

        ``terms_changed()`` is told when this provider's bids changed (and
        once, after the first reading).
        """
        if self.cfg is not None:
            await check_contract(self.cfg.chain)
        if self.provider is not None:
            self.provider.served = served()
            self.provider.on_bids_changed = terms_changed
            await self.provider.load_bids(list(self.provider.served))
            terms_changed()
            nursery.start_soon(self.provider.run)
        if self.consumer is not None:
            await self.consumer.prepare()
            nursery.start_soon(self.consumer.run)

    async def stop(self) -> None:
        """Close the paid sessions this node opened (a consumer's second transaction),
        within 30 s even when cancelled; then the ledger."""
        if self.consumer is not None:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 30):
                await self.consumer.close_all()
        if self.ledger is not None:
            self.ledger.close()
