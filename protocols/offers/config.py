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
    # Bounds on what an offer may claim. A provider has a few addresses
    # (listen ones, or one circuit per relay) and a few models; everything
    # beyond is a publisher making every node store and relay junk.
    max_addrs: int = 8
    max_addr_len: int = 256
    max_models: int = 16
    max_model_id_len: int = 128
    # Slots and queue are counts of requests; a GPU box serves tens at once.
    max_slots: int = 1024
    max_queue: int = 100_000
    # Prices are token units per second (wei-like, 18 decimals); msgpack
    # carries integers up to 2**64 - 1, so that is the bound (~18 tokens/s).
    max_price_per_s: int = 2**64 - 1
    # Generation speed a model could claim: a small model on a big GPU
    # reaches a few thousand tokens/s; claims above are lies.
    max_tokens_per_s: float = 10_000.0
    max_context_length: int = 10_000_000
    # Providers held at once. A flood of Sybil identities cannot evict a
    # provider that keeps announcing: a newcomer only takes the place of an
    # offer that has gone unrefreshed for two periods.
    max_entries: int = 4096
