"""Prices, in one place: what a provider asks, what a consumer accepts and stakes, and
which provider it picks (docs/architecture.md#where-a-price-is-chosen).

Pure: no chain, no clock. The provider's price is its bid on chain
(:func:`offer_terms` puts it in the offer); the consumer accepts an offer's
terms within its ``max_price_per_s`` (:func:`acceptable`), stakes for one
session within its spend limit (:func:`stake_for`), and ranks the providers
it may ask (:func:`rank`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

from p2pnode.protocols.offers import ModelOffer, Offer


def offer_terms(
    models: tuple[ModelOffer, ...], bids: Mapping[str, tuple[bytes, int]]
) -> tuple[ModelOffer, ...]:
    """A provider's models with their bid id and price per second (none: 0, unbid)."""
    return tuple(
        replace(m, bid_id=bid[0].hex(), price_per_s=bid[1])
        if (bid := bids.get(m.model_id))
        else replace(m, bid_id=None, price_per_s=0)
        for m in models
    )


def bid_terms(offer: Offer, model_id: str) -> ModelOffer | None:
    """The offer's terms for ``model_id`` if they can be paid at all: a bid and a
    positive price."""
    terms = offer.serves(model_id)
    if terms is None or not terms.bid_id or terms.price_per_s <= 0:
        return None
    return terms


def acceptable(offer: Offer, model_id: str, max_price_per_s: int) -> ModelOffer | None:
    """The offer's terms for ``model_id`` if a paying consumer would take them: a bid,
    and a positive price within ``max_price_per_s``."""
    terms = bid_terms(offer, model_id)
    return terms if terms is not None and terms.price_per_s <= max_price_per_s else None


def stake_for(price_per_s: int, session_seconds: int, spend_limit: int, held: int) -> int:
    """The stake for one session: ``session_seconds`` at the price, within what the spend
    limit leaves beside the ``held`` stakes; 0 if that buys not even one second."""
    stake = min(price_per_s * session_seconds, spend_limit - held)
    return stake if stake >= price_per_s else 0


@dataclass
class PeerStats:
    """What this consumer has measured of a provider (not what it claims)."""

    rtt_ms: float | None = None
    tokens_per_s: float | None = None

    def measured_rtt(self, rtt_ms: float) -> None:
        self.rtt_ms = rtt_ms if self.rtt_ms is None else 0.7 * self.rtt_ms + 0.3 * rtt_ms

    def measured_speed(self, tokens_per_s: float) -> None:
        old = self.tokens_per_s
        self.tokens_per_s = tokens_per_s if old is None else 0.7 * old + 0.3 * tokens_per_s


def rank(
    offers: list[Offer],
    model_id: str,
    stats: Mapping[str, PeerStats],
    scores: Mapping[str, float],
    held: Collection[str] = (),
    me: str = "",
) -> list[Offer]:
    """Best first: lowest misbehaviour score, then a session already ``held``,
    then cheapest, then quickest to answer.

    A held session comes before price: moving to another provider costs a
    handshake, and in paid mode an on-chain open and a second stake. "Quickest"
    adds the measured round trip (50 ms if unknown), an expected queueing
    delay when no slot is free, and the time per token. Speed is what this
    consumer measured; a provider not yet measured is taken at its word only
    up to the fastest speed measured of any provider (a claim is not a
    measurement: Sybils claiming 10,000 tokens/s do not jump the queue).

    Offers still tied (alike providers, none measured) go in an order of
    their own for each consumer ``me``: a hash of the two peer IDs. Every
    consumer of a provider that dies would otherwise move to the same next
    one (the book's order), and lose its answer again with it if that one
    dies too (simnet churn: a failover gap of 1.3-1.4 s in each of three
    answers at once).
    """
    measured = [s.tokens_per_s for s in stats.values() if s.tokens_per_s]
    ceiling = max(measured) if measured else None

    def key(offer: Offer) -> tuple[float, bool, int, float, bool, bytes]:
        terms = offer.serves(model_id)
        assert terms is not None
        seen = stats.get(offer.peer_id) or PeerStats()
        wait_ms = seen.rtt_ms if seen.rtt_ms is not None else 50.0
        if offer.slots_free <= 0:
            wait_ms += 500.0 * (offer.queue_len + 1)
        speed = seen.tokens_per_s
        if speed is None and terms.tokens_per_s > 0:
            speed = min(terms.tokens_per_s, ceiling) if ceiling else terms.tokens_per_s
        if speed:
            wait_ms += 1000.0 / speed
        fresh = offer.peer_id not in held
        # On a tie, the provider we have measured goes first.
        unmeasured = seen.tokens_per_s is None
        spread = hashlib.blake2b(f"{me} {offer.peer_id}".encode(), digest_size=8).digest()
        return (
            scores.get(offer.peer_id, 0.0),
            fresh,
            terms.price_per_s,
            wait_ms,
            unmeasured,
            spread,
        )

    return sorted((o for o in offers if o.serves(model_id) is not None), key=key)
