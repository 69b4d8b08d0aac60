"""Amounts as a person reads them: whole tokens, not the smallest unit.

The marketplace's token has 18 decimals, like ether: stakes, prices and
balances are integers of 10^-18 token on chain and in ``--json`` output, and
whole tokens wherever a person reads them.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from p2pnode.errors import ConfigError

DECIMALS = 18
UNIT = 10**DECIMALS  # one whole token in its smallest unit


def format_amount(units: int, *, places: int = 6, decimals: int = DECIMALS) -> str:
    """``units`` of the smallest unit (of a token or of ether) as a decimal number.

    Rounded to ``places`` decimals; an amount too small to show is written
    with its exponent (``2e-15``) rather than as zero. ``decimals``: the
    token's own, for a token other than the marketplace's 18-decimal one.
    """
    value = Decimal(units).scaleb(-decimals)
    shown = round(value, places)
    if shown == 0 and value != 0:
        return f"{value.normalize():e}".replace("e+", "e")
    return f"{shown.normalize():f}"


def format_tokens(units: int, *, places: int = 6) -> str:
    """``units`` of the smallest unit as tokens, e.g. ``0.001 tokens``."""
    return f"{format_amount(units, places=places)} token{'' if units == UNIT else 's'}"


def format_price(units_per_s: int) -> str:
    """A price per second in tokens, e.g. ``0.001 tokens/s``."""
    return f"{format_tokens(units_per_s)}/s"


def parse_tokens(text: str) -> int:
    """Whole tokens as a person writes them (``100``, ``0.5``) to the smallest unit."""
    try:
        value = Decimal(text) * UNIT
    except InvalidOperation as exc:
        raise ConfigError(f"not an amount of tokens: {text!r}") from exc
    if not value.is_finite() or value < 0 or value != value.to_integral_value():
        raise ConfigError(f"not an amount of tokens: {text!r}")
    return int(value)
