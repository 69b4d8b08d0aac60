"""The provider's side of sessions and requests: admission, metering, receipts.

A consumer opens a session (``/p2pnode/session/1.0.0``), then sends requests
on ``/p2pnode/infer/1.0.0`` streams sealed with that session's keys. This
module holds the sessions a provider has agreed to, decides who gets one
(allowlist, model, clock skew, per-consumer rate, table size), runs each
request on the engine that serves its model, meters what it generated, and
signs the session's cumulative usage into a receipt that the consumer's
Ack countersigns. Admission on the engine itself (slots, queue) is the
engine's: a full queue becomes a BUSY error the consumer fails over on.

Paid sessions are paid by acknowledgement (README, "Security model"): each
Ack also carries the consumer's signed ``used_until``, which the market
checks and keeps for its claim. A paid session whose answer was not
acknowledged (no Ack, a bad one, or a request the consumer cancelled after
tokens were generated) serves nothing more: the next request is refused
with ``UNACKNOWLEDGED``, so what a consumer can take unpaid is one answer
(with any that were already running beside it).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import trio
from libp2p.abc import INetStream
from libp2p.crypto.keys import PrivateKey
from libp2p.peer.id import ID

from p2pnode.errors import BadRequestError, EngineError, ErrorCode
from p2pnode.inference import engine as enginelib
from p2pnode.inference.engine import Engine, EngineBusy
from p2pnode.p2p.discovery import verify_peer_signature
from p2pnode.p2p.histograms import SPEED_BUCKETS, TTFT_BUCKETS_S, Histogram
from p2pnode.p2p.host import short
from p2pnode.p2p.market import ProviderMarket
from p2pnode.p2p.ratelimit import RateLimiter
from p2pnode.p2p.reputation import Offence, Reputation
from p2pnode.protocols.infer import batching
from p2pnode.protocols.infer import service as infer_service
from p2pnode.protocols.infer.messages import (
    EMBED,
    MAX_BIAS,
    MAX_BIASES,
    MAX_EMBED_BYTES,
    MAX_EMBED_INPUTS,
    MAX_PENALTY,
    MAX_REQUESTS_PER_SESSION,
    MAX_SCORE_IDS,
    MAX_TOP_LOGPROBS,
    PAUSED,
    SCORE,
    Ack,
    Commitment,
    Done,
    InferOpen,
    Receipt,
    Request,
    Scored,
    millinats,
    request_hash,
)
from p2pnode.protocols.infer.replay import ReplayWindow
from p2pnode.protocols.session import admission
from p2pnode.protocols.session import service as session_service
from p2pnode.protocols.session.crypto import SessionKeys
from p2pnode.protocols.session.messages import Hello, RejectCode
from p2pnode.protocols.wire import Error
from p2pnode.scopes import single_errors_ungrouped

logger = logging.getLogger(__name__)


# Bounds of one request beyond its frame size. OpenAI takes 4 stop strings;
# 16 leaves room. A conversation of thousands of turns is a flood.
MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_TURNS = 2048


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """What a provider accepts."""

    # Who may open a session (the allowlist, the Hello's clock skew).
    admission: admission.Config = field(default_factory=admission.Config)
    # Session opens and requests per consumer peer, per minute (a token
    # bucket, so short bursts up to this many pass).
    requests_per_minute: int = 600
    # Sessions held at once, and per consumer peer. A consumer over its
    # quota loses its own idlest session; a full table evicts from the
    # consumer holding the most, so nobody's one session is pushed out by
    # another's many. Paid sessions are never evicted before their end.
    max_sessions: int = 1024
    max_sessions_per_peer: int = 8
    # Handshakes in progress at once, overall and per peer. A waiting
    # handshake costs a task and a stream; a paid one also a chain read at
    # its end (signing the approval is local work). Hellos cost nothing to
    # send: beyond these, the answer is BUSY.
    max_handshakes: int = 256
    max_handshakes_per_peer: int = 2
    # Requests running at once in one session: a session is paid per second,
    # not per slot, so one must not take every slot for the price of one.
    max_requests_per_session: int = MAX_REQUESTS_PER_SESSION
    # Paid: an answer pauses after this long (finish reason "paused"); the
    # consumer acknowledges it, as any answer, and asks for the rest in a new
    # request. Without it one answer that is never acknowledged could run
    # for the whole session, and the provider claim nothing for it.
    pause_unacked_s: float = 30.0
    # A session nobody used for this long is forgotten (its consumer opens a
    # new one; the receipt so far stays in the log).
    session_idle_s: float = 3600.0
    handshake_s: float = 10.0
    infer: infer_service.Config = field(default_factory=infer_service.Config)


@dataclass
class ServedSession:
    """A session this provider agreed to, and what it has generated in it."""

    session_id: bytes
    peer: str
    model_id: str
    keys: SessionKeys
    wallet: str | None
    last_used: float
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    active: int = 0
    # Streams admitted into the session (counted from InferOpen, before any
    # wait): the bound on requests at once, which waits cannot race past.
    admitted: int = 0
    # The latest receipt the consumer countersigned (its Ack signature).
    acked: tuple[Receipt, bytes] | None = None
    paid: bool = False
    # Paid: an answer ended unacknowledged; the session serves nothing more.
    unacked: bool = False
    # Paid: answers whose Ack has not been looked at yet, and an event set (and
    # replaced) each time one is, for a request that waits to know.
    acks_pending: int = 0
    ack_seen: trio.Event = field(default_factory=trio.Event)
    # The stream ids used so far: each opens one stream, once (a reused one
    # would reuse nonces under the session key, or replay a recorded request).
    streams: ReplayWindow = field(default_factory=ReplayWindow)


@dataclass
class Counters:
    """What happened to the sessions and requests this provider was asked for."""

    sessions: int = 0
    sessions_refused: int = 0
    requests: int = 0
    cancelled: int = 0  # requests the consumer gave up on before the end
    refused: int = 0
    bad_acks: int = 0
    unacknowledged: int = 0  # paid answers whose Ack never came
    ended_mid_request: int = 0  # paid requests stopped by their session's end
    scored: int = 0  # score requests answered (audits of other providers)
    prompt_tokens: int = 0  # metered over all requests, answered or cancelled
    completion_tokens: int = 0


class Provider:
    """Serves sessions and requests for a node's engines."""

    def __init__(
        self,
        cfg: Config,
        engines: Sequence[Engine],
        key: PrivateKey,
        engine_for: Callable[[str], Engine | None],
        market: ProviderMarket | None = None,
        reputation: Reputation | None = None,
    ) -> None:
        self.cfg = cfg
        # Chain mode: sessions are paid, approved on chain, checked before Ready.
        self.market = market
        self._engines = engines
        self._key = key
        self._engine_for = engine_for
        self._rate = RateLimiter(cfg.requests_per_minute)
        self.peer_id = ID.from_pubkey(key.get_public_key())
        # What consumers did against us (None: not remembered, in unit tests).
        self.reputation = reputation
        self.sessions: dict[bytes, ServedSession] = {}
        self._handshakes: dict[str, int] = {}
        self.counters = Counters()
        # Refusals by error code (a fixed set), from admission to generation.
        self.refusals: collections.Counter[str] = collections.Counter()
        # From a request's admission to its first token; decoding speed per answer.
        self.time_to_first_token = Histogram(TTFT_BUCKETS_S)
        self.tokens_per_s = Histogram(SPEED_BUCKETS)
        # Streams being served now: each one's batching window widens with them.
        self.streams = batching.Streams()

    # --- sessions ------------------------------------------------------------

    async def serve_session(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        market = self.market

        async def confirm(hello: Hello, session_id: bytes) -> RejectCode | None:
            assert market is not None
            refusal = await market.confirm(hello, session_id, peer)
            if refusal is RejectCode.BAD_SESSION and self.reputation is not None:
                # A session that is not on chain, or not this consumer's: each
                # such Opened costs us chain reads, and costs its sender.
                self.reputation.record(peer, Offence.PROTOCOL, trio.current_time())
            return refusal

        def decide(hello: Hello) -> RejectCode | None:
            # Room in the session table is checked before approving: a paid
            # consumer must not pay for a session we then have no room for.
            verdict: RejectCode | None = RejectCode.BUSY
            if room and self.make_room(peer, trio.current_time()):
                verdict = self._admit(peer, hello)
            if verdict is not None:
                self.counters.sessions_refused += 1
            return verdict

        running = self._handshakes.get(peer, 0)
        room = (
            running < self.cfg.max_handshakes_per_peer
            and sum(self._handshakes.values()) < self.cfg.max_handshakes
        )
        self._handshakes[peer] = running + 1
        try:
            established = await session_service.serve_session(
                stream,
                decide,
                self.cfg.handshake_s,
                local_peer=self.peer_id,
                remote_peer=stream.muxed_conn.peer_id,
                approval=market.approval if market is not None else None,
                confirm=confirm if market is not None else None,
                # Paid: the consumer opens the session on chain before Opened.
                opened_wait_s=(
                    market.cfg.approval_ttl_s + self.cfg.handshake_s if market is not None else None
                ),
            )
        finally:
            left = self._handshakes.pop(peer) - 1
            if left:
                self._handshakes[peer] = left
        if established is None:
            return
        # Room was made at Hello; a race since may overfill by a few, never drop
        # a session the consumer may have paid for.
        self.sessions[established.session_id] = ServedSession(
            session_id=established.session_id,
            peer=peer,
            model_id=established.hello.model_id,
            keys=established.keys,
            wallet=established.hello.consumer_wallet,
            last_used=trio.current_time(),
            paid=market is not None,
        )
        self.counters.sessions += 1
        logger.info(
            "session %s opened by %s",
            established.session_id[:4].hex(),
            short(peer),
            extra={"peer": peer, "session": established.session_id},
        )

    def _admit(self, peer: str, hello: Hello) -> RejectCode | None:
        market = self.market
        return admission.decide(
            hello,
            peer,
            self.cfg.admission,
            local_peer=str(self.peer_id),
            served={m.model_id for e in self._engines for m in e.models()},
            wall_now=time.time(),
            rate_allows=self._rate.allow,
            clock_now=trio.current_time(),
            paid=(lambda h: market.check_hello(h, str(self.peer_id))) if market else None,
        )

    def make_room(self, peer: str, now: float) -> bool:
        """Make room for one more session of ``peer``; False if there is none to make.

        Idle sessions go first; then the peer's own idlest one if it is at its
        quota; then, with the table full, the idlest of the peer holding the
        most. Sessions with a request running, and paid ones (the consumer
        paid for their time), are never evicted.
        """
        idle = [
            s
            for s in self.sessions.values()
            if now - s.last_used > self.cfg.session_idle_s and s.active == 0
            and not (s.paid and self.market is not None and self.market.serving(s.session_id))
        ]  # fmt: skip
        # Paid sessions closed on chain or past their end are over.
        idle += [
            s
            for s in self.sessions.values()
            if s.paid and s.active == 0 and self.market is not None
            and not self.market.serving(s.session_id)
        ]  # fmt: skip
        for s in idle:
            self.sessions.pop(s.session_id, None)
        by_peer: dict[str, list[ServedSession]] = {}
        for s in self.sessions.values():
            by_peer.setdefault(s.peer, []).append(s)
        if len(by_peer.get(peer, ())) >= self.cfg.max_sessions_per_peer:
            return self._evict_one(by_peer[peer])
        if len(self.sessions) >= self.cfg.max_sessions:
            biggest = max(by_peer.values(), key=len)
            return self._evict_one(biggest)
        return True

    def _evict_one(self, held: list[ServedSession]) -> bool:
        evictable = [s for s in held if s.active == 0 and not s.paid]
        if not evictable:
            return False
        del self.sessions[min(evictable, key=lambda s: s.last_used).session_id]
        return True

    # --- requests ------------------------------------------------------------

    async def serve_infer(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        admitted: list[ServedSession] = []
        try:
            await infer_service.serve_infer(
                stream,
                lambda opened: self._refused(self.lookup(peer, opened, admitted)),
                self._run,
                self._on_ack,
                self.cfg.infer,
                self.streams,
            )
        finally:
            for session in admitted:
                session.admitted -= 1

    def lookup(
        self, peer: str, opened: InferOpen, admitted: list[ServedSession]
    ) -> SessionKeys | Error:
        """The keys of the session an infer stream names, or the Error to answer."""
        session = self.sessions.get(opened.session_id)
        if session is None or session.peer != peer:
            # Another peer naming someone's session learns nothing either way.
            return Error(code=ErrorCode.UNKNOWN_SESSION, message="no such session")
        if self.market is not None and not self.market.serving(opened.session_id):
            return Error(code=ErrorCode.UNKNOWN_SESSION, message="the paid session has ended")
        if session.admitted >= self.cfg.max_requests_per_session:
            return Error(code=ErrorCode.BUSY, message="too many requests at once in the session")
        if not session.streams.accept(opened.stream_id):
            return Error(code=ErrorCode.REPLAYED, message="stream id already used")
        if not self._rate.allow(peer, trio.current_time()):
            return Error(code=ErrorCode.RATE_LIMITED, message="too many requests")
        session.admitted += 1
        admitted.append(session)
        return session.keys

    def _refused(self, found: SessionKeys | Error) -> SessionKeys | Error:
        """Counts an infer stream's refusal at admission (its one counting place,
        with :meth:`_run`'s, for every refusal of a stream)."""
        if isinstance(found, Error):
            self._count_refusal(ErrorCode(found.code))
        return found

    async def _run(self, opened: InferOpen, request: Request, emit: infer_service.Emit) -> Done:
        try:
            return await self._answer(opened, request, emit)
        except infer_service.RequestRefused as exc:
            self._count_refusal(exc.code)
            raise

    def _count_refusal(self, code: ErrorCode) -> None:
        self.counters.refused += 1
        self.refusals[code.name.lower()] += 1

    async def _answer(self, opened: InferOpen, request: Request, emit: infer_service.Emit) -> Done:
        session = self.sessions.get(opened.session_id)
        if session is None:  # evicted between InferOpen and Request
            raise infer_service.RequestRefused(ErrorCode.UNKNOWN_SESSION, "no such session")
        if len(request.continuation_ids) > MAX_SCORE_IDS:  # any kind: scoring reads them too
            raise infer_service.RequestRefused(
                ErrorCode.BAD_FIELD, f"at most {MAX_SCORE_IDS} continuation ids"
            )
        if request.kind == SCORE:
            if request.score_kind not in ("chat", "completion") or not (
                0 < len(request.score_ids) <= MAX_SCORE_IDS
            ):
                raise infer_service.RequestRefused(
                    ErrorCode.BAD_FIELD,
                    f"a score request scores 1 to {MAX_SCORE_IDS} ids of a chat or completion",
                )
        elif request.kind == EMBED:
            if not 0 < len(request.inputs) <= MAX_EMBED_INPUTS or request.dimensions < 0:
                raise infer_service.RequestRefused(
                    ErrorCode.BAD_FIELD,
                    f"an embedding request embeds 1 to {MAX_EMBED_INPUTS} inputs",
                )
        elif request.kind not in ("chat", "completion") or request.max_tokens < 1:
            raise infer_service.RequestRefused(
                ErrorCode.BAD_FIELD, "kind must be chat or completion, max_tokens >= 1"
            )
        # Stop strings are checked against every generated token, turns are
        # templated: a frame's worth of either is the peer's work, not ours.
        if (
            len(request.stop) > MAX_STOP
            or any(len(s) > MAX_STOP_CHARS for s in request.stop)
            or len(request.messages) > MAX_TURNS
        ):
            raise infer_service.RequestRefused(
                ErrorCode.BAD_FIELD,
                f"at most {MAX_STOP} stop strings of {MAX_STOP_CHARS} chars and {MAX_TURNS} turns",
            )
        if not _sampling_ok(request):
            raise infer_service.RequestRefused(
                ErrorCode.BAD_FIELD,
                f"penalties within ±{MAX_PENALTY:g}; at most {MAX_BIASES} logit_bias entries, "
                f"each a distinct token id within ±{MAX_BIAS:g}; top_logprobs -1 to "
                f"{MAX_TOP_LOGPROBS}",
            )
        engine = self._engine_for(request.model_id)
        if engine is None or request.model_id != session.model_id:
            raise infer_service.RequestRefused(
                ErrorCode.UNSUPPORTED, f"model {request.model_id!r} is not this session's"
            )
        info = enginelib.info_of(engine, request.model_id)
        missing = enginelib.from_wire(request).needs() - set(info.features if info else ())
        if missing:
            # A consumer reads our offer's features first; one that asks anyway
            # gets a refusal, never an answer that quietly ignores the fields.
            raise infer_service.RequestRefused(
                ErrorCode.UNSUPPORTED, f"this provider cannot honour {enginelib.fields_of(missing)}"
            )
        market = self.market
        if market is not None and session.paid:
            await self._await_acks(session)
            if session.unacked or session.acks_pending:
                raise infer_service.RequestRefused(
                    ErrorCode.UNACKNOWLEDGED,
                    "an answer in this paid session was not acknowledged: open another",
                )
        if market is not None and not await market.check(session.session_id):
            raise infer_service.RequestRefused(
                ErrorCode.UNKNOWN_SESSION, "the paid session is closed or has ended"
            )
        if request.kind == SCORE:
            return await self._score(session, request, engine)
        if request.kind == EMBED:
            return await self._embed(session, request, engine)
        session.active += 1
        session.last_used = admitted_at = trio.current_time()
        if market is not None:
            market.begin(session.session_id)
        produced = 0
        first_at: float | None = None
        token_ids: list[int] = []
        logprobs: list[float] = []
        usage: enginelib.Usage | None = None
        finish = "cancelled"
        ended = paused = False
        try:
            # The watcher's nursery is ours alone: an engine error leaves it as
            # itself, not in a group, so the refusal below reaches the consumer.
            with single_errors_ungrouped():
                async with trio.open_nursery() as nursery:
                    if market is not None:

                        async def stop_at_end() -> None:
                            # Paid time is enforced while it is used: a session
                            # closed on chain or past its end stops mid-answer.
                            nonlocal ended
                            await market.until_ended(session.session_id)
                            ended = True
                            nursery.cancel_scope.cancel()

                        nursery.start_soon(stop_at_end)
                    # Paused between chunks, never inside a write (a frame cut
                    # short would break the stream).
                    pause_at = (
                        trio.current_time() + self.cfg.pause_unacked_s
                        if market is not None and session.paid
                        else math.inf
                    )
                    async with engine.stream(enginelib.from_wire(request)) as chunks:
                        async for chunk in chunks:
                            token_ids += chunk.token_ids
                            logprobs += chunk.logprobs
                            if chunk.text:
                                if first_at is None:
                                    first_at = trio.current_time()
                                    self.time_to_first_token.observe(first_at - admitted_at)
                                produced += chunk.tokens
                                await emit(
                                    chunk.text,
                                    chunk.tokens,
                                    chunk.token_ids,
                                    millinats(chunk.logprobs),
                                    enginelib.entries_to_wire(chunk.logprob_tokens),
                                )
                            if chunk.finish_reason is not None:
                                finish, usage = chunk.finish_reason, chunk.usage
                            elif trio.current_time() >= pause_at:
                                paused = True
                                break
                    nursery.cancel_scope.cancel()
        except EngineBusy as exc:
            raise infer_service.RequestRefused(ErrorCode.BUSY, str(exc)) from exc
        except BadRequestError as exc:
            raise infer_service.RequestRefused(ErrorCode.BAD_FIELD, str(exc)) from exc
        except EngineError as exc:
            raise infer_service.RequestRefused(ErrorCode.INTERNAL, str(exc)) from exc
        finally:
            if paused and not ended and usage is None:
                # An answer to acknowledge, like any: the consumer asks for the rest.
                finish = PAUSED
                usage = enginelib.Usage(prompt_tokens=0, completion_tokens=produced)
            # Metered even when cancelled: the provider did the work.
            session.active -= 1
            session.requests += 1
            session.prompt_tokens += usage.prompt_tokens if usage else 0
            session.completion_tokens += usage.completion_tokens if usage else produced
            self.counters.prompt_tokens += usage.prompt_tokens if usage else 0
            self.counters.completion_tokens += usage.completion_tokens if usage else produced
            if usage:
                self.counters.requests += 1
                decoding = trio.current_time() - first_at if first_at is not None else 0.0
                if produced >= 2 and decoding > 0:  # the first token's time is the prompt's
                    self.tokens_per_s.observe((produced - 1) / decoding)
            else:
                self.counters.cancelled += 1
            if market is not None:
                market.end(session.session_id)
                if usage is None and produced and session.paid:
                    # Tokens went out and no Done will be acknowledged (the consumer
                    # left, or the engine failed): nothing more on this credit.
                    session.unacked = True
                    self.counters.unacknowledged += 1
        if usage is None and ended:
            self.counters.ended_mid_request += 1
            raise infer_service.RequestRefused(
                ErrorCode.UNKNOWN_SESSION, "the paid session closed or ended during the request"
            )
        assert usage is not None
        if market is not None and session.paid:
            session.acks_pending += 1  # _on_ack sees every Done returned here
        commitment = Commitment(
            request_hash=request_hash(request),
            gguf_sha256=_weights_of(engine, request.model_id),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            token_ids=tuple(token_ids),
            logprobs=millinats(logprobs),
        )
        return Done(
            finish_reason=finish,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            receipt=self.receipt(session, commitment),
        )

    async def _score(self, session: ServedSession, request: Request, engine: Engine) -> Done:
        """Score another provider's answer for an auditor (docs/protocols.md#score-requests).

        One batched prefill on a slot like any request's, billed as that many
        prompt tokens (paid: by the session's time, like any). The scores go
        back inside the signed commitment: this node answers for them.
        """
        score = getattr(engine, "score", None)
        weights = _weights_of(engine, request.model_id)
        if score is None or not weights:
            raise infer_service.RequestRefused(
                ErrorCode.UNSUPPORTED, "this provider cannot score answers of its model"
            )
        from p2pnode.inference.audit import ImpossibleAnswer, scored_of  # scipy: only here

        scored: Scored | None = None  # None: it did not end (cancelled or refused)
        logprobs: tuple[int, ...] = ()
        try:
            with self._in_use(session):
                scores = await score(enginelib.from_wire(request), request.score_ids)
        except ImpossibleAnswer as exc:
            # An answer, not a failure: the auditor's finding, signed like any.
            scored = Scored(impossible=str(exc)[:200])
        except EngineBusy as exc:
            raise infer_service.RequestRefused(ErrorCode.BUSY, str(exc)) from exc
        except EngineError as exc:
            # Past our context (a smaller one than the audited provider's), or
            # llama.cpp failing: nobody's fault that the consumer should count.
            raise infer_service.RequestRefused(ErrorCode.BAD_FIELD, str(exc)[:200]) from exc
        else:
            scored, logprobs = scored_of(scores), millinats(scores.logprobs)
        finally:
            if scored is None:
                self.counters.cancelled += 1
        prefill = scored.prompt_tokens + len(request.score_ids)
        self._metered(session, prefill)
        self.counters.scored += 1
        commitment = Commitment(
            request_hash=request_hash(request),
            gguf_sha256=weights,
            prompt_tokens=prefill,
            token_ids=request.score_ids,
            logprobs=logprobs,
            scored=scored,
        )
        return Done(
            finish_reason="stop",
            prompt_tokens=prefill,
            completion_tokens=0,
            receipt=self.receipt(session, commitment),
        )

    async def _embed(self, session: ServedSession, request: Request, engine: Engine) -> Done:
        """Embed a request's inputs (docs/protocols.md#embeddings): the vectors
        travel in the Done, billed as prompt tokens (paid: by the session's time)."""
        embed = getattr(engine, "embed", None)
        if embed is None:
            raise infer_service.RequestRefused(
                ErrorCode.UNSUPPORTED, "this provider does not embed with its model"
            )
        try:
            with self._in_use(session):
                vectors, tokens = await embed(enginelib.from_wire(request))
        except EngineBusy as exc:
            raise infer_service.RequestRefused(ErrorCode.BUSY, str(exc)) from exc
        except BadRequestError as exc:
            raise infer_service.RequestRefused(ErrorCode.BAD_FIELD, str(exc)[:200]) from exc
        except EngineError as exc:
            raise infer_service.RequestRefused(ErrorCode.INTERNAL, "the engine failed") from exc
        if sum(len(v) for v in vectors) > MAX_EMBED_BYTES:
            raise infer_service.RequestRefused(
                ErrorCode.BAD_FIELD, "the vectors exceed one answer: send fewer inputs"
            )
        self._metered(session, tokens)
        commitment = Commitment(
            request_hash=request_hash(request),
            gguf_sha256=_weights_of(engine, request.model_id),
            prompt_tokens=tokens,
        )
        return Done(
            finish_reason="stop",
            prompt_tokens=tokens,
            completion_tokens=0,
            receipt=self.receipt(session, commitment),
            vectors=tuple(vectors),
        )

    @contextlib.contextmanager
    def _in_use(self, session: ServedSession) -> Iterator[None]:
        """A request without a stream of tokens runs on ``session``: counted as
        active and, paid, its time metered while it runs."""
        market = self.market
        session.active += 1
        session.last_used = trio.current_time()
        if market is not None:
            market.begin(session.session_id)
        try:
            yield
        finally:
            session.active -= 1
            if market is not None:
                market.end(session.session_id)

    def _metered(self, session: ServedSession, prompt_tokens: int) -> None:
        """Count an answered request of ``prompt_tokens`` (paid: its Ack is awaited)."""
        session.requests += 1
        session.prompt_tokens += prompt_tokens
        self.counters.prompt_tokens += prompt_tokens
        self.counters.requests += 1
        if self.market is not None and session.paid:
            session.acks_pending += 1

    async def _await_acks(self, session: ServedSession) -> None:
        """Wait (bounded) until the Acks of the session's finished answers are looked at.

        An honest consumer's Ack may still be in flight on the last request's
        stream when its next request arrives on a new one; streams are not
        ordered, so the request waits for it rather than be refused for nothing.
        """
        with trio.move_on_after(self.cfg.infer.ack_wait_s + 1.0):
            while session.acks_pending:
                await session.ack_seen.wait()

    def receipt(self, session: ServedSession, commitment: Commitment | None = None) -> Receipt:
        """The session's usage so far and the request's commitment, signed with this
        node's peer key."""
        unsigned = Receipt(
            session_id=session.session_id,
            requests=session.requests,
            prompt_tokens=session.prompt_tokens,
            completion_tokens=session.completion_tokens,
            commitment=commitment,
        )
        return replace(unsigned, signature=self._key.sign(unsigned.signing_bytes()))

    def _on_ack(self, opened: InferOpen, done: Done, ack: Ack | None) -> None:
        session = self.sessions.get(opened.session_id)
        if session is None:
            return
        paid = self.market is not None and session.paid
        if paid:
            session.acks_pending = max(0, session.acks_pending - 1)
            session.ack_seen.set()
            session.ack_seen = trio.Event()
        receipt = done.receipt
        why: str | None = None
        if ack is None or not verify_peer_signature(
            session.peer, receipt.signing_bytes(), ack.signature
        ):
            why = "did not countersign its receipt"
        elif paid and self.market is not None:
            checked = self.market.check_usage(
                session.session_id, ack.used_until, ack.usage_signature
            )
            why = None if checked is None else f"sent a bad usage acknowledgement ({checked})"
        if why is not None:
            self.counters.bad_acks += 1
            if paid:
                session.unacked = True
                self.counters.unacknowledged += 1
            logger.warning(
                "%s %s",
                short(session.peer),
                why,
                extra={"peer": session.peer, "session": session.session_id},
            )
            return
        assert ack is not None
        previous = session.acked[0].completion_tokens if session.acked else -1
        if receipt.completion_tokens >= previous:
            session.acked = (receipt, ack.signature)
            if self.market is not None:
                counts = (receipt.requests, receipt.prompt_tokens, receipt.completion_tokens)
                self.market.ledger.receipt(
                    session.session_id,
                    counts,
                    receipt.signature,
                    ack.signature,
                    receipt.signing_bytes(),
                )


def _sampling_ok(request: Request) -> bool:
    """Penalties and biases within OpenAI's bounds (a peer's request is checked
    here, not trusted to have passed a shim)."""
    biases = request.logit_bias
    return (
        abs(request.presence_penalty) <= MAX_PENALTY
        and abs(request.frequency_penalty) <= MAX_PENALTY
        and len(biases) <= MAX_BIASES
        and len({b.token for b in biases}) == len(biases)
        and all(b.token >= 0 and abs(b.bias) <= MAX_BIAS for b in biases)
        and -1 <= request.top_logprobs <= MAX_TOP_LOGPROBS
    )


def _weights_of(engine: Engine, model_id: str) -> str:
    """The sha256 of the GGUF ``engine`` serves ``model_id`` from ("" if none)."""
    return next((m.gguf_sha256 or "" for m in engine.models() if m.model_id == model_id), "")
