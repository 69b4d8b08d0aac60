"""The consumer's side: choose a provider, hold sessions, stream requests, fail over.

Theory of operation. :meth:`Consumer.generate` runs one request for a local
caller (the OpenAI shim, ``p2pnode chat``). A model this node serves itself
runs on its own engine. Otherwise the consumer ranks the providers of the
model that the OfferBook holds (recent failures first, then a session it
already holds, then price, then measured latency, load and speed:
:func:`rank`), confirms the best with a
status call the first time, opens a session with it (or reuses one: several
requests share a session, each on its own stream), and streams the request.

Failover: a provider that fails before its first chunk is replaced by the
next in rank. One that fails mid-stream is replaced by another that
*continues* from the prompt plus the text already delivered (the engine
replays it, so greedy output continues as if nothing happened), with the
token budget that is left. The caller's ``deliver`` sees one uninterrupted
sequence of text: nothing lost, nothing repeated. A tampered or replayed
frame is a provider failure like any other: nothing of it is delivered.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from libp2p.peer.id import ID

from p2pnode.errors import (
    ChainError,
    ErrorCode,
    NetworkError,
    NoProviderError,
    RemoteProtocolError,
    SpendLimitError,
)
from p2pnode.inference import engine as enginelib
from p2pnode.p2p.discovery import verify_peer_signature
from p2pnode.p2p.host import short
from p2pnode.p2p.market import ConsumerMarket
from p2pnode.protocols import infer, session
from p2pnode.protocols.infer import service as infer_service
from p2pnode.protocols.infer.machine import ConsumerMachine
from p2pnode.protocols.infer.messages import Chunk, Done, Request, Turn
from p2pnode.protocols.offers import Offer
from p2pnode.protocols.session import service as session_service
from p2pnode.protocols.session.crypto import MAX_STREAM_ID, SessionKeys

if TYPE_CHECKING:
    from p2pnode.p2p.node import Node

logger = logging.getLogger(__name__)

Deliver = Callable[[str, int], Awaitable[None]]
"""Receives generated text (and the tokens it took), in order."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    # Providers tried for one request before giving up.
    max_attempts: int = 4
    handshake_s: float = 10.0
    # How long a failure counts against a provider in the ranking.
    failure_memory_s: float = 300.0
    infer: infer_service.Config = field(default_factory=infer_service.Config)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a request ended, as the caller reports it."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    provider: str  # the peer that finished it ("" when served locally)
    failovers: int = 0


@dataclass
class PeerStats:
    """What this consumer has seen of a provider."""

    rtt_ms: float | None = None
    failures: list[float] = field(default_factory=list)  # wall-clock times

    def recent_failures(self, now: float, memory_s: float) -> int:
        self.failures = [t for t in self.failures if now - t < memory_s]
        return len(self.failures)


def rank(
    offers: list[Offer],
    model_id: str,
    stats: dict[str, PeerStats],
    now: float,
    memory_s: float,
    held: Collection[str] = (),
) -> list[Offer]:
    """Best first: fewest recent failures, then a session already ``held``, then
    cheapest, then quickest to answer.

    A held session comes before price: moving to another provider costs a
    handshake, and in paid mode an on-chain open and a second stake. "Quickest"
    adds the measured round trip (50 ms if unknown), an expected queueing
    delay when no slot is free, and the time per token.
    """

    def key(offer: Offer) -> tuple[int, bool, int, float]:
        terms = offer.serves(model_id)
        assert terms is not None
        seen = stats.get(offer.peer_id, PeerStats())
        wait_ms = seen.rtt_ms if seen.rtt_ms is not None else 50.0
        if offer.slots_free <= 0:
            wait_ms += 500.0 * (offer.queue_len + 1)
        if terms.tokens_per_s > 0:
            wait_ms += 1000.0 / terms.tokens_per_s
        fresh = offer.peer_id not in held
        return (seen.recent_failures(now, memory_s), fresh, terms.price_per_s, wait_ms)

    return sorted((o for o in offers if o.serves(model_id) is not None), key=key)


@dataclass
class _Session:
    peer: str
    model_id: str
    session_id: bytes
    keys: SessionKeys
    streams: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def next_stream(self) -> int:
        stream_id = next(self.streams)
        if stream_id > MAX_STREAM_ID:
            raise NetworkError("session has used every stream id")
        return stream_id


class Consumer:
    """Runs requests for local callers through the network."""

    def __init__(self, node: Node, cfg: Config, market: ConsumerMarket | None = None) -> None:
        self._node = node
        self.cfg = cfg
        # Chain mode: only offers with a bid, sessions paid from our stake.
        self.market = market
        self.stats: dict[str, PeerStats] = {}
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._opening: dict[tuple[str, str], trio.Lock] = {}
        self._request_ids = itertools.count(1)
        # Time to open each session: stream, handshake and (paid) the on-chain open.
        self.open_ms: list[float] = []
        # Counters a user (and the tests) can read.
        self.counters: dict[str, int] = {
            "requests": 0,
            "failovers": 0,
            "sessions_opened": 0,
            "provider_failures": 0,
            "auth_failures": 0,
            "bad_receipts": 0,
        }

    async def generate(
        self,
        request: enginelib.Request,
        deliver: Deliver,
        *,
        only: Sequence[str] | None = None,
    ) -> Outcome:
        """Run ``request``: text goes to ``deliver`` as it is generated.

        ``only``: consider these providers (peer IDs) and no others.

        Raises :class:`NoProviderError` when no provider can serve it and
        EngineError if this node's own engine fails.
        """
        self.counters["requests"] += 1
        engine = self._node.engine_for(request.model_id)
        if engine is not None and only is None:
            return await _run_locally(engine, request, deliver)
        return await self._run_remotely(request, deliver, only)

    async def _run_remotely(
        self, request: enginelib.Request, deliver: Deliver, only: Sequence[str] | None
    ) -> Outcome:
        delivered: list[str] = []
        produced = 0

        async def on_chunk(chunk: Chunk) -> None:
            nonlocal produced
            delivered.append(chunk.text)
            produced += chunk.tokens
            await deliver(chunk.text, chunk.tokens)

        tried: set[str] = set()
        failovers = 0
        limited = 0
        last_error = "no provider offers this model"
        for _attempt in range(self.cfg.max_attempts):
            left = request.params.max_tokens - produced
            if left <= 0:  # the failed provider had already used the whole budget
                return Outcome("length", 0, produced, "", failovers)
            candidates = await self._candidates(request.model_id, tried)
            if only is not None:
                candidates = [c for c in candidates if c.peer_id in only]
            if not candidates:
                break
            peer = candidates[0].peer_id
            tried.add(peer)
            if delivered:
                failovers += 1
                self.counters["failovers"] += 1
            wire = _wire_request(request, f"r{next(self._request_ids)}", "".join(delivered), left)
            before = produced
            try:
                done = await self._request_on(peer, wire, on_chunk)
            except infer_service.Refused as exc:
                last_error = f"{short(peer)}: {exc}"
                if exc.code == ErrorCode.RATE_LIMITED:
                    limited += 1
                elif exc.code != ErrorCode.BUSY:
                    self._failed(peer, exc)
                continue
            except SpendLimitError:
                raise
            except ChainError as exc:  # the on-chain open failed: no penalty for the provider
                last_error = f"{short(peer)}: {exc}"
                logger.warning("paid session with %s not opened: %s", short(peer), exc)
                continue
            except session_service.Rejected as exc:
                last_error = f"{short(peer)}: {exc}"
                limited += exc.code == session.RejectCode.RATE_LIMITED
                continue
            except RemoteProtocolError as exc:
                self.counters["auth_failures"] += "authentication" in str(exc)
                last_error = f"{short(peer)}: {exc}"
                self._failed(peer, exc)
                continue
            except NetworkError as exc:
                last_error = f"{short(peer)}: {exc}"
                self._failed(peer, exc)
                continue
            return Outcome(
                done.finish_reason,
                max(0, done.prompt_tokens - before),
                before + done.completion_tokens,
                peer,
                failovers,
            )
        raise NoProviderError(
            f"no provider could serve {request.model_id!r} ({last_error})",
            rate_limited=limited > 0 and limited == len(tried),
        )

    def _failed(self, peer: str, exc: Exception) -> None:
        self.counters["provider_failures"] += 1
        self.stats.setdefault(peer, PeerStats()).failures.append(time.time())
        for key in [k for k in self._sessions if k[0] == peer]:
            del self._sessions[key]
        logger.warning("provider %s failed: %s", short(peer), exc)

    async def _candidates(self, model_id: str, tried: set[str]) -> list[Offer]:
        def fresh(offers: list[Offer]) -> list[Offer]:
            return [o for o in offers if o.peer_id not in tried and o.peer_id != self._node.peer_id]

        offers = fresh(self._node.offer_book.offers(model_id))
        if not offers:
            offers = fresh(await self._node.discover(model_id))
        if self.market is not None:
            market = self.market
            offers = [o for o in offers if market.terms(o, model_id) is not None]
        held = {peer for peer, model in self._sessions if model == model_id}
        return rank(offers, model_id, self.stats, time.time(), self.cfg.failure_memory_s, held)

    async def _request_on(
        self, peer: str, wire: Request, on_chunk: Callable[[Chunk], Awaitable[None]]
    ) -> Done:
        for reopen in (False, True):
            held = await self._session(peer, wire.model_id, reopen=reopen)
            stream = await self._node._open_stream(ID.from_base58(peer), infer.PROTOCOL_ID)
            machine = ConsumerMachine(
                self.cfg.infer.max_frame, held.keys, held.session_id, held.next_stream()
            )
            if self.market is not None:
                self.market.used(held.session_id)
            try:
                return await infer_service.request(
                    stream, machine, wire, on_chunk, self._acker(held), self.cfg.infer
                )
            except infer_service.Refused as exc:
                # The provider restarted, forgot the session, or its paid time is
                # over: settle it (if paid) and open another, once.
                if exc.code != ErrorCode.UNKNOWN_SESSION or reopen:
                    raise
                if self.market is not None and held.session_id in self.market.open:
                    await self.market.close(held.session_id)
        raise AssertionError("unreachable")

    async def _session(self, peer: str, model_id: str, *, reopen: bool) -> _Session:
        key = (peer, model_id)
        async with self._opening.setdefault(key, trio.Lock()):
            held = self._sessions.get(key)
            market = self.market
            if held is not None and not reopen:
                if market is None or held.session_id in market.open:
                    return held
                reopen = True  # the paid session was closed (idle) or has ended
            if held is None:
                await self._confirm(peer)
            prepare, on_approve = self._payment(peer, model_id)
            started = trio.current_time()
            stream = await self._node._open_stream(ID.from_base58(peer), session.PROTOCOL_ID)
            est = await session_service.open_session(
                stream, model_id, self.cfg.handshake_s, prepare=prepare, on_approve=on_approve
            )
            self.open_ms.append((trio.current_time() - started) * 1000)
            held = _Session(peer, model_id, est.session_id, est.keys)
            self._sessions[key] = held
            self.counters["sessions_opened"] += 1
            return held

    def _payment(
        self, peer: str, model_id: str
    ) -> tuple[
        Callable[[session.Hello], session.Hello] | None,
        Callable[[session.Hello, session.Approve], Awaitable[bytes]] | None,
    ]:
        """Chain mode: how to fill the Hello, and how to open the session on chain."""
        market = self.market
        if market is None:
            return None, None
        offer = self._node.offer_book.get(peer)
        terms = market.terms(offer, model_id) if offer is not None else None
        if terms is None:
            raise NetworkError(f"{short(peer)} has no bid for {model_id} within our price limit")
        stake = market.stake_for(terms.price_per_s)
        if stake <= 0:
            held = sum(p.stake for p in market.open.values())
            raise SpendLimitError(
                f"spend limit reached: {held} held in open sessions of {market.cfg.spend_limit}"
            )

        async def on_approve(hello: session.Hello, approve: session.Approve) -> bytes:
            return await market.open_session(peer, hello, approve, terms, stake)

        return (lambda hello: market.prepare_hello(hello, terms, stake)), on_approve

    async def _confirm(self, peer: str) -> None:
        """A status call before the first session: live load, and a measured round trip."""
        started = trio.current_time()
        await self._node.refresh_offer(peer)
        rtt = (trio.current_time() - started) * 1000.0
        seen = self.stats.setdefault(peer, PeerStats())
        seen.rtt_ms = rtt if seen.rtt_ms is None else 0.7 * seen.rtt_ms + 0.3 * rtt

    def _acker(self, held: _Session) -> Callable[[Done], bytes]:
        def ack(done: Done) -> bytes:
            receipt = done.receipt
            ok = receipt.session_id == held.session_id and verify_peer_signature(
                held.peer, receipt.signing_bytes(), receipt.signature
            )
            if not ok:
                self.counters["bad_receipts"] += 1
                logger.warning("provider %s sent a receipt it did not sign", short(held.peer))
                return b""
            signature = bytes(self._node.host.get_private_key().sign(receipt.signing_bytes()))
            if self.market is not None:
                counts = (receipt.requests, receipt.prompt_tokens, receipt.completion_tokens)
                self.market.ledger.receipt(held.session_id, counts, receipt.signature, signature)
            return signature

        return ack


async def _run_locally(
    engine: enginelib.Engine, request: enginelib.Request, deliver: Deliver
) -> Outcome:
    finish, usage = "stop", enginelib.Usage(0, 0)
    async with engine.stream(request) as chunks:
        async for chunk in chunks:
            if chunk.text:
                await deliver(chunk.text, chunk.tokens)
            if chunk.finish_reason is not None:
                finish = chunk.finish_reason
                usage = chunk.usage or usage
    return Outcome(finish, usage.prompt_tokens, usage.completion_tokens, "")


def _wire_request(
    request: enginelib.Request, request_id: str, delivered: str, max_tokens: int
) -> Request:
    p = request.params
    return Request(
        request_id=request_id,
        model_id=request.model_id,
        kind=request.kind,
        messages=tuple(Turn(role=m.role, content=m.content) for m in request.messages),
        prompt=request.prompt,
        max_tokens=max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        stop=p.stop,
        seed=p.seed,
        continuation=request.continuation + delivered,
    )
