"""The OfferBook: the offers a consumer currently believes, and every rule for admitting one.

It holds every rule a topic validator applies: size, signature, origin, age,
clock skew and sequence numbers. It is pure: the caller injects signature
verification (libp2p keys live in ``p2p/``) and passes ``now`` (wall-clock
seconds), so every rule is tested with plain values.

Theory of operation. Each provider numbers its offers with a sequence that only
grows (it starts from the wall clock in milliseconds, so a restarted provider
keeps growing). The book accepts an offer only if it is newer than the last
one it holds from that peer, drops offers older than ``max_age_s`` or from more
than ``max_skew_s`` in the future, and forgets a provider ``expiry_s`` after
its last accepted offer: with offers every ``period_s``, that is three missed
periods plus slack.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from p2pnode.errors import RemoteProtocolError
from p2pnode.protocols.offers.config import Config
from p2pnode.protocols.offers.messages import GOSSIP_CODEC, Offer


class Verdict(enum.Enum):
    """What the book made of an offer (see ``relay`` for what gossip passes on)."""

    ACCEPTED = "accepted"
    OVERSIZE = "oversize"
    MALFORMED = "malformed"
    UNSIGNED = "unsigned"
    FORGED = "forged"  # bad signature, or published by another peer
    STALE = "stale"
    FUTURE = "future"
    REPLAYED = "replayed"  # sequence number below the last one accepted
    # The very offer already held, arriving again by another gossip path
    # while the first copy was being validated: harmless, not stored twice.
    DUPLICATE = "duplicate"

    @property
    def relay(self) -> bool:
        """Whether gossip should pass the message on."""
        return self in (Verdict.ACCEPTED, Verdict.DUPLICATE)


Verifier = Callable[[str, bytes, bytes], bool]
"""``verify(peer_id, payload, signature)``: True if the peer's key signed it."""


@dataclass(frozen=True, slots=True)
class Entry:
    """An accepted offer and when it arrived (local wall clock)."""

    offer: Offer
    received_at: float


class OfferBook:
    """The offers a node currently believes, newest per provider."""

    def __init__(self, cfg: Config, verify: Verifier) -> None:
        self.cfg = cfg
        self._verify = verify
        self._entries: dict[str, Entry] = {}
        self.verdicts: dict[Verdict, int] = dict.fromkeys(Verdict, 0)

    def consider(self, data: bytes, *, source: str | None, now: float) -> Verdict:
        """Judge an offer and keep it if accepted.

        ``source`` is the peer that originated the message (gossipsub's
        authenticated ``from``), which must be the offer's own peer; None
        where only the provider's signature vouches for the offer (an offer
        relayed by another peer outside gossip).
        """
        verdict, offer = self._judge(data, source, now)
        self.verdicts[verdict] += 1
        if verdict is Verdict.ACCEPTED:
            assert offer is not None
            self._entries[offer.peer_id] = Entry(offer, now)
        return verdict

    def _judge(self, data: bytes, source: str | None, now: float) -> tuple[Verdict, Offer | None]:
        if len(data) > self.cfg.max_size:
            return Verdict.OVERSIZE, None
        try:
            offer = GOSSIP_CODEC.decode(data)
        except RemoteProtocolError:
            return Verdict.MALFORMED, None
        assert isinstance(offer, Offer)
        if not offer.signature:
            return Verdict.UNSIGNED, None
        if (source is not None and offer.peer_id != source) or not self._verify(
            offer.peer_id, offer.signing_bytes(), offer.signature
        ):
            return Verdict.FORGED, None
        if offer.timestamp < now - self.cfg.max_age_s:
            return Verdict.STALE, None
        if offer.timestamp > now + self.cfg.max_skew_s:
            return Verdict.FUTURE, None
        held = self._entries.get(offer.peer_id)
        if held is not None and offer.seq <= held.offer.seq:
            if offer.seq == held.offer.seq and offer.signature == held.offer.signature:
                return Verdict.DUPLICATE, None
            return Verdict.REPLAYED, None
        return Verdict.ACCEPTED, offer

    def update_load(self, peer_id: str, *, slots_free: int, queue_len: int, now: float) -> None:
        """Apply load the provider reported directly (a live status wins over gossip)."""
        held = self._entries.get(peer_id)
        if held is not None:
            offer = replace(held.offer, slots_free=slots_free, queue_len=queue_len)
            self._entries[peer_id] = Entry(offer, now)

    def expire(self, now: float) -> list[Offer]:
        """Forget providers silent for ``expiry_s``; returns their last offers."""
        gone = [e.offer for e in self._entries.values() if now - e.received_at > self.cfg.expiry_s]
        for offer in gone:
            del self._entries[offer.peer_id]
        return gone

    def forget(self, peer_id: str) -> None:
        """Drop a provider at once (it failed us, or said goodbye)."""
        self._entries.pop(peer_id, None)

    def get(self, peer_id: str) -> Offer | None:
        entry = self._entries.get(peer_id)
        return entry.offer if entry else None

    def offers(self, model_id: str | None = None) -> list[Offer]:
        """Current offers, optionally only those serving ``model_id``."""
        return [
            e.offer
            for e in self._entries.values()
            if model_id is None or e.offer.serves(model_id) is not None
        ]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Offer]:
        return (e.offer for e in self._entries.values())
