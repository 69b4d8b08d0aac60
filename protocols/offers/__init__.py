"""Signed provider offers: the gossip topic and the OfferBook.

Wire format and admission rules: docs/protocols.md#offers-gossip-and-dht.

An :class:`Offer` says who serves which models, at what price and load. The
provider signs it with its libp2p peer key, so an offer proves itself however it
travels (gossipsub topic ``p2pnode/offers/1`` today; a status answer or a DHT
record as well). It is never trusted alone: a consumer confirms with the
provider before a session.
"""

from __future__ import annotations

from typing import Final

from p2pnode.protocols.offers.book import Entry, OfferBook, Verdict, Verifier
from p2pnode.protocols.offers.config import Config
from p2pnode.protocols.offers.messages import GOSSIP_CODEC, ModelOffer, Offer

TOPIC: Final = "p2pnode/offers/1"

__all__ = [
    "GOSSIP_CODEC",
    "TOPIC",
    "Config",
    "Entry",
    "ModelOffer",
    "Offer",
    "OfferBook",
    "Verdict",
    "Verifier",
]
