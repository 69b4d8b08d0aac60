"""Finding providers: the offer book, completed from the DHT and the providers themselves.

Gossip fills the offer book (``p2p/discovery.py``). A model gossip has not
brought yet is looked up in the DHT, and the providers it names are asked
directly for their signed offer (the status protocol); what they answer is
admitted by the same rules as a gossiped offer.
"""

from __future__ import annotations

import logging
import time

import trio

from p2pnode.errors import NetworkError, RemoteProtocolError
from p2pnode.p2p import discovery as discoverylib
from p2pnode.p2p import reputation as reputationlib
from p2pnode.p2p.dialer import Dialer
from p2pnode.p2p.histograms import LOOKUP_BUCKETS_S, Histogram
from p2pnode.p2p.host import short
from p2pnode.protocols import offers, status
from p2pnode.protocols.status import service as status_service

logger = logging.getLogger(__name__)


class Finder:
    """Offers for a model, and any peer's status, on demand."""

    def __init__(
        self,
        discovery: discoverylib.Discovery | None,
        book: offers.OfferBook,
        dialer: Dialer,
        reputation: reputationlib.Reputation,
        cfg: status.Config,
    ) -> None:
        self._discovery = discovery
        self._book = book
        self._dialer = dialer
        self._reputation = reputation
        self._cfg = cfg
        self.lookups = Histogram(LOOKUP_BUCKETS_S)  # seconds per DHT lookup

    async def find_providers(self, model_id: str) -> list[str]:
        """Peer IDs that serve ``model_id`` according to the DHT (one lookup, timed)."""
        if self._discovery is None:
            return []
        started = trio.current_time()
        try:
            return await self._discovery.find_providers(model_id)
        finally:
            self.lookups.observe(trio.current_time() - started)

    async def status_of(self, peer: str) -> status.StatusResponse:
        """Ask a peer (a peer ID we can reach, or a full multiaddr) for its status."""
        if peer.startswith("/"):
            peer = await self._dialer.connect(peer)
        stream = await self._dialer.open_stream(peer, status.PROTOCOL_ID)
        return await status_service.request(stream, self._cfg)

    async def refresh_offer(self, peer: str) -> offers.Offer | None:
        """Ask a provider directly: its signed offer and live load go into the book.

        The offer is admitted by the same rules as a gossiped one; the load
        it reports now replaces what gossip said. Returns the offer held
        afterwards (None if the peer offers nothing). Raises NetworkError
        or RemoteProtocolError if the peer cannot be asked.
        """
        answer = await self.status_of(peer)
        now = time.time()
        if answer.offer:
            self._book.consider(answer.offer, source=peer, now=now)
        load = answer.load
        self._book.update_load(peer, slots_free=load.slots_free, queue_len=load.queue_len, now=now)
        return self._book.get(peer)

    async def discover(self, model_id: str) -> list[offers.Offer]:
        """Offers for ``model_id``: the book, completed from the DHT and the providers.

        Providers the DHT names that gossip has not brought yet are asked
        directly (concurrently, each bounded by the status timeout); one that
        cannot be reached is left out.
        """
        named = await self.find_providers(model_id)
        now = trio.current_time()
        missing = [
            p for p in named if self._book.get(p) is None and not self._reputation.banned(p, now)
        ]
        # DHT records are anyone's word: ask a bounded few, not every peer named.
        missing = missing[: discoverylib.MAX_DHT_CANDIDATES]

        async def ask(peer: str) -> None:
            try:
                await self.refresh_offer(peer)
            except (NetworkError, RemoteProtocolError) as exc:
                self._reputation.record(peer, reputationlib.Offence.FAILED, trio.current_time())
                logger.info("provider %s named by the DHT did not answer: %s", short(peer), exc)

        async with trio.open_nursery() as nursery:
            for peer in missing:
                nursery.start_soon(ask, peer)
        return self._book.offers(model_id)
