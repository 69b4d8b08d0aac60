"""Offer timing and limits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Offer timing and limits."""

    # Offers are re-announced this often (and at once on change); gossip may
    # drop some, the period bounds how stale a consumer's view gets.
    period_s: float = 10.0
    # Three missed periods plus slack: a provider that stopped disappears
    # within ~35 s, one that lost two messages does not.
    expiry_s: float = 35.0
    # An offer older than this at arrival is a replay or came from a badly
    # skewed clock; gossip delivers in under a second.
    max_age_s: float = 30.0
    max_skew_s: float = 10.0
    # A provider with several models and addresses fits in ~1 KiB; 8 KiB
    # leaves room and bounds what a hostile publisher makes everyone relay.
    max_size: int = 8 * 1024
