"""The consumer's side: choose a provider, hold sessions, stream requests, fail over.

Theory of operation. :meth:`Consumer.generate` runs one request for a local
caller (the OpenAI shim, ``p2pnode chat``). A model this node serves itself
runs on its own engine. Otherwise the consumer ranks the providers of the
model that the OfferBook holds (recent failures first, then a session it
already holds, then price, then measured latency, load and speed:
:func:`rank`), confirms the best with a
status call the first time, opens a session with it (or reuses one: several
requests share a session, each on its own stream), and streams the request.

Every peer is a stranger: a provider that refuses, fails, stalls, sends a
frame that fails authentication, streams more than was asked, or takes a
paid session without serving it has the offence recorded in the node's
:class:`~p2pnode.p2p.reputation.Reputation`, and ranks behind every clean
provider while it decays. What offers claim is bounded (the OfferBook) and
checked against what this consumer measures (speed, tokens).

Failover: a provider that fails before its first chunk is replaced by the
next in rank. One that fails mid-stream is replaced by another that
*continues* from the prompt plus the text already delivered (the engine
replays it, so greedy output continues as if nothing happened), with the
token budget that is left. The caller's ``deliver`` sees one uninterrupted
sequence of text: nothing lost, nothing repeated. A tampered or replayed
frame is a provider failure like any other: nothing of it is delivered.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Final

import numpy as np
import trio
from libp2p.abc import IHost

from p2pnode.chain.failures import Unfunded
from p2pnode.chain.units import format_tokens
from p2pnode.errors import (
    ChainError,
    EngineError,
    ErrorCode,
    FundsError,
    NetworkError,
    NoProviderError,
    P2PNodeError,
    RemoteProtocolError,
    SpendLimitError,
    UnreachableError,
)
from p2pnode.inference import engine as enginelib
from p2pnode.inference.audit import CUT, Audit, ImpossibleAnswer, Scores, scores_of
from p2pnode.inference.stops import StopScan
from p2pnode.p2p.audit import Auditor, Job, RemoteScorer
from p2pnode.p2p.dialer import Dialer
from p2pnode.p2p.discovery import verify_peer_signature
from p2pnode.p2p.finder import Finder
from p2pnode.p2p.histograms import TTFT_BUCKETS_S, Histogram
from p2pnode.p2p.host import short
from p2pnode.p2p.locks import KeyedLocks
from p2pnode.p2p.market import ConsumerMarket, OfferMismatch
from p2pnode.p2p.pricing import PeerStats, rank
from p2pnode.p2p.reputation import Offence, Reputation
from p2pnode.protocols import infer, session
from p2pnode.protocols.infer import service as infer_service
from p2pnode.protocols.infer.machine import ConsumerMachine
from p2pnode.protocols.infer.messages import (
    EMBED,
    MAX_DIMENSIONS,
    MAX_PIECE,
    MAX_REQUESTS_PER_SESSION,
    MAX_SCORE_IDS,
    PAUSED,
    SCORE,
    Ack,
    Bias,
    Chunk,
    Commitment,
    Done,
    Receipt,
    Request,
    Turn,
    request_hash,
)
from p2pnode.protocols.offers import Offer, OfferBook
from p2pnode.protocols.refusal import Refusal
from p2pnode.protocols.session import service as session_service
from p2pnode.protocols.session.crypto import MAX_STREAM_ID, SessionKeys
from p2pnode.protocols.session.messages import RejectCode
from p2pnode.scopes import single_errors_ungrouped

logger = logging.getLogger(__name__)

Deliver = Callable[[str, int], Awaitable[None]]
"""Receives generated text (and the tokens it took), in order."""

SeeLogprobs = Callable[[tuple[enginelib.TokenLogprob, ...]], None]
"""Receives the logprobs a request asked for, each batch before the text it came with."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    # Providers that may fail one request (broken streams, silence, bad
    # frames) in a row, with no token delivered in between, before it is
    # given up.
    max_attempts: int = 4
    # Providers tried for one request at all: refusals are quick and cost
    # little, so a few providers that refuse everything (Sybils) cannot use
    # up a request before an honest one is tried.
    max_providers: int = 12
    handshake_s: float = 10.0
    # No new provider is tried once a request has spent this long trying
    # (the answer in progress, if any, goes on): a dozen providers that each
    # stall to just within the handshake bound cannot hold a request for minutes.
    try_budget_s: float = 60.0
    # A provider that answered busy is asked again once every other has been
    # tried, after a pause that doubles from the first to the last of these
    # (all within try_budget_s): a full provider frees a slot within seconds.
    busy_backoff_s: tuple[float, float] = (0.25, 4.0)
    # When every provider left went away during a request (refused the dial,
    # dropped the connection), the request waits this long for one to be
    # back (a restart announces itself within a second or so) before it
    # fails: what a request whose providers are all down pays in time to an
    # error, for not failing when one of them is only restarting.
    rejoin_wait_s: float = 3.0
    # A provider may stream at most this many tokens more than asked for
    # (batching and stop sequences round up), and this many bytes per token.
    token_slack: int = 16
    max_bytes_per_token: int = 256
    # The whole answer must arrive within first_chunk_s plus this per token
    # asked for: a provider cannot trickle one token per chunk gap forever.
    max_s_per_token: float = 2.0
    # Providers whose measured round trip and speed are remembered.
    max_measured: int = 4096
    infer: infer_service.Config = field(default_factory=infer_service.Config)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a request ended, as the caller reports it."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    provider: str  # the peer that finished it ("" when served locally)
    failovers: int = 0
    # An embedding request's answer: a float32 little-endian vector per input.
    vectors: tuple[bytes, ...] = ()


@dataclass
class Counters:
    """What this node's requests met on the network (read them in ``Node.metrics()``)."""

    requests: int = 0
    failovers: int = 0
    sessions_opened: int = 0
    provider_failures: int = 0  # failures counted against a provider
    provider_refusals: int = 0  # refusals (busy, not allowed, ...): no failure
    auth_failures: int = 0  # frames that failed authentication
    bad_receipts: int = 0  # receipts the provider did not sign
    broken_promises: int = 0  # answers beyond what was asked or offered
    paid_not_served: int = 0  # paid sessions a provider took and did not serve
    caught: int = 0  # providers an audit caught cheating
    outvoted_auditors: int = 0  # auditors two others contradicted
    cross_checks: int = 0  # answers cut short by a failover, audited
    providers_tried: int = 0  # attempts: a request's first provider, and each failover
    prompt_tokens: int = 0  # of requests that ended, here or on the network
    completion_tokens: int = 0


@dataclass
class _Session:
    peer: str
    model_id: str
    session_id: bytes
    keys: SessionKeys
    streams: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    paid: bool = False
    # Whether the provider answered a request in full in this session.
    served: bool = False
    # Requests in it at once: a provider refuses more (busy), so the rest wait here.
    running: trio.Semaphore = field(
        default_factory=lambda: trio.Semaphore(MAX_REQUESTS_PER_SESSION)
    )

    def next_stream(self) -> int:
        stream_id = next(self.streams)
        # Reached after 2**32 requests on one session, which no user sees: the
        # provider refuses an id past it anyway (protocols/infer/machine.py).
        if stream_id > MAX_STREAM_ID:  # pragma: no mutate
            raise NetworkError("session has used every stream id")  # pragma: no mutate
        return stream_id


class Consumer:
    """Runs requests for local callers through the network."""

    def __init__(
        self,
        cfg: Config,
        *,
        host: IHost,
        book: OfferBook,
        finder: Finder,
        dialer: Dialer,
        reputation: Reputation,
        local: Callable[[str], enginelib.Engine | None] = lambda _model: None,
        market: ConsumerMarket | None = None,
        auditor: Auditor | None = None,
    ) -> None:
        """``local(model)`` is this node's own engine for a model (run here, not sent)."""
        self._host = host
        self._peer_id = str(host.get_id())
        self._book = book
        self._finder = finder
        self._dialer = dialer
        self._local = local
        self.cfg = cfg
        # Chain mode: only offers with a bid, sessions paid from our stake.
        self.market = market
        self.reputation = reputation
        # Audits a share of the answers (p2p/audit.py); None: none are.
        self.auditor = auditor
        # Picks the remote auditor among those that may audit (tests pick their own).
        self.choose_auditor: Callable[
            [Sequence[tuple[str, enginelib.ModelInfo]]], tuple[str, enginelib.ModelInfo]
        ] = secrets.choice
        # Measured round trips and speeds, least recently used forgotten first.
        self.stats: collections.OrderedDict[str, PeerStats] = collections.OrderedDict()
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._opening: KeyedLocks[tuple[str, str]] = KeyedLocks()  # sessions being opened
        self._request_ids = itertools.count(1)
        # Time to open each session: stream, handshake and (paid) the on-chain open.
        self.open_ms: list[float] = []
        self.counters = Counters()
        # From a request's start to its first text, here or on the network.
        self.time_to_first_token = Histogram(TTFT_BUCKETS_S)

    async def generate(
        self,
        request: enginelib.Request,
        deliver: Deliver,
        *,
        only: Sequence[str] | None = None,
        logprobs: SeeLogprobs | None = None,
    ) -> Outcome:
        """Run ``request``: text goes to ``deliver`` as it is generated.

        ``only``: consider these providers (peer IDs) and no others.
        ``logprobs``: receives what ``request.params.top_logprobs`` asked for.

        Raises :class:`NoProviderError` when no provider can serve it and
        EngineError if this node's own engine fails.
        """
        self.counters.requests += 1
        started, first = trio.current_time(), True

        async def timed(text: str, tokens: int) -> None:
            nonlocal first
            if first:
                first = False
                self.time_to_first_token.observe(trio.current_time() - started)
            await deliver(text, tokens)

        engine = self._local(request.model_id)
        if engine is not None and only is None:
            info = enginelib.info_of(engine, request.model_id)
            missing = request.needs() - set(info.features if info else ())
            if missing:  # never an answer that quietly ignores what was asked
                fields = enginelib.fields_of(missing)
                raise EngineError(f"this node's engine for the model cannot honour {fields}")
            outcome = await _run_locally(engine, request, timed, logprobs)
        else:
            outcome = await self._run_remotely(request, timed, only, logprobs)
        self.counters.prompt_tokens += outcome.prompt_tokens
        self.counters.completion_tokens += outcome.completion_tokens
        return outcome

    async def _run_remotely(
        self,
        request: enginelib.Request,
        deliver: Deliver,
        only: Sequence[str] | None,
        logprobs: SeeLogprobs | None,
    ) -> Outcome:
        delivered: list[str] = []  # every provider's text: what the next one continues
        # ... and its token ids, while every chunk carried its own (None after one did not).
        delivered_ids: list[int] | None = []
        produced = 0
        # Stop strings across providers (docs/protocols.md#stop-strings): the
        # caller gets what the scan lets through.
        scan = StopScan(request.params.stop)
        unsent_tokens = 0  # of text held back, told with the text that follows

        def stopped() -> bool:  # read anew after each await (on_chunk sets it)
            return scan.stopped

        async def on_chunk(chunk: Chunk) -> None:
            nonlocal produced, unsent_tokens, delivered_ids
            delivered.append(chunk.text)
            if delivered_ids is not None and len(chunk.token_ids) == chunk.tokens:
                delivered_ids += chunk.token_ids
            else:
                delivered_ids = None
            streamed.add(chunk)
            produced += chunk.tokens
            if logprobs is not None and chunk.logprob_tokens and not scan.stopped:
                logprobs(enginelib.entries_from_wire(chunk.logprob_tokens))
            text = scan.feed(chunk.text)
            if text:
                await deliver(text, chunk.tokens + unsent_tokens)
                unsent_tokens = 0
            else:
                unsent_tokens += chunk.tokens
            if scan.stopped and self.market is None:
                # Free: leave at once (the reset stops the generation). Paid,
                # the rest is read and dropped until Done, which is acknowledged:
                # an answer left unacknowledged would cost the session
                # (docs/protocols.md#stop-strings).
                raise _Stopped

        tried: set[str] = set()
        failures = failovers = 0
        # A paid session that ended under us may be reopened once per request.
        reopened: set[str] = set()
        last_error = ""
        # The try budget counts time without progress: tokens delivered start it anew.
        trying_since, progress = trio.current_time(), 0
        paused_with: str | None = None  # the provider that paused the answer, if one did
        # Providers that answered busy, or could not be reached at all, asked
        # again once no other is left; each counts against it once per
        # request, however often it is asked.
        busy: set[str] = set()
        busy_counted: set[str] = set()
        unreached: set[str] = set()  # out of reach once: the second time is a failure
        # Providers that failed us by going away (a refused dial, a cut
        # connection): with churn, the providers not yet tried may all be
        # down, and one that restarts is asked again.
        gone = _Gone()
        # Every provider asked, and those that asked us to slow down: all of
        # them did, and the caller is told to slow down too (429).
        asked: set[str] = set()
        slow_down: set[str] = set()
        backoff = self.cfg.busy_backoff_s[0]
        attempts = 0
        while failures < self.cfg.max_attempts and len(tried) < self.cfg.max_providers:
            if stopped():  # paid, and its provider failed after the stop string: done
                return Outcome("stop", 0, produced, "", failovers)
            if produced > progress:
                # Tokens delivered: the request is not stuck. Its try budget
                # and its failed attempts count anew (with churn, one answer
                # may outlive several providers).
                trying_since, progress = trio.current_time(), produced
                failures = 0
            # A deadline, not "time spent" compared with the budget: a wait cut
            # to the budget's float remainder (2e-16 s) would not move the clock.
            give_up_at = trying_since + self.cfg.try_budget_s
            if attempts and trio.current_time() >= give_up_at:
                last_error = f"{last_error}; gave up after {self.cfg.try_budget_s:g} s of trying"
                break
            left = request.params.max_tokens - produced
            if left <= 0:  # the failed provider had already used the whole budget
                if held := scan.flush():
                    await deliver(held, unsent_tokens)
                return Outcome("length", 0, produced, "", failovers)
            for peer in gone.back(self._offer_seq, lambda p: self._may_rejoin(p, reopened)):
                tried.discard(peer)
            # The DHT is asked at most once per request, not on every busy round.
            candidates, why_none = await self._candidates(
                request.model_id, tried, discover=not attempts, needs=request.needs()
            )
            if only is not None:
                candidates = [c for c in candidates if c.peer_id in only]
                why_none = why_none or "none of the providers asked for offers this model"
            if not candidates:
                now = trio.current_time()
                gone.forget(self._unaskable)
                rejoin_by = gone.at + self.cfg.rejoin_wait_s if gone.went else now
                if not busy and now >= rejoin_by:
                    if not tried:  # nobody was asked: say why not
                        last_error = why_none
                    break
                if busy:
                    # Everyone left is busy (or was out of reach): wait, then ask again.
                    await trio.sleep_until(min(now + backoff, give_up_at))
                    backoff = min(backoff * 2, self.cfg.busy_backoff_s[1])
                    tried -= busy
                    busy.clear()
                else:
                    # Everyone left went away during this request: one that
                    # restarts is asked as soon as its new offer arrives.
                    await trio.sleep_until(min(now + _REJOIN_POLL_S, give_up_at, rejoin_by))
                continue
            # A provider whose session with us runs all it takes at once comes
            # after those free now (the request would wait its turn there).
            candidates.sort(key=lambda c: self._session_full(c.peer_id, request.model_id))
            peer = candidates[0].peer_id
            if paused_with in {c.peer_id for c in candidates}:
                peer = paused_with
            paused = peer == paused_with
            paused_with = None
            tried.add(peer)
            asked.add(peer)
            attempts += 1
            self.counters.providers_tried += 1
            if delivered and not paused:
                failovers += 1
                self.counters.failovers += 1
            wire = wire_request(
                request, f"r{next(self._request_ids)}", "".join(delivered), left, delivered_ids
            )
            before, seq = produced, self._offer_seq(peer)
            # What this provider streams, as it streams it (the ids too): its
            # answer's audit, or if it fails before its Done, a cross-check.
            streamed = _Streamed()
            try:
                try:
                    done = await self.request_on(peer, wire, on_chunk, reopened)
                except (RemoteProtocolError, NetworkError):
                    self._cross_check(peer, wire, streamed)
                    raise
            except _Stopped:  # the answer reached a stop string; the stream was reset
                self.reputation.served(peer, trio.current_time())
                return Outcome("stop", 0, produced, peer, failovers)
            except OfferMismatch as exc:  # its signed offer and the chain disagree
                last_error = f"{short(peer)}: {exc}"
                if exc.stale:  # re-priced since its last offer: ask it afresh next time
                    self._book.forget(peer)
                else:
                    await self._offence(peer, request.model_id, Offence.BROKEN_PROMISE, exc)
                continue
            except Unfunded as exc:  # our wallet, not the provider
                if not exc.ether or not exc.tokens:  # nobody could be paid
                    raise FundsError(str(exc)) from exc
                last_error = f"{short(peer)}: {exc}"  # a cheaper provider may be
                continue
            except ChainError as exc:  # the on-chain open failed (nothing was sent)
                last_error = f"{short(peer)}: {exc}"
                # Only a revert the provider caused counts against it; our own
                # RPC, gas or balance trouble does not.
                if any(reason in str(exc) for reason in _PROVIDER_REVERTS):
                    await self._offence(peer, request.model_id, Offence.REFUSED, exc)
                else:
                    logger.warning(
                        "paid session with %s not opened: %s",
                        short(peer),
                        exc,
                        extra={"peer": peer},
                    )
                continue
            except RemoteProtocolError as exc:
                last_error = f"{short(peer)}: {exc}"
                if exc.code == ErrorCode.TRUNCATED and not self._dialer.connected(peer):
                    # The answer ended with the whole connection: the provider
                    # went away (stopped, restarted, lost its network), which
                    # is a failure, not a breach of the protocol.
                    gone.add(peer, seq, trio.current_time())
                    failures += await self._offence(peer, request.model_id, Offence.FAILED, exc)
                    continue
                offence = offence_of_violation(exc)
                failures += await self._offence(peer, request.model_id, offence, exc)
                continue
            except UnreachableError as exc:
                last_error = f"{short(peer)}: {exc}"
                again = peer not in unreached and produced == before
                if not again or self._unserved_paid(peer, request.model_id):
                    # Out of reach twice, gone mid-answer, or after taking a
                    # stake: a failure.
                    if not self._dialer.connected(peer):
                        gone.add(peer, seq, trio.current_time())
                    failures += await self._offence(peer, request.model_id, Offence.FAILED, exc)
                    continue
                # Not reached in time, once: our own congestion is as likely
                # as the peer (the whole node slows down when its CPU is
                # short). Like busy: no failed attempt, no session dropped,
                # asked again once no other provider is left, counted once.
                unreached.add(peer)
                busy.add(peer)
                if peer not in busy_counted:
                    busy_counted.add(peer)
                    await self._offence(peer, request.model_id, Offence.REFUSED, exc)
                continue
            except NetworkError as exc:
                last_error = f"{short(peer)}: {exc}"
                if not self._dialer.connected(peer):  # went away (not: went silent)
                    gone.add(peer, seq, trio.current_time())
                failures += await self._offence(peer, request.model_id, Offence.FAILED, exc)
                continue
            if isinstance(done, Refusal):
                last_error = f"{short(peer)}: {done}"
                now = trio.current_time()
                self._cross_check(peer, wire, streamed)
                streamed_any = produced != before
                if done.is_one_of(*_SLOW_DOWN):
                    slow_down.add(peer)
                elif (
                    done.is_one_of(*_BUSY)
                    and not streamed_any
                    and not self.reputation.banned(peer, now)
                ):
                    # (banned: it said busy after our on-chain open, see _open)
                    busy.add(peer)
                    if peer not in busy_counted:
                        busy_counted.add(peer)
                        await self._offence(peer, request.model_id, Offence.REFUSED, done)
                elif (
                    done.is_one_of(*_REOPEN_CODES)
                    and peer not in reopened
                    and not self._unserved_paid(peer, request.model_id)
                ):
                    # Its paid time ran out mid-answer (or it restarted, or our
                    # last Ack did not reach it): a new session with the same
                    # provider continues the answer.
                    reopened.add(peer)
                    tried.discard(peer)
                    await self._drop_session(peer, request.model_id)
                else:
                    offence = offence_of_refusal(done, streamed_any)
                    failures += await self._offence(peer, request.model_id, offence, done)
                continue
            self.reputation.served(peer, trio.current_time())
            if wire.kind == EMBED:
                return Outcome("stop", done.prompt_tokens, 0, peer, failovers, done.vectors)
            if self.auditor is not None:
                self.auditor.consider(Job(peer, wire, done, "".join(streamed.text)))
            if stopped():  # paid: the provider's Done came after the stop string
                prompt = max(0, done.prompt_tokens - before)
                return Outcome("stop", prompt, before + done.completion_tokens, peer, failovers)
            going_on = done.finish_reason == PAUSED and produced < request.params.max_tokens
            if not going_on and (held := scan.flush()):
                await deliver(held, unsent_tokens)
            if going_on:
                # A paid provider paused to have the answer so far acknowledged
                # (done): the same provider continues it in a new request.
                paused_with = peer
                tried.discard(peer)
                continue
            return Outcome(
                "length" if done.finish_reason == PAUSED else done.finish_reason,
                max(0, done.prompt_tokens - before),
                before + done.completion_tokens,
                peer,
                failovers,
            )
        raise NoProviderError(
            f"no provider could serve {request.model_id!r} ({last_error})",
            rate_limited=bool(asked) and asked == slow_down,
        )

    def held_sessions(self) -> list[dict[str, object]]:
        """The sessions this node holds now, as JSON for the dashboard."""
        return [
            {
                "peer_id": held.peer,
                "model_id": held.model_id,
                "session_id": held.session_id.hex(),
                "paid": held.paid,
                "served": held.served,
            }
            for held in self._sessions.values()
        ]

    def _cross_check(self, peer: str, wire: Request, streamed: _Streamed) -> None:
        """A provider failed before its Done, after streaming part of the answer:
        audit what it streamed (always, not at the rate: docs/architecture.md#audits).

        Its chunks carried the ids and log-probabilities; no signed commitment
        covers them (the session's keys authenticated them), so the evidence
        of a catch this way is the measurement alone.
        """
        if self.auditor is None or not streamed.ids:
            return
        offer = self._book.get(peer)
        terms = offer.serves(wire.model_id) if offer is not None else None
        if terms is None or not terms.gguf_sha256:
            return
        ids, tokens = tuple(streamed.ids), len(streamed.ids)
        commitment = Commitment(
            request_hash=request_hash(wire),
            gguf_sha256=terms.gguf_sha256,
            completion_tokens=tokens,
            token_ids=ids,
            logprobs=tuple(streamed.logprobs),
        )
        receipt = Receipt(
            session_id=b"", requests=0, prompt_tokens=0, completion_tokens=tokens,
            commitment=commitment,
        )  # fmt: skip
        done = Done(finish_reason=CUT, prompt_tokens=0, completion_tokens=tokens, receipt=receipt)
        self.counters.cross_checks += int(
            self.auditor.consider(Job(peer, wire, done, "".join(streamed.text)), always=True)
        )

    def _offer_seq(self, peer: str) -> int:
        offer = self._book.get(peer)
        return offer.seq if offer is not None else -1

    def _may_rejoin(self, peer: str, reopened: set[str]) -> bool:
        """Whether a provider that went away and is back may be asked again.

        Paid, asking it again opens a new session on chain: that counts as the
        request's one reopening with it (``reopened``), so a provider that
        serves a little, drops its connection and announces itself again cannot
        make one request open session after session.
        """
        if self.market is None:
            return True
        if peer in reopened:
            return False
        reopened.add(peer)
        return True

    def _unaskable(self, peer: str) -> bool:
        """Banned, or caught by an audit: not asked, however it announces itself."""
        caught = self.auditor is not None and self.auditor.is_caught(peer)
        return caught or self.reputation.banned(peer, trio.current_time())

    def _unserved_paid(self, peer: str, model_id: str) -> bool:
        """Whether our session with ``peer`` is paid and has not yet served one request."""
        held = self._sessions.get((peer, model_id))
        return held is not None and held.paid and not held.served

    async def _offence(
        self, peer: str, model_id: str, offence: Offence, why: Exception | Refusal
    ) -> int:
        """Record what ``peer`` did; returns 1 if it counts as a failed attempt.

        A failure ends our sessions with it: paid ones are released at once
        (a served one is closed on chain now, not at the idle close; one never
        served is left until its end plus the claim window, so the provider is
        paid nothing for it), and a paid session that failed before serving a
        single request is counted as taken and not served.
        """
        if offence is not Offence.REFUSED and self._unserved_paid(peer, model_id):
            offence = Offence.PAID_NO_SERVICE
        score = self.reputation.record(peer, offence, trio.current_time())
        failed = offence is not Offence.REFUSED
        if offence is Offence.AUTH:
            self.counters.auth_failures += 1
        elif offence is Offence.BROKEN_PROMISE:
            self.counters.broken_promises += 1
        elif offence is Offence.PAID_NO_SERVICE:
            self.counters.paid_not_served += 1
        if failed:
            self.counters.provider_failures += 1
        else:
            self.counters.provider_refusals += 1
        if failed:
            for key in [k for k in self._sessions if k[0] == peer]:
                await self._drop_session(*key)
        logger.warning(
            "provider %s: %s (%s; score %.1f)",
            short(peer),
            why,
            offence.value,
            score,
            extra={"peer": peer},
        )
        return int(failed)

    async def caught(self, job: Job, verdict: Audit) -> None:
        """An audit found ``job``'s provider cheating: never ask it again, end our
        sessions with it (paid: closed on chain now), and keep the evidence."""
        self.counters.caught += 1
        self.reputation.record(job.peer, Offence.CHEATED, trio.current_time())
        receipt = job.done.receipt
        if self.market is not None:
            measured = verdict.measured()
            self.market.ledger.evidence(
                job.peer,
                receipt.session_id,
                int(time.time()),
                "; ".join(str(f) for f in measured["findings"]),  # type: ignore[attr-defined]
                receipt.signing_bytes(),
                receipt.signature,
                json.dumps(measured),
            )
        for key in [k for k in self._sessions if k[0] == job.peer]:
            await self._drop_session(*key)

    async def _drop_session(self, peer: str, model_id: str) -> None:
        held = self._sessions.pop((peer, model_id), None)
        if held is not None and self.market is not None and held.session_id in self.market.open:
            await self.market.release(held.session_id)

    def _measured(self, peer: str) -> PeerStats:
        seen = self.stats.get(peer)
        if seen is None:
            seen = self.stats[peer] = PeerStats()
            while len(self.stats) > self.cfg.max_measured:
                self.stats.popitem(last=False)
        self.stats.move_to_end(peer)
        return seen

    async def _candidates(
        self,
        model_id: str,
        tried: set[str],
        *,
        discover: bool = True,
        needs: frozenset[str] = frozenset(),
    ) -> tuple[list[Offer], str]:
        """The providers to try next, best first, and (when there are none) why.

        ``discover``: when the OfferBook has no fresh offer, look the model up
        in the DHT (and ask the providers it names). ``needs``: features
        (inference/engine.py:FEATURES) the provider's offer must list.
        """

        def fresh(offers: list[Offer]) -> list[Offer]:
            return [o for o in offers if o.peer_id not in tried and o.peer_id != self._peer_id]

        seen = fresh(self._book.offers(model_id))
        if not seen and discover:
            seen = fresh(await self._finder.discover(model_id))
        able = [o for o in seen if (t := o.serves(model_id)) and needs <= set(t.features)]
        if seen and not able:
            return [], (
                f"{len(seen)} provider{'s' if len(seen) != 1 else ''} of this model seen, "
                f"none able to honour {enginelib.fields_of(needs)}"
            )
        offers = seen = able
        if self.market is not None:
            market = self.market
            offers = [o for o in offers if market.terms(o, model_id) is not None]
        now = trio.current_time()
        banned = self.reputation.banned
        caught = self.auditor.is_caught if self.auditor is not None else lambda _peer: False
        offers = [o for o in offers if not banned(o.peer_id, now) and not caught(o.peer_id)]
        if not offers:
            return [], self._why_none(model_id, seen, now)
        scores = {o.peer_id: self.reputation.score(o.peer_id, now) for o in offers}
        held = {peer for peer, model in self._sessions if model == model_id}
        return rank(offers, model_id, self.stats, scores, held, str(self._host.get_id())), ""

    def _why_none(self, model_id: str, seen: list[Offer], now: float) -> str:
        """Why none of the providers ``seen`` offering ``model_id`` can be asked: what a
        user can act on (fund, raise --max-price, wait for a bid), not just "none"."""
        if not seen:
            peers = len(self._host.get_connected_peers())
            return f"no provider offers this model ({peers} peers connected; none announces it)"
        parts = [f"{len(seen)} provider{'s' if len(seen) != 1 else ''} seen"]
        caught = self.auditor.is_caught if self.auditor is not None else lambda _peer: False
        # Caught by an audit first (what it did is known), then banned for the rest.
        uncaught = [o for o in seen if not caught(o.peer_id)]
        if len(uncaught) < len(seen):
            count = "all" if not uncaught else str(len(seen) - len(uncaught))
            parts.append(f"{count} caught by audits serving other than the model")
        rest = [o for o in uncaught if not self.reputation.banned(o.peer_id, now)]
        if len(rest) < len(uncaught):
            banned = "all" if not rest else str(len(uncaught) - len(rest))
            parts.append(f"{banned} banned for misbehaviour")
        # A provider not banned is left out only when it would not be paid.
        if rest and self.market is not None:
            why = self.market.why_not(rest, model_id)
            parts.append(f"of the rest, {why}" if len(rest) < len(seen) else why)
        return "; ".join(parts)

    async def request_on(
        self,
        peer: str,
        wire: Request,
        on_chunk: Callable[[Chunk], Awaitable[None]],
        reopened: set[str],
    ) -> Done | Refusal:
        """One request on ``peer``: its Done, or its refusal of the session or the request.

        A session it forgot is reopened here once per request (``reopened``
        says whether that happened already), so a provider that keeps
        forgetting cannot make a request open a paid session each time.
        """
        guard = ReplyGuard(wire.max_tokens, self.cfg, on_chunk, wire.top_logprobs)
        offer = self._book.get(peer)
        terms = offer.serves(wire.model_id) if offer is not None else None
        weights = terms.gguf_sha256 if terms is not None else None

        def checked(done: Done) -> None:
            # Before the Ack: an answer whose commitment is false is not acknowledged.
            guard.check_done(done)
            if wire.kind == SCORE:
                check_scored(done, wire, weights)
            else:
                check_commitment(done, wire, weights)
            check_vectors(done, wire)

        for reopen in (False, True):
            held = await self._session(peer, wire.model_id, reopen=reopen)
            if isinstance(held, Refusal):
                return held
            async with held.running:
                done = await self._run_on(held, peer, wire, guard, checked)
            if isinstance(done, Refusal):
                # The provider restarted, forgot the session, its paid time is
                # over, or our last Ack did not reach it: settle it (if paid)
                # and open another, once, unless text was delivered, which the
                # caller's failover continues from.
                again = done.is_one_of(*_REOPEN_CODES) and not (reopen or guard.tokens)
                if not again or peer in reopened:
                    return done
                reopened.add(peer)
                await self._drop_session(peer, wire.model_id)
                continue
            held.served = True
            if guard.tokens and guard.elapsed_s > 0:
                speed = guard.tokens / guard.elapsed_s
                self._check_speed(peer, wire.model_id, speed, guard.tokens)
            return done
        raise AssertionError("unreachable")  # pragma: no mutate

    def _session_full(self, peer: str, model_id: str) -> bool:
        """Whether our session with ``peer`` runs as many requests as it takes at once."""
        held = self._sessions.get((peer, model_id))
        return held is not None and held.running.value == 0

    async def _run_on(
        self,
        held: _Session,
        peer: str,
        wire: Request,
        guard: ReplyGuard,
        checked: Callable[[Done], None],
    ) -> Done | Refusal:
        """One infer stream in ``held``: the request, its answer, its Ack."""
        stream = await self._dialer.open_stream(peer, infer.PROTOCOL_ID)
        machine = ConsumerMachine(
            self.cfg.infer.max_frame, held.keys, held.session_id, held.next_stream()
        )
        market = self.market
        if market is not None:
            market.begin(held.session_id)
        try:
            with trio.fail_after(guard.deadline_s):
                return await infer_service.request(
                    stream,
                    machine,
                    wire,
                    guard.deliver,
                    self._acker(held, checked),
                    self.cfg.infer,
                )
        except trio.TooSlowError as exc:
            raise NetworkError(f"no whole answer within {guard.deadline_s:g} s") from exc
        finally:
            if market is not None:
                market.end(held.session_id)

    async def misled(self, peer: str) -> None:
        """An auditor whose scores two others contradicted: a broken promise."""
        self.counters.outvoted_auditors += 1
        why = FalseCommitment("sent scores two other auditors contradict")
        await self._offence(peer, "", Offence.BROKEN_PROMISE, why)

    async def remote_scorer(
        self,
        sha: str,
        peers: frozenset[str],
        _stack: object = None,
        needs: frozenset[str] = frozenset(),
    ) -> RemoteScorer | None:
        """Another provider of the GGUF ``sha`` to audit with: none of ``peers``,
        paid with none of their wallets, never banned or caught, with the
        features ``needs`` names; chosen at random, so that a cheater cannot
        tell who will audit it."""
        now = trio.current_time()
        caught = self.auditor.is_caught if self.auditor is not None else lambda _peer: False
        wallets = {
            (offer.wallet or "").lower()
            for peer in peers
            if (offer := self._book.get(peer)) is not None and offer.wallet
        }
        choices: list[tuple[str, enginelib.ModelInfo]] = []
        for offer in self._book.offers():
            if offer.peer_id in peers or offer.peer_id == self._peer_id:
                continue
            if self.reputation.banned(offer.peer_id, now) or caught(offer.peer_id):
                continue
            if offer.wallet and offer.wallet.lower() in wallets:
                continue
            for terms in offer.models:
                if terms.gguf_sha256 != sha or not needs <= set(terms.features):
                    continue
                if self.market is not None and self.market.terms(offer, terms.model_id) is None:
                    continue
                info = enginelib.ModelInfo(model_id=terms.model_id, gguf_sha256=sha)
                choices.append((offer.peer_id, info))
                break
        if not choices:
            return None
        peer, info = self.choose_auditor(choices)
        return RemoteScorer(peer, info, self.score_on)

    async def score_on(
        self, peer: str, model_id: str, request: enginelib.Request, ids: Sequence[int]
    ) -> Scores:
        """``peer``'s scores of ``ids`` as its model's answer to ``request``: a score
        request (docs/protocols.md#score-requests), in a session like any request.

        Raises ImpossibleAnswer when the auditor says no run of the model gives
        these ids, EngineError when it could not score them (what it did
        wrong, if anything, counts against it like any failed request).
        """
        wire = replace(
            wire_request(request, f"s{next(self._request_ids)}", "", request.params.max_tokens),
            model_id=model_id,
            kind=SCORE,
            score_kind=request.kind,
            score_ids=tuple(ids),
        )

        async def no_text(_chunk: Chunk) -> None:
            raise _Overrun("streamed text for a score request")

        try:
            done = await self.request_on(peer, wire, no_text, set())
        except RemoteProtocolError as exc:
            await self._offence(peer, model_id, offence_of_violation(exc), exc)
            raise EngineError(f"auditor {short(peer)}: {exc}") from exc
        except NetworkError as exc:
            await self._offence(peer, model_id, Offence.FAILED, exc)
            raise EngineError(f"auditor {short(peer)}: {exc}") from exc
        except P2PNodeError as exc:  # our wallet or the chain: nobody's fault here
            raise EngineError(f"auditor {short(peer)}: {exc}") from exc
        if isinstance(done, Refusal):
            # BAD_FIELD: past its context (smaller than the audited one's):
            # nobody's fault.
            if done.session or not done.is_one_of(ErrorCode.BAD_FIELD):
                await self._offence(peer, model_id, offence_of_refusal(done, False), done)
            raise EngineError(f"auditor {short(peer)}: {done}")
        self.reputation.served(peer, trio.current_time())
        commitment = done.receipt.commitment
        assert commitment is not None  # (check_scored)
        scored = commitment.scored
        assert scored is not None
        if scored.impossible:
            raise ImpossibleAnswer(f"{scored.impossible} (auditor {short(peer)})")
        return scores_of(commitment, scored)

    def _check_speed(self, peer: str, model_id: str, speed: float, tokens: int) -> None:
        """Measure a provider's speed (ranking uses it from now on); log a claim far above it."""
        self._measured(peer).measured_speed(speed)
        offer = self._book.get(peer)
        terms = offer.serves(model_id) if offer is not None else None
        # Only long answers say much about speed (the first token waits for
        # the prompt); a claim 4x what it delivers is no rounding error.
        # Ranking goes by the measurement from now on; no score: a provider
        # busy with others is slower than it measured itself alone.
        if terms is not None and tokens >= 64 and terms.tokens_per_s > 4 * speed:
            logger.info(
                "provider %s claims %.0f tokens/s, delivered %.0f",
                short(peer), terms.tokens_per_s, speed,
            )  # fmt: skip

    async def _session(self, peer: str, model_id: str, *, reopen: bool) -> _Session | Refusal:
        key = (peer, model_id)
        async with self._opening.hold(key):
            held = self._sessions.get(key)
            market = self.market
            if held is not None and not reopen:
                if market is None or market.usable(held.session_id):
                    return held
                reopen = True  # the paid session was closed (idle) or has ended
            if held is None and market is None:
                return await self._open_beside_confirm(peer, model_id)
            if held is None:
                await self._confirm(peer)
            return await self._open(peer, model_id)

    async def _open_beside_confirm(self, peer: str, model_id: str) -> _Session | Refusal:
        """Free mode: the status call runs beside the handshake, not before it.

        Nothing in a free session depends on the status answer (paid, the
        Hello carries terms that answer may refresh), so a failover to a
        provider we held no session with starts one round trip sooner. A
        failed status call is the open's to report.
        """

        async def confirm() -> None:
            with contextlib.suppress(NetworkError, RemoteProtocolError):
                await self._confirm(peer)

        with single_errors_ungrouped():  # the open's own error, not a group of one
            async with trio.open_nursery() as nursery:
                nursery.start_soon(confirm)
                return await self._open(peer, model_id)

    async def _open(self, peer: str, model_id: str) -> _Session | Refusal:
        prepare, on_approve, opened, reservation = self._payment(peer, model_id)
        with reservation:
            return await self._open_paying(peer, model_id, prepare, on_approve, opened)

    async def _open_paying(
        self,
        peer: str,
        model_id: str,
        prepare: Callable[[session.Hello], session.Hello] | None,
        on_approve: Callable[[session.Hello, session.Approve], Awaitable[bytes]] | None,
        opened: list[bytes],
    ) -> _Session | Refusal:
        started = trio.current_time()
        stream = await self._dialer.open_stream(peer, session.PROTOCOL_ID)
        try:
            est = await session_service.open_session(
                stream,
                model_id,
                self.cfg.handshake_s,
                local_peer=self._host.get_id(),
                remote_peer=stream.muxed_conn.peer_id,
                prepare=prepare,
                on_approve=on_approve,
            )
        except BaseException:
            # Paid for on chain but never ready (a timeout, a broken stream,
            # our own cancellation): release it; see _release_unserved.
            if opened:
                await self._release_unserved(opened[0])
            raise
        if isinstance(est, Refusal):
            # After the open only the provider's chain read can honestly fail
            # (CHAIN_UNAVAILABLE); busy, not allowed and the like were for the
            # Hello, before it approved. Refusing then is taking a stake and not
            # serving it (and, busy, would be asked again: a new open each time).
            if opened:
                if not est.is_one_of(RejectCode.CHAIN_UNAVAILABLE):
                    self.counters.paid_not_served += 1
                    self.reputation.record(peer, Offence.PAID_NO_SERVICE, trio.current_time())
                await self._release_unserved(opened[0])
            return est
        self.open_ms.append((trio.current_time() - started) * 1000)
        held = _Session(peer, model_id, est.session_id, est.keys, paid=bool(opened))
        self._sessions[(peer, model_id)] = held
        self.counters.sessions_opened += 1
        return held

    async def _release_unserved(self, session_id: bytes) -> None:
        """Let go of a session paid for on chain that never served.

        It was never served, so it is not closed early (which would pay the
        provider the seconds since the open): it stays escrowed, counted
        against the spend limit, until its end plus the claim window, and
        then closes paying 0 (README, "Security model"). No chain call here,
        and no checkpoint: it needs no shield to run while we are cancelled.
        """
        assert self.market is not None
        await self.market.release(session_id)

    def _payment(
        self, peer: str, model_id: str
    ) -> tuple[
        Callable[[session.Hello], session.Hello] | None,
        Callable[[session.Hello, session.Approve], Awaitable[bytes]] | None,
        list[bytes],
        AbstractContextManager[object],
    ]:
        """Chain mode: how to fill the Hello, how to open the session on chain,
        (filled once it is open) the id of the session opened, and the hold on
        its stake, to be left when the open ends."""
        market = self.market
        opened: list[bytes] = []
        if market is None:
            return None, None, opened, nullcontext()
        offer = self._book.get(peer)
        terms = market.terms(offer, model_id) if offer is not None else None
        if terms is None:
            raise NetworkError(f"{short(peer)} has no bid for {model_id} within our price limit")
        # Held from here, before any wait: opens running at once see each other's stakes.
        reservation = market.reserve(terms.price_per_s)
        stake = reservation.stake
        if stake <= 0:
            held = market.held()
            raise SpendLimitError(
                f"spend limit reached: {format_tokens(held)} held in open sessions of "
                f"{format_tokens(market.cfg.spend_limit)} (--spend-limit)"
            )

        async def on_approve(hello: session.Hello, approve: session.Approve) -> bytes:
            assert offer is not None
            await market.check_bid(offer, terms)  # a bid that is no bid costs no funds check
            await market.check_funds(stake)
            session_id = await market.open_session(peer, hello, approve, terms, stake)
            reservation.release()  # the open session holds its stake from here
            opened.append(session_id)
            return session_id

        def prepare(hello: session.Hello) -> session.Hello:
            assert terms is not None
            return market.prepare_hello(hello, peer, terms, stake)

        return prepare, on_approve, opened, reservation

    async def _confirm(self, peer: str) -> None:
        """A status call before the first session: live load, and a measured round trip."""
        started = trio.current_time()
        await self._finder.refresh_offer(peer)
        self._measured(peer).measured_rtt((trio.current_time() - started) * 1000.0)

    def _acker(self, held: _Session, check: Callable[[Done], None]) -> Callable[[Done], Ack]:
        def ack(done: Done) -> Ack:
            check(done)  # raises: a broken promise, and no Ack
            receipt = done.receipt
            ok = receipt.session_id == held.session_id and verify_peer_signature(
                held.peer, receipt.signing_bytes(), receipt.signature
            )
            if not ok:
                self.counters.bad_receipts += 1
                logger.warning(
                    "provider %s sent a receipt it did not sign",
                    short(held.peer),
                    extra={"peer": held.peer, "session": held.session_id},
                )
                return Ack(signature=b"")
            signature = bytes(self._host.get_private_key().sign(receipt.signing_bytes()))
            if not held.paid:  # (a session is paid only when the node has a market)
                return Ack(signature=signature)
            assert self.market is not None
            # Paid: acknowledge the time used so far, which is what the provider
            # is paid by; from now on the session counts as served.
            used_until, usage_signature = self.market.acknowledge(held.session_id)
            counts = (receipt.requests, receipt.prompt_tokens, receipt.completion_tokens)
            self.market.ledger.receipt(
                held.session_id, counts, receipt.signature, signature, receipt.signing_bytes()
            )
            return Ack(signature=signature, used_until=used_until, usage_signature=usage_signature)

        return ack


class ReplyGuard:
    """Bounds what one provider may stream back for one request.

    At most ``max_tokens`` (plus slack) tokens, a bounded number of bytes per
    token, and the whole answer within a deadline: a provider that streams
    more, or claims tokens it did not send, broke the request's terms
    (BROKEN_PROMISE), and nothing past the bound is delivered.
    """

    def __init__(
        self,
        max_tokens: int,
        cfg: Config,
        deliver: Callable[[Chunk], Awaitable[None]],
        top_logprobs: int = -1,
    ) -> None:
        self._deliver = deliver
        self._top = top_logprobs
        self.max_tokens = max_tokens + cfg.token_slack
        # Logprobs' bytes (every piece, a number each), counted apart: 21
        # pieces a token at most, of a few bytes each when honest.
        self.max_logprob_bytes = 4096 + self.max_tokens * (max(top_logprobs, 0) + 1) * 32
        self.logprob_bytes = 0
        self.max_bytes = max(4096, self.max_tokens * cfg.max_bytes_per_token)
        self.deadline_s = cfg.infer.first_chunk_s + max_tokens * cfg.max_s_per_token
        self.tokens = 0
        self.bytes = 0
        self._first: float | None = None
        self._last = 0.0

    @property
    def elapsed_s(self) -> float:
        """Time from the first chunk to the last (generation proper)."""
        return 0.0 if self._first is None else self._last - self._first

    async def deliver(self, chunk: Chunk) -> None:
        self.tokens += chunk.tokens
        self.bytes += len(chunk.text.encode())
        if chunk.tokens < 0 or self.tokens > self.max_tokens or self.bytes > self.max_bytes:
            raise _Overrun(f"streamed past the request's bounds ({self.tokens} tokens)")
        if chunk.logprob_tokens:
            if not _entries_ok(chunk, self._top):
                raise _Overrun("streamed logprobs beyond what the request asked")
            self.logprob_bytes += sum(
                len(e.piece) + 8 + sum(len(a.piece) + 8 for a in e.top)
                for e in chunk.logprob_tokens
            )
            if self.logprob_bytes > self.max_logprob_bytes:
                raise _Overrun("streamed more logprobs than the answer's tokens take")
        now = trio.current_time()
        if self._first is None:
            self._first = now
        self._last = now
        await self._deliver(chunk)

    def check_done(self, done: Done) -> None:
        if done.completion_tokens > self.max_tokens or done.completion_tokens < 0:
            raise _Overrun(f"claims {done.completion_tokens} tokens for the request")


def _entries_ok(chunk: Chunk, top: int) -> bool:
    """Whether a chunk's logprobs are what was asked: at most one per token, at
    most ``top`` alternatives each, pieces within bounds, probabilities at most 1."""
    return (
        top >= 0
        and len(chunk.logprob_tokens) <= chunk.tokens
        and all(
            len(e.top) <= top
            and len(e.piece) <= MAX_PIECE
            and e.logprob <= 0
            and all(len(a.piece) <= MAX_PIECE and a.logprob <= 0 for a in e.top)
            for e in chunk.logprob_tokens
        )
    )


EMBED_TOKENS_PER_INPUT: Final = 64
"""What an embedding input counts as, for the deadline of the answer."""


def check_vectors(done: Done, wire: Request) -> None:
    """An embedding answer has one vector per input, all of one length (the one
    asked for, if one was), of finite values; any other answer has none."""
    vectors = done.vectors
    if wire.kind != EMBED:
        if vectors:
            raise FalseCommitment("sent vectors for a request that asked for none")
        return
    sizes = {len(v) for v in vectors}
    if len(vectors) != len(wire.inputs) or len(sizes) != 1:
        raise FalseCommitment(f"sent {len(vectors)} vectors for {len(wire.inputs)} inputs")
    (size,) = sizes
    want = 4 * wire.dimensions
    if size % 4 or not 0 < size <= 4 * MAX_DIMENSIONS or (want and size != want):
        raise FalseCommitment(f"sent vectors of {size} bytes")
    values = np.frombuffer(b"".join(vectors), dtype="<f4")
    if not np.isfinite(values).all():
        raise FalseCommitment("sent vectors that are not finite numbers")


def check_commitment(done: Done, wire: Request, weights: str | None) -> None:
    """Check what a provider committed to for ``wire`` against all we know without
    its model (docs/protocols.md#commitments); raises :class:`FalseCommitment`.

    The request it names must be ours, its usage the Done's, its token ids
    as many as the answer's tokens (one more for an end-of-generation token
    the model stopped with) with a log-probability each, and the weights
    those its offer announced (``weights``; None: it announced none).
    Whether the ids are the text, and the model's choice, is the audit's.
    """
    commitment = done.receipt.commitment
    if commitment is None:
        raise FalseCommitment("sent no commitment with its answer")
    if commitment.request_hash != request_hash(wire):
        raise FalseCommitment("committed to another request than ours")
    if (commitment.prompt_tokens, commitment.completion_tokens) != (
        done.prompt_tokens,
        done.completion_tokens,
    ):
        raise FalseCommitment("signed other usage than it reported")
    if weights:
        if commitment.gguf_sha256 != weights:
            raise FalseCommitment("served other weights than its offer names")
        ids = len(commitment.token_ids)
        eog = ids - commitment.completion_tokens
        if not (eog == 0 or (eog == 1 and done.finish_reason == "stop")):
            raise FalseCommitment(
                f"claims {commitment.completion_tokens} tokens for {ids} token ids"
            )
        if len(commitment.logprobs) != ids:
            raise FalseCommitment("committed to a log-probability for some tokens only")


def check_scored(done: Done, wire: Request, weights: str | None) -> None:
    """Check an auditor's answer to the score request ``wire``: scores of our ids,
    one of each kind per id, by the weights its offer names (``weights``), in
    range; raises :class:`FalseCommitment`. Whether they are true is for a
    second auditor to confirm (``p2p/audit.py``)."""
    commitment = done.receipt.commitment
    if commitment is None or commitment.scored is None:
        raise FalseCommitment("sent no scores for a score request")
    if commitment.request_hash != request_hash(wire):
        raise FalseCommitment("scored another request than ours")
    if not weights or commitment.gguf_sha256 != weights:
        raise FalseCommitment("scored with other weights than its offer names")
    if (
        commitment.token_ids != wire.score_ids
        or done.completion_tokens
        or (commitment.completion_tokens)
    ):
        raise FalseCommitment("scored other ids than ours, or generated some")
    scored = commitment.scored
    if done.finish_reason != "stop":
        raise FalseCommitment(f"ended a score request with {done.finish_reason!r}")
    ids = len(wire.score_ids)
    if scored.impossible:
        ids = 0  # nothing else is said
    per_id = (
        commitment.logprobs,
        scored.gaps,
        scored.kept,
        scored.below,
        scored.prob,
        scored.possible,
    )
    if any(len(values) != ids for values in per_id):
        raise FalseCommitment("sent scores for some ids only")
    if not (
        done.prompt_tokens == commitment.prompt_tokens == scored.prompt_tokens + ids
        or (scored.impossible and done.prompt_tokens == commitment.prompt_tokens)
    ):
        raise FalseCommitment("billed another prefill than the prompt and our ids")
    # What the sampler's cut gives (inference/llamacpp.py:_score_one): a token
    # it keeps has the probability mass before it and its own (at most 1 in
    # all, give or take rounding) and is within the looser cut; one it does
    # not keep has all the mass before it and none of its own.
    eps = 1e-6
    per_token = zip(scored.kept, scored.below, scored.prob, scored.possible, strict=True)
    in_range = (
        all(lp <= 0 for lp in commitment.logprobs)
        and all(gap >= 0 for gap in scored.gaps)
        and all(0.0 <= p <= 1.0 for p in (*scored.below, *scored.prob))
        and all(
            (below + prob <= 1.0 + eps and possible) if kept else (below, prob) == (1.0, 0.0)
            for kept, below, prob, possible in per_token
        )
        and scored.prompt_tokens >= 0
        and scored.cpu_s >= 0
    )
    if not in_range:
        raise FalseCommitment("sent scores no model gives")


class FalseCommitment(RemoteProtocolError):
    """A provider's signed commitment contradicts its own answer or our request."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_FIELD, message)


@dataclass
class _Streamed:
    """What one provider streamed for one request: its text and, per token, id and
    log-probability (bounded by the request's ReplyGuard)."""

    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[int] = field(default_factory=list)

    def add(self, chunk: Chunk) -> None:
        self.text.append(chunk.text)
        # Ids only as many as the tokens the chunk counts (which the guard
        # bounds), each with its log-probability: others are not kept, and
        # the ids left then miss text, which the audit finds.
        if len(chunk.token_ids) == len(chunk.logprobs) == chunk.tokens:
            self.ids += chunk.token_ids
            self.logprobs += chunk.logprobs


class _Stopped(Exception):  # noqa: N818 - a way out, not an error
    """The answer reached one of its stop strings: leave the provider's stream."""


class _Overrun(RemoteProtocolError):
    """A provider streamed (or billed) past what the request allowed."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.OVERSIZE, message)


@dataclass
class _Gone:
    """The providers that went away during one request (no connection left after
    a failure), each with the sequence number of its offer when it was asked.

    One that announces itself again (a newer offer: one that went away cannot
    sign one) has restarted, at its old address or another, and is asked again,
    once per request: an offer costs nothing to sign, so a provider that drops
    its connection and re-announces must not be asked round after round.
    """

    went: dict[str, int] = field(default_factory=dict)
    rejoined: set[str] = field(default_factory=set)
    at: float = 0.0  # when the last of them went

    def add(self, peer: str, seq: int, now: float) -> None:
        if peer not in self.rejoined:
            self.went[peer], self.at = seq, now

    def back(self, seq_of: Callable[[str], int], may_rejoin: Callable[[str], bool]) -> list[str]:
        """Those that announced themselves since, and may be asked again (now rejoined)."""
        back = [p for p, seq in self.went.items() if seq_of(p) > seq and may_rejoin(p)]
        for peer in back:
            del self.went[peer]
            self.rejoined.add(peer)
        return back

    def forget(self, unaskable: Callable[[str], bool]) -> None:
        """Stop waiting for those that could not be asked anyway."""
        for peer in [p for p in self.went if unaskable(p)]:
            del self.went[peer]


# How often a request that waits for a provider to come back looks for its new offer.
_REJOIN_POLL_S = 0.1
# Refusals that end a session but not the provider: a new session with it is
# opened once (its paid time ran out, it restarted, or our Ack was lost).
_REOPEN_CODES = (ErrorCode.UNKNOWN_SESSION, ErrorCode.UNACKNOWLEDGED)
# Refusals that ask us to slow down, or to wait for a slot (session and infer
# codes: compared by identity, see Refusal.is_one_of).
_SLOW_DOWN = (ErrorCode.RATE_LIMITED, RejectCode.RATE_LIMITED)
_BUSY = (ErrorCode.BUSY, RejectCode.BUSY)

# Reverts of openSession that the provider's approval or bid caused.
_PROVIDER_REVERTS = (
    "BadApproval",
    "BidNotLive",
    "ApprovalExpired",
    "PriceAboveLimit",
    "UnknownBid",
)


def offence_of_refusal(refusal: Refusal, streamed: bool) -> Offence:
    """What a refusal says of the provider that sent it (``streamed``: after
    part of the answer)."""
    if refusal.session:  # a Reject: turned down before any work
        unknown = refusal.is_one_of(RejectCode.UNKNOWN_MODEL)  # it offered the model
        return Offence.BROKEN_PROMISE if unknown else Offence.REFUSED
    if refusal.is_one_of(ErrorCode.BUSY) and streamed:
        # Busy after streaming part of the answer is no honest busy (an engine
        # refuses before its first token): a failure.
        return Offence.FAILED
    # BAD_FIELD: it says our request is wrong (a logit_bias id outside its
    # vocabulary); the next provider may say so too, none of them failed.
    if refusal.is_one_of(ErrorCode.BUSY, ErrorCode.NOT_ALLOWED, ErrorCode.BAD_FIELD):
        return Offence.REFUSED
    if refusal.is_one_of(ErrorCode.UNSUPPORTED):  # it offered the model
        return Offence.BROKEN_PROMISE
    return Offence.FAILED


def offence_of_violation(exc: RemoteProtocolError) -> Offence:
    """What a protocol violation says of the provider that committed it."""
    if isinstance(exc, _Overrun | FalseCommitment):
        return Offence.BROKEN_PROMISE
    if exc.code == ErrorCode.UNAUTHENTIC:
        return Offence.AUTH
    return Offence.PROTOCOL


async def _run_locally(
    engine: enginelib.Engine,
    request: enginelib.Request,
    deliver: Deliver,
    logprobs: SeeLogprobs | None,
) -> Outcome:
    if request.kind == "embedding":
        embed = getattr(engine, "embed", None)
        if embed is None:
            raise EngineError(f"this node's engine for {request.model_id!r} does not embed")
        vectors, tokens = await embed(request)
        return Outcome("stop", tokens, 0, "", vectors=tuple(vectors))
    # Never read: every engine's last chunk carries the finish reason and usage
    # (inference/engine.py:Chunk); only a stream cut short ends without one.
    finish, usage = "stop", enginelib.Usage(0, 0)  # pragma: no mutate
    async with engine.stream(request) as chunks:
        async for chunk in chunks:
            if logprobs is not None and chunk.logprob_tokens:
                logprobs(chunk.logprob_tokens)
            if chunk.text:
                await deliver(chunk.text, chunk.tokens)
            if chunk.finish_reason is not None:
                finish = chunk.finish_reason
                usage = chunk.usage or usage
    return Outcome(finish, usage.prompt_tokens, usage.completion_tokens, "")


def wire_request(
    request: enginelib.Request,
    request_id: str,
    delivered: str,
    max_tokens: int,
    delivered_ids: Sequence[int] | None = (),
) -> Request:
    """The infer request that asks a provider for ``request``.

    ``delivered`` is the text earlier providers already gave the user (the
    new one continues after it, within the ``max_tokens`` left);
    ``delivered_ids`` its token ids as they streamed them (None: unknown).
    The request's own continuation ids go first, when it has them or no
    continuation at all.
    """
    ids: tuple[int, ...] = ()
    if delivered_ids is not None and (request.continuation_ids or not request.continuation):
        ids = (*request.continuation_ids, *delivered_ids)
    p = request.params
    if request.kind == "embedding":
        # max_tokens only sizes the answer's deadline (ReplyGuard): no text comes.
        return Request(
            request_id=request_id,
            model_id=request.model_id,
            kind=EMBED,
            max_tokens=EMBED_TOKENS_PER_INPUT * len(request.inputs),
            inputs=request.inputs,
            dimensions=request.dimensions,
        )
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
        # Beyond the bound the provider would refuse: the text alone then.
        continuation_ids=ids if len(ids) <= MAX_SCORE_IDS else (),
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        logit_bias=tuple(Bias(token=t, bias=b) for t, b in p.logit_bias),
        format=enginelib.format_to_wire(p.format),
        top_logprobs=-1 if p.top_logprobs is None else p.top_logprobs,
    )
