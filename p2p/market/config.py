"""A node's terms on the chain, and the checks both roles share.

See docs/architecture.md#where-the-chain-is-read-and-written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from eth_account.signers.local import LocalAccount

from p2pnode.chain.client import CLAIM_WINDOW_S, AsyncChain
from p2pnode.errors import ChainError, ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Wallet:
    """Who a paid node is on the chain, and its way to the chain.

    Not configuration: a key and a live client, handed to ``open_node``
    beside the :class:`Config` (which holds values only).
    """

    chain: AsyncChain
    account: LocalAccount = field(repr=False)  # it holds the private key

    @property
    def address(self) -> str:
        return str(self.account.address)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """A node's terms on the chain (present: paid mode, with a :class:`Wallet`;
    absent: free mode)."""

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
CONFIRM_RETRY_S = (0.25, 0.5, 1.0, 0.0)


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

    def __init__(self, message: str, *, stale: bool) -> None:
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
    return max(await chain.next_block_time(), int(time.time()))


async def check_contract(chain: AsyncChain) -> None:
    """At start: the Marketplace is one that pays by acknowledged time, with our window.

    A node pointed at an older deployment would have every claim revert, and
    leave unserved sessions to a close that pays elapsed time.
    """
    try:
        window = await chain.claim_window()
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
