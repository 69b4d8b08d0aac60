"""Prices in one place: a provider's terms, what a consumer accepts and stakes."""

from __future__ import annotations

from p2pnode.p2p import pricing
from p2pnode.protocols.offers import ModelOffer, Offer


def _offer(*models: ModelOffer) -> Offer:
    return Offer(
        peer_id="p", addrs=(), models=models, slots_free=1, queue_len=0, seq=1, timestamp=0.0
    )


def test_offer_terms_carry_the_bid_and_unbid_models_are_free_of_one() -> None:
    models = (ModelOffer(model_id="a"), ModelOffer(model_id="b", bid_id="ff", price_per_s=9))
    a, b = pricing.offer_terms(models, {"a": (b"\x01\x02", 7)})
    assert (a.bid_id, a.price_per_s) == ("0102", 7)
    assert (b.bid_id, b.price_per_s) == (None, 0)  # its bid is gone: no terms


def test_a_paying_consumer_accepts_only_a_bid_within_its_price() -> None:
    bid = ModelOffer(model_id="a", bid_id="01", price_per_s=10)
    assert pricing.acceptable(_offer(bid), "a", 10) == bid
    assert pricing.acceptable(_offer(bid), "a", 9) is None
    assert pricing.acceptable(_offer(bid), "b", 10) is None
    assert pricing.acceptable(_offer(ModelOffer(model_id="a", price_per_s=10)), "a", 10) is None
    free = ModelOffer(model_id="a", bid_id="01", price_per_s=0)
    assert pricing.acceptable(_offer(free), "a", 10) is None  # a bid at 0 (or below) is no bid
    cheapest = ModelOffer(model_id="a", bid_id="01", price_per_s=1)  # 1 wei a second is a price
    assert pricing.acceptable(_offer(cheapest), "a", 10) == cheapest


def test_the_stake_is_the_session_cut_to_what_the_spend_limit_leaves() -> None:
    assert pricing.stake_for(10, 600, 100_000, 0) == 6_000
    assert pricing.stake_for(10, 600, 100_000, 97_000) == 3_000
    assert pricing.stake_for(10, 600, 100_000, 99_995) == 0  # not one second's worth
    assert pricing.stake_for(10, 600, 100_000, 99_990) == 10


def test_measurements_are_smoothed_seven_tenths_old_three_tenths_new() -> None:
    # One slow round trip must not undo a provider's record, nor one fast one make it.
    stats = pricing.PeerStats()
    stats.measured_rtt(100.0)
    stats.measured_speed(50.0)
    assert (stats.rtt_ms, stats.tokens_per_s) == (100.0, 50.0)  # the first is taken whole
    stats.measured_rtt(200.0)
    stats.measured_speed(10.0)
    assert stats.rtt_ms == 0.7 * 100.0 + 0.3 * 200.0
    assert stats.tokens_per_s == 0.7 * 50.0 + 0.3 * 10.0
