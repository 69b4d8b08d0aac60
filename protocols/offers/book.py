"""The OfferBook: the offers a consumer currently believes, and every rule for admitting one.

It holds every rule a topic validator applies: size, signature, origin, age,
clock skew, sequence numbers and the bounds of every claim an offer makes
(addresses, models, prices, load, speed). It is pure: the caller injects
signature verification and address parsing (libp2p lives in ``p2p/``) and
passes ``now`` (wall-clock seconds), so every rule is tested with plain
values. Nothing a publisher sends can make it raise: every outcome is a
:class:`Verdict`.

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
from p2pnode.protocols.offers.messages import (
    GOSSIP_CODEC,
    MAX_FEATURE_LEN,
    MAX_FEATURES,
    MAX_TEMPERATURE,
    Offer,
)


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
    # Signed by its provider, but a claim is out of bounds: a negative price,
    # an address that does not parse or names another peer, too many models.
    INVALID = "invalid"
    # The book is full of providers that keep announcing: no room for a newcomer.
    FULL = "full"
    # The very offer already held, arriving again by another gossip path
    # while the first copy was being validated: harmless, not stored twice.
    DUPLICATE = "duplicate"

    @property
    def relay(self) -> bool:
        """Whether gossip should pass the message on."""
        # FULL: valid, only not stored here; passed on, so that a full book
        # here cannot stop a new provider's offers from spreading.
        return self in (Verdict.ACCEPTED, Verdict.DUPLICATE, Verdict.FULL)


Verifier = Callable[[str, bytes, bytes], bool]
"""``verify(peer_id, payload, signature)``: True if the peer's key signed it."""

AddrCheck = Callable[[str, str], bool]
"""``check(addr, peer_id)``: True if ``addr`` is a multiaddr that dials ``peer_id``."""


@dataclass(frozen=True, slots=True)
class Entry:
    """An accepted offer and when it arrived (local wall clock)."""

    offer: Offer
    received_at: float


class OfferBook:
    """The offers a node currently believes, newest per provider."""

    def __init__(self, cfg: Config, verify: Verifier, addr_ok: AddrCheck) -> None:
        self.cfg = cfg
        self._verify = verify
        self._addr_ok = addr_ok
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
        if verdict is Verdict.ACCEPTED:
            assert offer is not None
            if offer.peer_id not in self._entries and not self._make_room(now):
                verdict = Verdict.FULL
            else:
                self._entries[offer.peer_id] = Entry(offer, now)
        self.verdicts[verdict] += 1
        return verdict

    def _make_room(self, now: float) -> bool:
        if len(self._entries) < self.cfg.max_entries:
            return True
        stalest = min(self._entries.values(), key=lambda e: e.received_at)
        if now - stalest.received_at < 2 * self.cfg.period_s:
            return False
        del self._entries[stalest.offer.peer_id]
        return True

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
        if not self._within_bounds(offer):
            return Verdict.INVALID, None
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

    def _within_bounds(self, offer: Offer) -> bool:
        """Whether every claim of a correctly signed offer is one we may act on."""
        c = self.cfg
        if not (0 <= offer.slots_free <= c.max_slots and 0 <= offer.queue_len <= c.max_queue):
            return False
        if offer.seq < 0 or len(offer.addrs) > c.max_addrs or len(offer.models) > c.max_models:
            return False
        for addr in offer.addrs:
            if len(addr) > c.max_addr_len or not self._addr_ok(addr, offer.peer_id):
                return False
        ids = [m.model_id for m in offer.models]
        if len(set(ids)) != len(ids):
            return False
        return all(
            0 < len(m.model_id) <= c.max_model_id_len
            and 0 <= m.price_per_s <= c.max_price_per_s
            and 0.0 <= m.tokens_per_s <= c.max_tokens_per_s
            and 0 <= m.context_length <= c.max_context_length
            and (m.gguf_sha256 is None or _is_sha256(m.gguf_sha256))
            and (m.bid_id is None or _is_sha256(m.bid_id))
            and (m.temperature is None or 0.0 <= m.temperature <= MAX_TEMPERATURE)
            and (m.top_p is None or 0.0 < m.top_p <= 1.0)
            and len(m.features) <= MAX_FEATURES
            and all(0 < len(f) <= MAX_FEATURE_LEN for f in m.features)
            for m in offer.models
        )

    def update_load(self, peer_id: str, *, slots_free: int, queue_len: int, now: float) -> None:
        """Apply load the provider reported directly (a live status wins over gossip).

        Out-of-bounds figures are ignored, as they would be in an offer.
        """
        held = self._entries.get(peer_id)
        c = self.cfg
        if held is not None and 0 <= slots_free <= c.max_slots and 0 <= queue_len <= c.max_queue:
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


def _is_sha256(text: str) -> bool:
    """A 32-byte digest in lowercase hex (as offers carry GGUF hashes and bid ids)."""
    return len(text) == 64 and all(ch in "0123456789abcdef" for ch in text)
