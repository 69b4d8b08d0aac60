"""The OfferBook's admission rules, one by one, with real signatures and plain clocks."""

from __future__ import annotations

from dataclasses import replace

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from p2pnode.p2p.discovery import verify_peer_signature
from p2pnode.protocols import offers

CFG = offers.Config()
NOW = 1_800_000_000.0


def _sign(offer: offers.Offer, key: KeyPair) -> bytes:
    signed = replace(offer, signature=key.private_key.sign(offer.signing_bytes()))
    return offers.GOSSIP_CODEC.encode_body(signed)


def _offer(key: KeyPair, *, seq: int = 1, timestamp: float = NOW, **kw: object) -> offers.Offer:
    fields: dict[str, object] = {
        "peer_id": str(ID.from_pubkey(key.public_key)),
        "addrs": ("/ip4/127.0.0.1/tcp/4001",),
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
    return offers.OfferBook(CFG, verify_peer_signature)


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
