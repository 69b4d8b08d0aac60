"""Attacks on paid sessions: consumers that use sessions they no longer pay for, and
providers that take the stake and do not serve.

Both drive real nodes on the embedded chain. The consumer side works the
session and infer protocols by hand (the node's own consumer would never ask
in a session it closed); the provider side replaces the thief's
``ProviderMarket.confirm``, the step that runs once the consumer's stake is
on chain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from eth_account.signers.local import LocalAccount
from libp2p.peer.id import ID

from p2pnode.chain.client import AsyncChain, send_ether
from p2pnode.errors import NetworkError, P2PNodeError, RemoteProtocolError
from p2pnode.p2p.node import Node
from p2pnode.protocols import infer, session
from p2pnode.protocols.infer import service as infer_service
from p2pnode.protocols.infer.machine import ConsumerMachine
from p2pnode.protocols.infer.messages import Ack, Chunk, Done, Request
from p2pnode.protocols.refusal import Refusal
from p2pnode.protocols.session import RejectCode
from p2pnode.protocols.session import service as session_service
from p2pnode.protocols.session.crypto import SessionKeys
from p2pnode.simnet.attacks import connect, stream_to

# The session an expiring-session attacker buys. Long enough to be confirmed: eth-tester
# mines each block at least a second after the last, so on a busy chain a two-second
# session has often ended before the provider reads it.
EXPIRING_S = 8
# A stream to the provider, while every node of the run shares one busy loop.
OPEN_S = 20.0


# --- thieves ---------------------------------------------------------------------


@dataclass
class Takings:
    """Sessions a thief let a consumer open on chain (its ``confirm`` is asked once each)."""

    sessions: int = 0


def reject_after_open(node: Node) -> Takings:
    """Take the stake: approve every session, then reject it once it is open on chain."""
    assert node.markets.provider is not None
    out = Takings()

    async def reject(_hello: session.Hello, _session_id: bytes, _peer: str) -> RejectCode:
        out.sessions += 1
        return RejectCode.BAD_SESSION

    node.markets.provider.confirm = reject  # type: ignore[method-assign, assignment]
    return out


def stall_after_open(node: Node) -> Takings:
    """Take the stake: approve every session, then never answer the consumer's Opened."""
    assert node.markets.provider is not None
    out = Takings()

    async def stall(_hello: session.Hello, _session_id: bytes, _peer: str) -> RejectCode:
        out.sessions += 1
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    node.markets.provider.confirm = stall  # type: ignore[method-assign, assignment]
    return out


# --- consumers in closed or expired sessions -------------------------------------------


@dataclass
class AfterClose:
    """Requests a consumer sent in sessions it had closed or let expire, and what came back."""

    requests: int = 0
    refused: int = 0  # the provider answered with an error before any token
    failed: int = 0  # no answer, or a broken stream
    tokens: int = 0  # generated after the close (or the end)
    served_s: float = 0.0  # seconds of generation after the close, summed
    # The same per session kind ("closed" at once, "expired"): seconds, tokens.
    served_by_kind: dict[str, tuple[float, int]] = field(default_factory=dict)
    before_close_tokens: int = 0  # served while the session was paid for (sanity)
    # A request running when its session closes: how long the provider went on.
    in_flight_stop_s: float | None = None
    in_flight_tokens_after: int = 0
    # How far past its end (chain seconds) the expired session was when asked again.
    expired_chain_past_end_s: int | None = None
    # The provider's estimate of the chain's clock then, minus the session's end.
    expired_provider_view_s: float | None = None
    errors: list[str] = field(default_factory=list)


async def open_paid(
    node: Node, provider: Node, model_id: str, seconds: int
) -> tuple[bytes, SessionKeys]:
    """Open a paid session with ``provider`` by hand: the handshake and the on-chain open.

    Returns the on-chain session id and the session keys. The consumer's
    market records it as any session it opens.
    """
    market = node.markets.consumer
    assert market is not None
    if not await connect(node, provider):
        raise NetworkError("cannot connect to the provider")
    offer = node.offer_book.get(provider.peer_id) or await node.finder.refresh_offer(
        provider.peer_id
    )
    terms = market.terms(offer, model_id) if offer is not None else None
    if terms is None:
        raise NetworkError(f"no offer with terms for {model_id} from the provider")
    stake = terms.price_per_s * seconds

    async def on_approve(hello: session.Hello, approve: session.Approve) -> bytes:
        return await market.open_session(provider.peer_id, hello, approve, terms, stake)

    stream = await stream_to(node, provider.peer_id, session.PROTOCOL_ID, OPEN_S)
    est = await session_service.open_session(
        stream,
        model_id,
        10.0,
        local_peer=node.host.get_id(),
        remote_peer=ID.from_base58(provider.peer_id),
        prepare=lambda hello: market.prepare_hello(hello, provider.peer_id, terms, stake),
        on_approve=on_approve,
    )
    if isinstance(est, Refusal):
        raise NetworkError(f"the provider refused the paid session: {est}")
    return est.session_id, est.keys


@dataclass
class _Asked:
    tokens: int = 0
    first: float | None = None
    last: float | None = None


async def ask_in(
    node: Node,
    provider: Node,
    session_id: bytes,
    keys: SessionKeys,
    stream_id: int,
    request: Request,
    on_chunk: Callable[[Chunk], Awaitable[None]] | None = None,
) -> tuple[_Asked, Done | Refusal]:
    """One request in a session, driven by hand (stream id chosen by the caller).

    Returns what came, and Done or the provider's refusal; raises
    NetworkError or RemoteProtocolError when the stream fails.
    """
    cfg = infer_service.Config()
    asked = _Asked()

    async def deliver(chunk: Chunk) -> None:
        now = trio.current_time()
        asked.first = now if asked.first is None else asked.first
        asked.last = now
        asked.tokens += chunk.tokens
        if on_chunk is not None:
            await on_chunk(chunk)

    # Connected again if the connection dropped since (a busy machine can lose
    # one): the attack is on the session, not on the connection.
    if not await connect(node, provider):
        raise NetworkError("cannot connect to the provider")
    stream = await stream_to(node, provider.peer_id, infer.PROTOCOL_ID, OPEN_S)
    machine = ConsumerMachine(cfg.max_frame, keys, session_id, stream_id)

    def ack(done: Done) -> Ack:
        # As the node's own consumer acknowledges (its receipt signed, the
        # time used signed by the wallet): the provider refuses a session whose
        # last answer went unacknowledged, which would hide what this measures.
        signature = bytes(node.host.get_private_key().sign(done.receipt.signing_bytes()))
        if node.markets.consumer is None:
            return Ack(signature=signature)
        used_until, usage = node.markets.consumer.acknowledge(session_id)
        return Ack(signature=signature, used_until=used_until, usage_signature=usage)

    done = await infer_service.request(stream, machine, request, deliver, ack, cfg)
    return asked, done


def completion(model_id: str, tokens: int, request_id: str) -> Request:
    """A completion request as the infer protocol carries it."""
    return Request(
        request_id=request_id, model_id=model_id, kind="completion", prompt="x", max_tokens=tokens
    )


async def use_closed_sessions(
    node: Node,
    provider: Node,
    chain: AsyncChain,
    account: LocalAccount,
    model_id: str,
    requests: int,
) -> AfterClose:
    """Pay for a session, close it on chain at once, and keep asking in it; then the same
    with a session left to expire; then close a session while a request runs in it.

    ``served_s`` adds, for every request sent after its session closed or
    ended, the seconds from sending it to its last token (0 when no token
    came). ``in_flight_stop_s`` is how long the provider kept streaming a
    request that was running when its session closed.
    """
    out = AfterClose()
    stream_ids = iter(range(1, 10_000))

    async def after(session_id: bytes, keys: SessionKeys, kind: str) -> None:
        for n in range(requests):
            out.requests += 1
            sent = trio.current_time()
            try:
                with trio.fail_after(30):
                    asked, done = await ask_in(
                        node, provider, session_id, keys, next(stream_ids),
                        completion(model_id, 16, f"after-{n}"),
                    )  # fmt: skip
            except (NetworkError, RemoteProtocolError, trio.TooSlowError) as exc:
                out.failed += 1
                out.errors.append(f"request after close: {exc}")
                continue
            if isinstance(done, Refusal):
                out.refused += 1
                continue
            out.tokens += asked.tokens
            served_s, tokens = out.served_by_kind.get(kind, (0.0, 0))
            if asked.last is not None:
                out.served_s += asked.last - sent
                served_s += asked.last - sent
            out.served_by_kind[kind] = (served_s, tokens + asked.tokens)

    async def before(session_id: bytes, keys: SessionKeys) -> None:
        with trio.fail_after(30):
            asked, _ = await ask_in(
                node, provider, session_id, keys, next(stream_ids), completion(model_id, 8, "paid")
            )
        out.before_close_tokens += asked.tokens

    async def closed_at_once() -> None:
        # Closed by the consumer right after a first request (its stake
        # refunded, the provider paid for a second or two), then asked again.
        session_id, keys = await open_paid(node, provider, model_id, 600)
        await before(session_id, keys)
        await chain.close_session(account, session_id)
        await after(session_id, keys, "closed")

    async def left_to_expire() -> None:
        # Bought for a few seconds, then used past its end.
        session_id, keys = await open_paid(node, provider, model_id, EXPIRING_S)
        await before(session_id, keys)
        ends_at = (await chain.session(session_id)).ends_at
        await _until_chain_passes(chain, account, ends_at)
        out.expired_chain_past_end_s = await chain.now() - ends_at
        # What the provider believes (its public estimate): the evidence when it serves on.
        if provider.markets.provider is not None:
            out.expired_provider_view_s = round(provider.markets.provider.chain_time() - ends_at, 2)
        await after(session_id, keys, "expired")

    async def in_flight() -> None:
        await _close_in_flight(node, provider, chain, account, model_id, next(stream_ids), out)

    for attack in (closed_at_once, left_to_expire, in_flight):
        try:
            await attack()
        except (P2PNodeError, trio.TooSlowError) as exc:
            out.errors.append(f"{attack.__name__}: {exc!r}")
    return out


async def _until_chain_passes(chain: AsyncChain, account: LocalAccount, ends_at: int) -> None:
    """Wait until the chain's latest block is past ``ends_at``: the session has ended by the
    contract's own clock (anyone may close it), not only by the wall clock.

    eth-tester's clock moves only with blocks, at least a second each (the wall
    clock when that is later): on an idle chain it stands still, so the
    attacker mines blocks itself, each an empty ether transfer to itself.
    """
    with trio.fail_after(60):
        while await chain.now() <= ends_at:
            await trio.sleep(1.0)
            if await chain.now() <= ends_at:
                await chain.run(send_ether, chain.sync.w3, account, account.address, 0)


async def _close_in_flight(
    node: Node,
    provider: Node,
    chain: AsyncChain,
    account: LocalAccount,
    model_id: str,
    stream_id: int,
    out: AfterClose,
) -> None:
    """Close a session on chain while a long request streams in it; time the provider's stop."""
    session_id, keys = await open_paid(node, provider, model_id, 600)
    first = trio.Event()
    closed_at: float | None = None
    last: float | None = None

    async def on_chunk(chunk: Chunk) -> None:
        nonlocal last
        first.set()
        if closed_at is not None:
            out.in_flight_tokens_after += chunk.tokens
            last = trio.current_time()
        await trio.sleep(0.001)  # a slow reader: the answer would take minutes

    async def long_request() -> None:
        # The provider stops it with an error: what we wait for.
        with contextlib.suppress(NetworkError, RemoteProtocolError):
            await ask_in(
                node, provider, session_id, keys, stream_id,
                completion(model_id, 10_000_000, "in-flight"), on_chunk,
            )  # fmt: skip

    with trio.move_on_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_request)
            await first.wait()
            await chain.close_session(account, session_id)
            closed_at = trio.current_time()
    if closed_at is not None and last is not None:
        out.in_flight_stop_s = last - closed_at
    elif closed_at is not None:
        out.in_flight_stop_s = 0.0
