"""Paid sessions: the chain's part of the handshake, for both sides (ARCHITECTURE §5, §7).

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
    … requests …                                     serves until the session's end
    closeSession (tx 2), when idle or at stop        closes sessions that have ended

The approval nonce (32 bytes) is sha256 of the Hello and Approve nonces, so
both sides know it and the on-chain session id (keccak of bid, consumer and
nonce) without another message. Stake = price × ``session_seconds``, within
the consumer's ``spend_limit`` (the sum of the stakes it has open). The
provider closes sessions past their end (it is paid then); nobody's stake is
ever stranded, since after the end anyone can close. Both sides keep their
sessions and receipts in ``sessions.db`` so that a restarted node closes what
it left open.
"""

from __future__ import annotations

import hashlib
import logging
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

from p2pnode.chain.client import AsyncChain, Tx, model_key
from p2pnode.errors import ChainError
from p2pnode.protocols.offers import ModelOffer, Offer
from p2pnode.protocols.session import Approve, Hello, RejectCode
from p2pnode.protocols.wire import signing_payload

logger = logging.getLogger(__name__)

HELLO_DOMAIN = b"p2pnode/hello/1:"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """A node's terms on the chain (present: chain mode; absent: free mode)."""

    chain: AsyncChain
    account: LocalAccount
    # Provider: how long an approval may wait for its openSession.
    approval_ttl_s: int = 120
    # Provider: how often ended sessions are looked for and closed.
    settle_every_s: float = 30.0
    # Provider: how often it looks for sessions closed on chain (one
    # eth_getLogs for all of them); a request in progress in a session closed
    # early stops within this. New requests read the session first anyway.
    follow_s: float = 5.0
    # Consumer: the time a stake buys (stake = price x this).
    session_seconds: int = 600
    # Consumer: the most it escrows at once, over all its open sessions.
    spend_limit: int = 10**20
    # Consumer: the highest price per second it accepts.
    max_price_per_s: int = 10**18
    # Consumer: a session unused this long is closed (its stake mostly refunded).
    idle_close_s: float = 120.0
    sessions_db: Path | None = None


# Confirm's second looks at a session not (yet) on chain: ~2 s, within the handshake.
_CONFIRM_RETRY_S = (0.25, 0.5, 1.0, 0.0)


class OfferMismatch(ChainError):
    """The chain contradicts a provider's signed offer (its bid, price, wallet or file).

    ``stale``: only the price differs, as after a re-pricing the offer has not
    caught up with yet.
    """

    def __init__(self, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale


def approval_nonce(hello_nonce: bytes, approve_nonce: bytes) -> bytes:
    """The 32-byte nonce of the on-chain approval: both handshake nonces, hashed."""
    return hashlib.sha256(b"p2pnode/approval/1:" + hello_nonce + approve_nonce).digest()


def hello_signing_bytes(hello: Hello) -> bytes:
    return signing_payload(hello, HELLO_DOMAIN)


def hello_signed_by_wallet(hello: Hello) -> bool:
    """Whether the Hello's ``consumer_wallet`` signed it (EIP-191 over its signing bytes).

    The only way a Hello's wallet field means anything: free mode's
    allowlist and paid mode's admission both rely on it.
    """
    if not hello.consumer_wallet or not hello.signature:
        return False
    try:
        signer = Account.recover_message(
            encode_defunct(primitive=hello_signing_bytes(hello)), signature=hello.signature
        )
    except Exception:  # noqa: BLE001 - eth-account raises several kinds on bad input
        return False
    return bool(signer.lower() == hello.consumer_wallet.lower())


class Ledger:
    """``sessions.db``: the sessions a node holds and the receipts it has (sqlite)."""

    def __init__(self, path: Path | None) -> None:
        self._db = sqlite3.connect(str(path) if path else ":memory:", isolation_level=None)
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

    def opened(
        self, role: str, peer: str, session_id: bytes, bid_id: bytes, stake: int, ends_at: int
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?, 'open', NULL, NULL)",
            (session_id, role, peer, bid_id, str(stake), ends_at),
        )

    def closed(self, session_id: bytes, paid: int, refunded: int) -> None:
        self._db.execute(
            "UPDATE sessions SET state='closed', paid=?, refunded=? WHERE session_id=?",
            (str(paid), str(refunded), session_id),
        )

    def open_sessions(self, role: str) -> list[tuple[bytes, int]]:
        rows = self._db.execute(
            "SELECT session_id, ends_at FROM sessions WHERE role=? AND state='open'", (role,)
        )
        return [(bytes(r[0]), int(r[1])) for r in rows]

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
    """

    cfg: Config
    ledger: Ledger
    # model id -> (bid id, price per second), read from the chain.
    bids: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    # session id -> its end (chain time), for sessions this provider confirmed
    # and has not seen closed.
    ends: dict[bytes, int] = field(default_factory=dict)
    counters: dict[str, int] = field(
        default_factory=lambda: {"settled": 0, "paid_wei": 0, "closed_early": 0, "chain_errors": 0}
    )
    # Chain time minus wall time, as last read (a dev chain's clock can be moved).
    skew: float = 0.0
    # Set when a session closes (on chain, or here): stops its requests.
    _closed: dict[bytes, trio.Event] = field(default_factory=dict)
    _next_block: int | None = None
    # The models whose bids are followed, and who to tell when they change.
    served: tuple[str, ...] = ()
    on_bids_changed: Callable[[], None] | None = None

    @property
    def address(self) -> str:
        return str(self.cfg.account.address)

    def chain_time(self) -> float:
        """The chain's clock now, estimated from the last reading."""
        return time.time() + self.skew

    async def _read_chain_time(self) -> int:
        now = await self.cfg.chain.run(self.cfg.chain.sync.now)
        self.skew = now - time.time()
        return now

    async def load_bids(self, model_ids: list[str]) -> None:
        """Read this provider's live bids for the models it serves."""
        chain = self.cfg.chain
        for model_id in model_ids:
            bid_id = await chain.run(chain.sync.live_bid, self.address, model_id)
            if bid_id is None:
                self.bids.pop(model_id, None)
                logger.warning("no live bid for %s on chain: run 'p2pnode bid post'", model_id)
                continue
            bid = await chain.run(chain.sync.bid, bid_id)
            self.bids[model_id] = (bid_id, bid.price_per_s)

    def offer_terms(self, models: tuple[ModelOffer, ...]) -> tuple[ModelOffer, ...]:
        """The models with their bid id and price, as offers carry them."""
        out = []
        for m in models:
            bid = self.bids.get(m.model_id)
            out.append(
                replace(m, bid_id=bid[0].hex(), price_per_s=bid[1])
                if bid
                else replace(m, bid_id=None, price_per_s=0)
            )
        return tuple(out)

    def check_hello(self, hello: Hello, peer_id: str) -> RejectCode | None:
        """Whether a Hello names our live bid and us (``peer_id``), and its wallet signed it."""
        if not hello.bid_id or not hello.consumer_wallet:
            return RejectCode.PAYMENT_REQUIRED
        if hello.provider != peer_id:
            return RejectCode.BAD_SESSION
        bid = self.bids.get(hello.model_id)
        if bid is None or hello.bid_id != bid[0].hex():
            return RejectCode.PRICE_CHANGED
        if not hello_signed_by_wallet(hello):
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
        expiry = int(self.chain_time()) + self.cfg.approval_ttl_s
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
            now = await self._read_chain_time()
        except ChainError as exc:
            self.counters["chain_errors"] += 1
            logger.warning("cannot read session %s: %s", session_id.hex()[:8], exc)
            return RejectCode.CHAIN_UNAVAILABLE
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
        self._closed.setdefault(session_id, trio.Event())
        self.ledger.opened("provider", peer, session_id, s.bid_id, s.stake, s.ends_at)
        return None

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
        except ChainError as exc:
            self.counters["chain_errors"] += 1
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
            # end as last estimated, and look again.
            with trio.move_on_after(max(0.0, ends - self.chain_time()) + 0.05):
                await closed.wait()

    def _ended(self, session_id: bytes, *, early: bool) -> None:
        if self.ends.pop(session_id, None) is not None and early:
            self.counters["closed_early"] += 1
            logger.info("session %s was closed on chain", session_id.hex()[:8])
        event = self._closed.pop(session_id, None)
        if event is not None:
            event.set()

    async def follow(self) -> None:
        """One look at the ``SessionClosed`` events since the last look."""
        chain = self.cfg.chain
        if self._next_block is None:
            self._next_block = await chain.run(lambda: int(chain.sync.w3.eth.block_number))
        closed, self._next_block = await chain.run(chain.sync.closed_since, self._next_block)
        for session_id in closed:
            if session_id in self.ends:
                self._ended(session_id, early=True)

    async def settle(self) -> None:
        """Close the sessions (confirmed here or left from before a restart) that have ended."""
        now = await self._read_chain_time()
        due = {sid for sid, ends in self.ends.items() if ends <= now}
        due |= {sid for sid, ends in self.ledger.open_sessions("provider") if ends <= now}
        for session_id in due:
            await self._close(session_id)

    async def _close(self, session_id: bytes) -> None:
        chain = self.cfg.chain
        try:
            s = await chain.run(chain.sync.session, session_id)
            if s.open:
                tx: Tx = await chain.run(chain.sync.close_session, self.cfg.account, session_id)
                paid, refunded = tx.value
                self.counters["settled"] += 1
                self.counters["paid_wei"] += paid
                logger.info("settled session %s: paid %d", session_id.hex()[:8], paid)
            else:
                paid = refunded = 0
            self.ledger.closed(session_id, paid, refunded)
            self._ended(session_id, early=False)
        except ChainError as exc:
            logger.warning("cannot close session %s: %s", session_id.hex()[:8], exc)

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
                    self.counters["chain_errors"] += 1
                    logger.warning("chain: %s (trying again in %g s)", exc, self.cfg.follow_s)
            await trio.sleep(self.cfg.follow_s)

    async def reload_bids(self) -> None:
        """Read the bids again (a re-priced or new bid is announced without a restart)."""
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


@dataclass
class ConsumerMarket:
    """A consumer's stakes: what it opens, what it may spend, what it closes."""

    cfg: Config
    ledger: Ledger
    open: dict[bytes, Paid] = field(default_factory=dict)
    counters: dict[str, int] = field(
        default_factory=lambda: {"opened": 0, "closed": 0, "paid_wei": 0, "refunded_wei": 0}
    )
    open_ms: list[float] = field(default_factory=list)
    gas: dict[str, list[int]] = field(default_factory=lambda: {"open": [], "close": []})

    @property
    def address(self) -> str:
        return str(self.cfg.account.address)

    def terms(self, offer: Offer, model_id: str) -> ModelOffer | None:
        """The offer's terms if this consumer would pay them (a bid, a price within limits)."""
        terms = offer.serves(model_id)
        if terms is None or not terms.bid_id or terms.price_per_s <= 0:
            return None
        if terms.price_per_s > self.cfg.max_price_per_s:
            return None
        return terms

    def held(self) -> int:
        """What this consumer has escrowed in its open sessions."""
        return sum(p.stake for p in self.open.values())

    def stake_for(self, price_per_s: int) -> int:
        """The stake for one session at this price, or 0 if the spend limit is reached."""
        stake = min(price_per_s * self.cfg.session_seconds, self.cfg.spend_limit - self.held())
        return stake if stake >= price_per_s else 0

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
            encode_defunct(primitive=hello_signing_bytes(filled)), self.cfg.account.key
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
        self.open[session_id] = Paid(session_id, peer, stake, ends_at, trio.current_time())
        self.ledger.opened(
            "consumer", peer, session_id, bytes.fromhex(terms.bid_id), stake, ends_at
        )
        self.counters["opened"] += 1
        self.gas["open"].append(tx.gas_used)
        self.open_ms.append((trio.current_time() - started) * 1000)
        return session_id

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

    async def close(self, session_id: bytes) -> None:
        """Close a session (transaction 2 of 2): the provider is paid, we get the rest."""
        chain = self.cfg.chain
        try:
            s = await chain.run(chain.sync.session, session_id)
            if not s.open:  # the provider settled it already
                self.open.pop(session_id, None)
                self.ledger.closed(session_id, 0, 0)
                return
            tx: Tx = await chain.run(chain.sync.close_session, self.cfg.account, session_id)
        except ChainError as exc:
            # Still escrowed: it stays counted against the spend limit, and
            # the ledger lists it for the next try (idle loop, stop, restart).
            logger.warning("cannot close session %s: %s", session_id.hex()[:8], exc)
            return
        self.open.pop(session_id, None)
        paid, refunded = tx.value
        self.ledger.closed(session_id, paid, refunded)
        self.counters["closed"] += 1
        self.counters["paid_wei"] += paid
        self.counters["refunded_wei"] += refunded
        self.gas["close"].append(tx.gas_used)
        logger.info("closed session %s: paid %d, refunded %d", session_id.hex()[:8], paid, refunded)

    async def close_all(self) -> None:
        """Close every session this node opened, including any left from before a restart."""
        left = {sid for sid, _ in self.ledger.open_sessions("consumer")} | set(self.open)
        for session_id in left:
            await self.close(session_id)

    async def prepare(self) -> None:
        """At start: one unlimited token approval (so each session is one transaction)."""
        chain = self.cfg.chain
        await chain.run(
            partial(chain.sync.approve_token, unlimited=True),
            self.cfg.account,
            self.cfg.spend_limit,
        )

    async def run(self) -> None:
        """Close sessions left from a restart, then those idle or past their end, forever."""
        await self.close_all()
        while True:
            await trio.sleep(min(self.cfg.idle_close_s, 30.0))
            now, wall = trio.current_time(), time.time()
            for paid in list(self.open.values()):
                idle = paid.active == 0 and now - paid.last_used > self.cfg.idle_close_s
                if idle or paid.ends_at <= wall:
                    await self.close(paid.session_id)


__all__ = [
    "Config",
    "ConsumerMarket",
    "Ledger",
    "ProviderMarket",
    "approval_nonce",
]
