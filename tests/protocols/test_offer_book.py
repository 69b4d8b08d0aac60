"""The OfferBook's admission rules, one by one, with real signatures and plain clocks."""

from __future__ import annotations

from dataclasses import replace

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from p2pnode.p2p.discovery import verify_peer_signature
from p2pnode.p2p.host import dials_peer
from p2pnode.protocols import offers
from p2pnode.protocols.offers.messages import MAX_FEATURE_LEN, MAX_FEATURES, MAX_TEMPERATURE

CFG = offers.Config()
NOW = 1_800_000_000.0


def _sign(offer: offers.Offer, key: KeyPair) -> bytes:
    signed = replace(offer, signature=key.private_key.sign(offer.signing_bytes()))
    return offers.GOSSIP_CODEC.encode_body(signed)


def _offer(key: KeyPair, *, seq: int = 1, timestamp: float = NOW, **kw: object) -> offers.Offer:
    peer_id = str(ID.from_pubkey(key.public_key))
    fields: dict[str, object] = {
        "peer_id": peer_id,
        "addrs": (f"/ip4/127.0.0.1/tcp/4001/p2p/{peer_id}",),
        "models": (offers.ModelOffer(model_id="m", context_length=2048),),
        "slots_free": 1,
        "queue_len": 0,
        "seq": seq,
        "timestamp": timestamp,
    }
    fields.update(kw)
    return offers.Offer(**fields)  # type: ignore[arg-type]


@pytest.fixture
def key() -> KeyPair:
    return create_new_key_pair()


@pytest.fixture
def book() -> offers.OfferBook:
    return offers.OfferBook(CFG, verify_peer_signature, dials_peer)


def _source(key: KeyPair) -> str:
    return str(ID.from_pubkey(key.public_key))


def test_a_signed_fresh_offer_is_accepted(book: offers.OfferBook, key: KeyPair) -> None:
    assert (
        book.consider(_sign(_offer(key), key), source=_source(key), now=NOW)
        is offers.Verdict.ACCEPTED
    )
    held = book.get(_source(key))
    assert held is not None
    assert held.serves("m") is not None
    assert book.offers("m") == [held]
    assert book.offers("other") == []


def test_unsigned_offer_is_rejected(book: offers.OfferBook, key: KeyPair) -> None:
    body = offers.GOSSIP_CODEC.encode_body(_offer(key))
    assert book.consider(body, source=_source(key), now=NOW) is offers.Verdict.UNSIGNED
    assert len(book) == 0


def test_offer_signed_by_another_peer_is_forged(book: offers.OfferBook, key: KeyPair) -> None:
    mallory = create_new_key_pair()
    body = _sign(_offer(key), mallory)  # claims key's peer id, signed by mallory
    assert book.consider(body, source=_source(key), now=NOW) is offers.Verdict.FORGED


def test_offer_published_by_another_peer_is_forged(book: offers.OfferBook, key: KeyPair) -> None:
    mallory = create_new_key_pair()
    body = _sign(_offer(key), key)  # genuine, but gossiped as if from mallory
    assert book.consider(body, source=_source(mallory), now=NOW) is offers.Verdict.FORGED


def test_tampered_offer_is_forged(book: offers.OfferBook, key: KeyPair) -> None:
    signed = replace(_offer(key), signature=key.private_key.sign(_offer(key).signing_bytes()))
    cheaper = replace(
        signed, models=(offers.ModelOffer(model_id="m", price_per_s=0),), slots_free=9
    )
    body = offers.GOSSIP_CODEC.encode_body(cheaper)
    assert book.consider(body, source=_source(key), now=NOW) is offers.Verdict.FORGED


def test_stale_offer_is_rejected(book: offers.OfferBook, key: KeyPair) -> None:
    old = _offer(key, timestamp=NOW - CFG.max_age_s - 1)
    assert book.consider(_sign(old, key), source=_source(key), now=NOW) is offers.Verdict.STALE


def test_offer_from_the_future_is_rejected(book: offers.OfferBook, key: KeyPair) -> None:
    ahead = _offer(key, timestamp=NOW + CFG.max_skew_s + 1)
    assert book.consider(_sign(ahead, key), source=_source(key), now=NOW) is offers.Verdict.FUTURE


def test_replayed_offer_is_rejected(book: offers.OfferBook, key: KeyPair) -> None:
    first, second = _sign(_offer(key, seq=5), key), _sign(_offer(key, seq=6), key)
    assert book.consider(second, source=_source(key), now=NOW) is offers.Verdict.ACCEPTED
    assert book.consider(first, source=_source(key), now=NOW) is offers.Verdict.REPLAYED
    held = book.get(_source(key))
    assert held is not None
    assert held.seq == 6


def test_same_seq_with_other_content_is_a_replay(book: offers.OfferBook, key: KeyPair) -> None:
    book.consider(_sign(_offer(key, seq=5), key), source=_source(key), now=NOW)
    other = _sign(_offer(key, seq=5, slots_free=7), key)
    assert book.consider(other, source=_source(key), now=NOW) is offers.Verdict.REPLAYED


def test_the_same_offer_again_is_a_harmless_duplicate(book: offers.OfferBook, key: KeyPair) -> None:
    body = _sign(_offer(key), key)
    book.consider(body, source=_source(key), now=NOW)
    verdict = book.consider(body, source=_source(key), now=NOW + 0.1)
    assert verdict is offers.Verdict.DUPLICATE
    assert verdict.relay
    assert not offers.Verdict.REPLAYED.relay


def test_oversized_offer_is_rejected_before_decoding(book: offers.OfferBook, key: KeyPair) -> None:
    huge = _offer(key, addrs=tuple(f"/ip4/10.0.0.{i % 250}/tcp/{i}" for i in range(400)))
    body = _sign(huge, key)
    assert len(body) > CFG.max_size
    assert book.consider(body, source=_source(key), now=NOW) is offers.Verdict.OVERSIZE


def test_garbage_is_malformed(book: offers.OfferBook, key: KeyPair) -> None:
    assert (
        book.consider(b"\xc1 not msgpack", source=_source(key), now=NOW) is offers.Verdict.MALFORMED
    )


def test_relayed_offer_is_vouched_for_by_its_signature_alone(
    book: offers.OfferBook, key: KeyPair
) -> None:
    assert book.consider(_sign(_offer(key), key), source=None, now=NOW) is offers.Verdict.ACCEPTED
    mallory = create_new_key_pair()
    assert book.consider(_sign(_offer(key, seq=2), mallory), source=None, now=NOW) is (
        offers.Verdict.FORGED
    )


def test_offers_expire_after_missed_periods(book: offers.OfferBook, key: KeyPair) -> None:
    book.consider(_sign(_offer(key), key), source=_source(key), now=NOW)
    assert book.expire(NOW + CFG.expiry_s) == []
    gone = book.expire(NOW + CFG.expiry_s + 0.1)
    assert [o.peer_id for o in gone] == [_source(key)]
    assert book.get(_source(key)) is None


def test_live_load_replaces_gossiped_load(book: offers.OfferBook, key: KeyPair) -> None:
    book.consider(_sign(_offer(key, slots_free=3), key), source=_source(key), now=NOW)
    book.update_load(_source(key), slots_free=0, queue_len=4, now=NOW + 20)
    held = book.get(_source(key))
    assert held is not None
    assert (held.slots_free, held.queue_len) == (0, 4)
    assert book.expire(NOW + CFG.expiry_s + 1) == []  # a live answer counts as fresh


def test_verdicts_are_counted(book: offers.OfferBook, key: KeyPair) -> None:
    book.consider(b"junk", source=None, now=NOW)
    book.consider(_sign(_offer(key), key), source=None, now=NOW)
    assert book.verdicts[offers.Verdict.MALFORMED] == 1
    assert book.verdicts[offers.Verdict.ACCEPTED] == 1


# --- claims out of bounds: signed by their provider, still refused ----------------


def _model(**kw: object) -> offers.ModelOffer:
    fields: dict[str, object] = {"model_id": "m"}
    fields.update(kw)
    return offers.ModelOffer(**fields)  # type: ignore[arg-type]


def _bad_offers(key: KeyPair) -> dict[str, offers.Offer]:
    me = _source(key)
    other = str(ID.from_pubkey(create_new_key_pair().public_key))
    relay = str(ID.from_pubkey(create_new_key_pair().public_key))
    return {
        # The attack that took every node down: not a multiaddr at all.
        "not-a-multiaddr": _offer(key, addrs=("not a multiaddr",)),
        "no-peer-id": _offer(key, addrs=("/ip4/127.0.0.1/tcp/4001",)),
        # Pointing consumers (and their dials) at somebody else.
        "someone-elses-addr": _offer(key, addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{other}",)),
        "someone-elses-circuit": _offer(
            key, addrs=(f"/ip4/127.0.0.1/tcp/1/p2p/{relay}/p2p-circuit/p2p/{other}",)
        ),
        "too-many-addrs": _offer(
            key, addrs=tuple(f"/ip4/127.0.0.1/tcp/{4000 + i}/p2p/{me}" for i in range(9))
        ),
        "negative-price": _offer(key, models=(_model(price_per_s=-1),)),
        "absurd-speed": _offer(key, models=(_model(tokens_per_s=1e9),)),
        "negative-speed": _offer(key, models=(_model(tokens_per_s=-5.0),)),
        "negative-slots": _offer(key, slots_free=-3),
        "absurd-slots": _offer(key, slots_free=10**9),
        "negative-queue": _offer(key, queue_len=-1),
        "duplicate-models": _offer(key, models=(_model(), _model())),
        "empty-model-id": _offer(key, models=(_model(model_id=""),)),
        "too-many-models": _offer(key, models=tuple(_model(model_id=f"m{i}") for i in range(17))),
        "bad-sha": _offer(key, models=(_model(gguf_sha256="zz"),)),
        "bad-bid": _offer(key, models=(_model(bid_id="0xNOT"),)),
        "zero-top-p": _offer(key, models=(_model(top_p=0.0),)),
    }


@pytest.mark.parametrize("case", sorted(_bad_offers(create_new_key_pair())))
def test_a_signed_offer_with_claims_out_of_bounds_is_invalid(
    book: offers.OfferBook, key: KeyPair, case: str
) -> None:
    body = _sign(_bad_offers(key)[case], key)
    verdict = book.consider(body, source=_source(key), now=NOW)
    assert verdict is offers.Verdict.INVALID
    assert not verdict.relay
    assert len(book) == 0


def test_a_circuit_address_of_the_provider_itself_is_valid(
    book: offers.OfferBook, key: KeyPair
) -> None:
    relay = str(ID.from_pubkey(create_new_key_pair().public_key))
    circuit = f"/ip4/127.0.0.1/tcp/1/p2p/{relay}/p2p-circuit/p2p/{_source(key)}"
    body = _sign(_offer(key, addrs=(circuit,)), key)
    assert book.consider(body, source=_source(key), now=NOW) is offers.Verdict.ACCEPTED


def test_a_full_book_keeps_providers_that_keep_announcing() -> None:
    cfg = replace(CFG, max_entries=3)
    book = offers.OfferBook(cfg, verify_peer_signature, dials_peer)
    keys = [create_new_key_pair() for _ in range(4)]
    for k in keys[:3]:
        assert book.consider(_sign(_offer(k), k), source=None, now=NOW) is offers.Verdict.ACCEPTED
    # A newcomer (a Sybil flood, say) finds no room while the held ones are fresh ...
    newcomer = keys[3]
    late = _sign(_offer(newcomer, timestamp=NOW + 1), newcomer)
    assert book.consider(late, source=None, now=NOW + 1) is offers.Verdict.FULL
    assert len(book) == 3
    # ... and known providers still refresh their offers.
    again = _sign(_offer(keys[0], seq=2, timestamp=NOW + 1), keys[0])
    assert book.consider(again, source=None, now=NOW + 1) is offers.Verdict.ACCEPTED
    # Once one has gone unrefreshed for two periods, the newcomer takes its place.
    just_before = NOW + 2 * CFG.period_s - 0.5
    early = _sign(_offer(newcomer, seq=2, timestamp=just_before), newcomer)
    assert book.consider(early, source=None, now=just_before) is offers.Verdict.FULL
    later = NOW + 2 * CFG.period_s
    fresh = _sign(_offer(newcomer, seq=3, timestamp=later), newcomer)
    assert book.consider(fresh, source=None, now=later) is offers.Verdict.ACCEPTED
    assert book.get(_source(keys[1])) is None
    assert book.get(_source(keys[0])) is not None


def test_out_of_bounds_live_load_is_ignored(book: offers.OfferBook, key: KeyPair) -> None:
    book.consider(_sign(_offer(key, slots_free=3), key), source=_source(key), now=NOW)
    book.update_load(_source(key), slots_free=-7, queue_len=0, now=NOW + 1)
    held = book.get(_source(key))
    assert held is not None
    assert held.slots_free == 3


# --- every bound is inclusive: a claim at it is admitted, one past it is not ---------

SMALL = offers.Config(
    max_addrs=2,
    max_models=2,
    max_model_id_len=3,
    max_slots=3,
    max_queue=4,
    max_price_per_s=7,
    max_tokens_per_s=9.0,
    max_context_length=11,
)


def _model(**kw: object) -> offers.ModelOffer:
    return offers.ModelOffer(**{"model_id": "m", "context_length": 0, **kw})  # type: ignore[arg-type]


def _addr(key: KeyPair, port: int = 4001) -> str:
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{_source(key)}"


def _bounded(key: KeyPair, case: str, past: bool) -> dict[str, object]:
    """The offer's fields for ``case``, at its bound or (``past``) one step beyond."""
    step = 1 if past else 0
    return {
        "slots": {"slots_free": SMALL.max_slots + step},
        "queue": {"queue_len": SMALL.max_queue + step},
        "no slots": {"slots_free": 0 - step},
        "no queue": {"queue_len": 0 - step},
        "seq": {"seq": 0 - step},
        "addrs": {"addrs": tuple(_addr(key, 4001 + i) for i in range(SMALL.max_addrs + step))},
        "models": {
            "models": tuple(_model(model_id=f"m{i}") for i in range(SMALL.max_models + step))
        },
        "model id": {"models": (_model(model_id="x" * (SMALL.max_model_id_len + step)),)},
        "price": {"models": (_model(price_per_s=SMALL.max_price_per_s + step),)},
        "free": {"models": (_model(price_per_s=0 - step),)},
        "speed": {"models": (_model(tokens_per_s=SMALL.max_tokens_per_s + step),)},
        "context": {"models": (_model(context_length=SMALL.max_context_length + step),)},
        "no context": {"models": (_model(context_length=0 - step),)},
        "hot": {"models": (_model(temperature=MAX_TEMPERATURE + step / 100),)},
        "cold": {"models": (_model(temperature=0.0 - step / 100),)},
        "top_p": {"models": (_model(top_p=1.0 + step / 100),)},
        "features": {"models": (_model(features=("f",) * (MAX_FEATURES + step)),)},
        "feature": {"models": (_model(features=("f" * (MAX_FEATURE_LEN + step),)),)},
    }[case]


@pytest.mark.parametrize(
    "case",
    ["slots", "queue", "no slots", "no queue", "seq", "addrs", "models", "model id", "price",
     "free", "speed", "context", "no context", "hot", "cold", "top_p", "features", "feature"],
)  # fmt: skip
def test_a_claim_at_its_bound_is_admitted_and_one_past_it_is_not(key: KeyPair, case: str) -> None:
    for past, verdict in ((False, offers.Verdict.ACCEPTED), (True, offers.Verdict.INVALID)):
        book = offers.OfferBook(SMALL, verify_peer_signature, dials_peer)
        offer = _offer(key, **{"models": (_model(),), **_bounded(key, case, past)})
        assert book.consider(_sign(offer, key), source=_source(key), now=NOW) is verdict, past


def test_an_address_at_its_length_bound_is_admitted_and_one_longer_is_not(key: KeyPair) -> None:
    at = _addr(key, 4001)
    cfg = replace(SMALL, max_addr_len=len(at))
    for addr, verdict in (
        (at, offers.Verdict.ACCEPTED),
        (_addr(key, 40011), offers.Verdict.INVALID),
    ):
        book = offers.OfferBook(cfg, verify_peer_signature, dials_peer)
        data = _sign(_offer(key, addrs=(addr,), models=(_model(),)), key)
        assert book.consider(data, source=_source(key), now=NOW) is verdict


def test_the_size_and_the_clock_bounds_are_inclusive(key: KeyPair) -> None:
    data = _sign(_offer(key), key)
    for size, verdict in (
        (len(data), offers.Verdict.ACCEPTED),
        (len(data) - 1, offers.Verdict.OVERSIZE),
    ):
        book = offers.OfferBook(replace(CFG, max_size=size), verify_peer_signature, dials_peer)
        assert book.consider(data, source=_source(key), now=NOW) is verdict
    oldest, newest = NOW - CFG.max_age_s, NOW + CFG.max_skew_s
    for when, verdict in (
        (oldest, offers.Verdict.ACCEPTED),
        (oldest - 0.5, offers.Verdict.STALE),
        (newest, offers.Verdict.ACCEPTED),
        (newest + 0.5, offers.Verdict.FUTURE),
    ):
        book = offers.OfferBook(CFG, verify_peer_signature, dials_peer)
        data = _sign(_offer(key, timestamp=when), key)
        assert book.consider(data, source=_source(key), now=NOW) is verdict


@pytest.mark.parametrize(
    ("digest", "ok"),
    [
        ("ab" * 32, True),
        ("ab" * 31, False),
        ("AB" * 32, False),
        ("Xb" * 32, False),
        ("a" * 65, False),
    ],
)
def test_digests_are_64_lowercase_hex_characters(key: KeyPair, digest: str, ok: bool) -> None:
    book = offers.OfferBook(CFG, verify_peer_signature, dials_peer)
    data = _sign(_offer(key, models=(_model(gguf_sha256=digest),)), key)
    verdict = offers.Verdict.ACCEPTED if ok else offers.Verdict.INVALID
    assert book.consider(data, source=_source(key), now=NOW) is verdict


def test_verdicts_accumulate(book: offers.OfferBook, key: KeyPair) -> None:
    data = _sign(_offer(key), key)
    for _ in range(3):
        book.consider(data, source=_source(key), now=NOW)
    assert book.verdicts[offers.Verdict.ACCEPTED] == 1
    assert book.verdicts[offers.Verdict.DUPLICATE] == 2


@pytest.mark.parametrize(
    ("slots", "queue", "taken"),
    [(3, 4, True), (0, 0, True), (4, 0, False), (0, 5, False), (-1, 0, False), (0, -1, False)],
)
def test_load_reported_directly_is_taken_within_the_same_bounds(
    key: KeyPair, slots: int, queue: int, taken: bool
) -> None:
    book = offers.OfferBook(SMALL, verify_peer_signature, dials_peer)
    data = _sign(_offer(key, models=(_model(),)), key)
    assert book.consider(data, source=_source(key), now=NOW) is offers.Verdict.ACCEPTED
    book.update_load(_source(key), slots_free=slots, queue_len=queue, now=NOW)
    held = book.get(_source(key))
    assert held is not None
    assert ((held.slots_free, held.queue_len) == (slots, queue)) is taken
