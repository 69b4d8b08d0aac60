"""What a wallet's paid sessions escrowed, paid and refunded, as a person reads it.

Read from the Marketplace's own events (``SessionOpened``, ``SessionClosed``),
so the figures are the chain's whoever settled a session: the consumer's
close, its provider's claim, or anyone's close after the claim window. Used
by ``p2pnode start`` and ``p2pnode demo`` when they stop (the settlement of
the run) and by ``p2pnode session list``. Amounts are exact in tokens here;
``--json`` outputs keep the token's smallest unit (README, "A paid network").
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from p2pnode.chain.units import format_amount, format_tokens
from p2pnode.errors import ChainError

if TYPE_CHECKING:
    from p2pnode.chain.client import AsyncChain, Chain


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One paid session as the chain's events tell it (amounts in the smallest unit)."""

    session_id: bytes
    consumer: str
    provider: str
    stake: int
    price_per_s: int
    ends_at: int  # chain time, unix seconds
    opened_block: int
    # (paid to the provider, refunded to the consumer) once closed; None while open.
    settled: tuple[int, int] | None = None
    closed_block: int | None = None

    def role_of(self, address: str) -> str:
        """``consumer`` or ``provider``: which side of the session ``address`` is."""
        return "consumer" if self.consumer.lower() == address.lower() else "provider"

    def to_json(self, address: str) -> dict[str, Any]:
        """The record for ``--json``: raw units, unix and ISO times."""
        paid, refunded = self.settled if self.settled is not None else (None, None)
        return {
            "session_id": self.session_id.hex(),
            "open": self.settled is None,
            "role": self.role_of(address),
            "consumer": self.consumer,
            "provider": self.provider,
            "stake": self.stake,
            "price_per_s": self.price_per_s,
            "paid": paid,
            "refunded": refunded,
            "ends_at": self.ends_at,
            "ends_at_utc": datetime.fromtimestamp(self.ends_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "opened_block": self.opened_block,
            "closed_block": self.closed_block,
        }


def history(chain: Chain, address: str) -> list[SessionRecord]:
    """Every session ``address`` opened or serves, oldest first, with its settlement.

    Blocking (JSON-RPC ``eth_getLogs``, three calls); run it in a worker thread
    from trio code (``AsyncChain.run``).
    """
    from eth_utils.address import to_checksum_address

    who = to_checksum_address(address)
    found: dict[bytes, SessionRecord] = {}
    for side in ("consumer", "provider"):
        logs = chain.market.events.SessionOpened().get_logs(
            from_block=0, argument_filters={side: who}
        )
        for log in logs:
            args = log["args"]
            sid = bytes(args["sessionId"])
            found[sid] = SessionRecord(
                session_id=sid,
                consumer=str(args["consumer"]),
                provider=str(args["provider"]),
                stake=int(args["stake"]),
                price_per_s=int(args["pricePerSecond"]),
                ends_at=int(args["endsAt"]),
                opened_block=int(log["blockNumber"]),
            )
    if found:
        closed = chain.market.events.SessionClosed().get_logs(
            from_block=min(r.opened_block for r in found.values()),
            argument_filters={"sessionId": list(found)},
        )
        for log in closed:
            sid = bytes(log["args"]["sessionId"])
            if sid in found:
                settled = (int(log["args"]["paid"]), int(log["args"]["refunded"]))
                found[sid] = replace(
                    found[sid], settled=settled, closed_block=int(log["blockNumber"])
                )
    return sorted(found.values(), key=lambda r: r.opened_block)


def next_block(chain: Chain) -> int:
    """The number the chain's next block will have: where a run starting now begins."""
    return int(chain.w3.eth.block_number) + 1


async def print_settlement(
    chain: AsyncChain, consumer: str, since_block: int, *, if_none: bool = True
) -> None:
    """Print :func:`summary_lines` for ``consumer``'s sessions from ``since_block`` on
    (``if_none=False``: nothing if it opened, closed and holds none, as for a provider
    that consumed nothing).

    For a node that has stopped (its sessions settled as far as the rules
    allow). A chain that cannot be read costs one line on stderr, not the exit.
    """
    from p2pnode.chain.client import CLAIM_WINDOW_S

    try:
        records = await chain.run(history, chain.sync, consumer)
    except ChainError as exc:
        click.echo(f"p2pnode: cannot read this run's settlement from the chain: {exc}", err=True)
        return
    settlement = settlement_of(records, consumer, since_block)
    if not if_none and not (settlement.opened or settlement.closed or settlement.held):
        return
    for line in summary_lines(settlement, CLAIM_WINDOW_S, time.time()):
        click.echo(line)


@dataclass(frozen=True, slots=True)
class Settlement:
    """A consumer's sessions over one run: what it escrowed (sessions opened in the
    run), what the sessions closed in the run paid and refunded (including any
    left from an earlier run), and what is still in escrow, whenever opened."""

    escrowed: int
    paid: int
    refunded: int
    opened: int
    closed: int
    held: tuple[SessionRecord, ...]


def settlement_of(records: Iterable[SessionRecord], consumer: str, since_block: int) -> Settlement:
    """The :class:`Settlement` of ``consumer``'s sessions from block ``since_block`` on."""
    mine = [r for r in records if r.role_of(consumer) == "consumer"]
    opened = [r for r in mine if r.opened_block >= since_block]
    closed = [r for r in mine if r.closed_block is not None and r.closed_block >= since_block]
    return Settlement(
        escrowed=sum(r.stake for r in opened),
        paid=sum(r.settled[0] for r in closed if r.settled is not None),
        refunded=sum(r.settled[1] for r in closed if r.settled is not None),
        opened=len(opened),
        closed=len(closed),
        held=tuple(r for r in mine if r.settled is None),
    )


def tokens(units: int) -> str:
    """An amount in tokens, exactly (sums of them add up to the last unit)."""
    return format_tokens(units, places=18)


def ether(wei: int) -> str:
    """An amount of ether (for gas), exactly."""
    return f"{format_amount(wei, places=18)} ether"


def summary_lines(settlement: Settlement, claim_window_s: int, now: float) -> list[str]:
    """What a consumer prints when it stops: the run's settlement, then one line per
    session still in escrow with the latest time its stake comes back (its end plus
    the claim window; sooner if its provider claims it)."""
    s = settlement
    lines = [
        f"settled on chain: {tokens(s.escrowed)} escrowed, {tokens(s.paid)} paid to "
        f"providers, {tokens(s.refunded)} refunded ({_count(s.opened, 'session')} opened, "
        f"{s.closed} closed in this run)"
    ]
    for r in s.held:
        back = r.ends_at + claim_window_s
        lines.append(
            f"still in escrow: {tokens(r.stake)} in session {r.session_id.hex()[:16]}…, back by "
            f"{when(back, now)} at the latest, sooner if its provider settles it"
        )
    return lines


def session_lines(records: Iterable[SessionRecord], address: str, now: float) -> list[str]:
    """``session list`` as a table: open sessions first, then the newest."""
    rows = sorted(records, key=lambda r: (r.settled is not None, -r.opened_block))
    table = [("session", "state", "role", "stake", "price", "paid", "refunded", "ends")]
    for r in rows:
        paid, refunded = (tokens(r.settled[0]), tokens(r.settled[1])) if r.settled else ("-", "-")
        ends = when(r.ends_at, now)
        if r.settled is not None and r.ends_at > now:
            ends = f"{_stamp(r.ends_at)} (closed before then)"  # its end no longer comes
        table.append(
            (
                r.session_id.hex()[:16] + "…",
                "open" if r.settled is None else "closed",
                r.role_of(address),
                tokens(r.stake),
                f"{tokens(r.price_per_s)}/s",
                paid,
                refunded,
                ends,
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    return ["  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]])
            for row in table]  # fmt: skip


def when(t: float, now: float | None = None) -> str:
    """A chain time for people: ``2025-06-01 12:34:56 UTC (in 4 min)`` / ``(3 min ago)``."""
    now = time.time() if now is None else now
    return f"{_stamp(t)} ({_relative(t - now)})"


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _relative(delta: float) -> str:
    seconds = abs(delta)
    if seconds < 1:
        return "now"
    if seconds < 90:
        span = f"{seconds:.0f} s"
    elif seconds < 90 * 60:
        span = f"{seconds / 60:.0f} min"
    elif seconds < 48 * 3600:
        span = f"{seconds / 3600:.0f} h"
    else:
        span = f"{seconds / 86400:.0f} days"
    return f"in {span}" if delta > 0 else f"{span} ago"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


__all__ = [
    "SessionRecord",
    "Settlement",
    "ether",
    "history",
    "next_block",
    "print_settlement",
    "session_lines",
    "settlement_of",
    "summary_lines",
    "tokens",
    "when",
]
