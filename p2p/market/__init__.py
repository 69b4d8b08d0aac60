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

from collections.abc import Callable

import trio

from p2pnode.errors import ConfigError
from p2pnode.p2p.market.billing import BillingCounters, ProviderMarket
from p2pnode.p2p.market.config import (
    MAX_CHAIN_LAG_S,
    Config,
    OfferMismatch,
    Wallet,
    check_contract,
    settling_time,
)
from p2pnode.p2p.market.ledger import Ledger, LedgerSession
from p2pnode.p2p.market.stakes import ConsumerMarket, Paid, StakeCounters

__all__ = [
    "MAX_CHAIN_LAG_S",
    "BillingCounters",
    "Config",
    "ConsumerMarket",
    "Ledger",
    "LedgerSession",
    "Markets",
    "OfferMismatch",
    "Paid",
    "ProviderMarket",
    "StakeCounters",
    "Wallet",
    "check_contract",
    "settling_time",
]


class Markets:
    """A node's part in the market: the ledger, and each role's market it needs.

    Free mode (no ``cfg``) has none of them. A node with engines bills as a
    provider; every paid node can pay as a consumer.
    """

    def __init__(self, cfg: Config | None, wallet: Wallet | None, *, serving: bool) -> None:
        if (cfg is None) != (wallet is None):
            raise ConfigError("paid mode needs both the market's terms and a wallet")
        self.wallet = wallet
        self.ledger = Ledger(cfg.sessions_db) if cfg is not None else None
        self.provider = (
            ProviderMarket(cfg, wallet, self.ledger)
            if cfg is not None and wallet is not None and self.ledger is not None and serving
            else None
        )
        self.consumer = (
            ConsumerMarket(cfg, wallet, self.ledger)
            if cfg is not None and wallet is not None and self.ledger is not None
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
        if self.wallet is not None:
            await check_contract(self.wallet.chain)
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
        within 30 s even when cancelled."""
        if self.consumer is not None:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 30):
                await self.consumer.close_all()

    def close(self) -> None:
        """Close the ledger: only once no task of the node runs (a settle loop that
        was in a chain read when it was cancelled still writes what it read)."""
        if self.ledger is not None:
            self.ledger.close()
