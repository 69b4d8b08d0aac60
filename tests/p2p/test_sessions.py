"""Provider admission and consumer ranking, pure and between real nodes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import trio
import trio.lowlevel
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from p2pnode.errors import ErrorCode, NoProviderError
from p2pnode.inference.engine import ChatMessage, Params, Request
from p2pnode.inference.llamacpp import (
    BUNDLED_MODEL_ID,
    Config,
    LlamaCppEngine,
    bundled_model_path,
    open_llamacpp,
)
from p2pnode.inference.synthetic import SyntheticEngine
from p2pnode.p2p import provider as providerlib
from p2pnode.p2p.audit import Config as AuditConfig
from p2pnode.p2p.audit import Record as AuditRecord
from p2pnode.p2p.memory import MemoryNetwork
from p2pnode.p2p.node import NodeConfig
from p2pnode.p2p.pricing import PeerStats, rank
from p2pnode.p2p.reputation import Offence
from p2pnode.protocols import infer, session
from p2pnode.protocols.infer import service as infer_service
from p2pnode.protocols.infer.machine import ConsumerMachine
from p2pnode.protocols.infer.messages import Request as WireRequest
from p2pnode.protocols.offers import ModelOffer, Offer
from p2pnode.protocols.refusal import Refusal
from p2pnode.protocols.session import admission
from p2pnode.protocols.session import service as session_service
from p2pnode.simnet.harness import open_memory_node

BOUND_S = 30


def _offer(peer: str, *, price: int = 0, free: int = 1, queue: int = 0, tps: float = 0) -> Offer:
    model = ModelOffer(model_id="m", price_per_s=price, tokens_per_s=tps)
    return Offer(
        peer_id=peer,
        addrs=(),
        models=(model,),
        slots_free=free,
        queue_len=queue,
        seq=1,
        timestamp=0,
    )


def test_rank_prefers_clean_then_cheap_then_quick() -> None:
    offers = [
        _offer("busy", free=0, queue=3),
        _offer("failed"),
        _offer("dear", price=5),
        _offer("far"),
        _offer("near"),
    ]
    stats = {
        "failed": PeerStats(rtt_ms=1.0),
        "far": PeerStats(rtt_ms=400.0),
        "near": PeerStats(rtt_ms=5.0),
    }
    scores = {"failed": 1.0}
    ranked = [o.peer_id for o in rank(offers, "m", stats, scores)]
    assert ranked == ["near", "far", "busy", "dear", "failed"]
    # Once its score has decayed to clean, it is the quickest again.
    ranked = [o.peer_id for o in rank(offers, "m", stats, {})]
    assert ranked[0] == "failed"
    assert rank(offers, "absent", stats, scores) == []
    # A session already held wins over a quicker provider (a new one costs a
    # handshake and, paid, an on-chain open), but not over a failing one.
    ranked = [o.peer_id for o in rank(offers, "m", stats, scores, held={"far", "failed"})]
    assert ranked[:2] == ["far", "near"]


def test_rank_takes_speed_claims_only_up_to_what_was_measured() -> None:
    # A Sybil claiming 10,000 tokens/s does not outrank a provider measured
    # at 50 tokens/s: unmeasured claims are capped at the best measurement.
    honest = _offer("honest", tps=40.0)
    sybil = _offer("sybil", tps=10_000.0)
    stats = {"honest": PeerStats(rtt_ms=5.0, tokens_per_s=50.0), "sybil": PeerStats(rtt_ms=5.0)}
    assert [o.peer_id for o in rank([sybil, honest], "m", stats, {})] == ["honest", "sybil"]


def test_consumers_spread_over_alike_providers_but_each_keeps_its_order() -> None:
    # When the provider serving them dies, its consumers fail over: had they
    # all taken the book's first of the alike providers, they would all lose
    # their answers again should that one die too.
    alike = [_offer(f"p{i}") for i in range(20)]
    firsts = {rank(alike, "m", {}, {}, me=f"consumer-{c}")[0].peer_id for c in range(50)}
    assert len(firsts) >= 10
    mine = [o.peer_id for o in rank(alike, "m", {}, {}, me="consumer-1")]
    assert [o.peer_id for o in rank(alike[::-1], "m", {}, {}, me="consumer-1")] == mine
    # Only a tie is spread: a quicker provider is everyone's first.
    stats = {"p7": PeerStats(rtt_ms=5.0)}
    assert {rank(alike, "m", stats, {}, me=f"consumer-{c}")[0].peer_id for c in range(50)} == {"p7"}


def test_rate_limiter_allows_a_burst_then_refills() -> None:
    limiter = providerlib.RateLimiter(per_minute=60)
    assert all(limiter.allow("a", 0.0) for _ in range(60))
    assert not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)  # per key
    assert not limiter.allow("a", 0.5)
    assert limiter.allow("a", 1.0)  # one a second comes back


@pytest.fixture
async def engine() -> AsyncIterator[LlamaCppEngine]:
    cfg = Config(model_path=bundled_model_path(), model_id=BUNDLED_MODEL_ID, n_threads=1)
    async with open_llamacpp(cfg) as e:
        yield e


REQUEST = Request(
    model_id=BUNDLED_MODEL_ID,
    kind="chat",
    messages=(ChatMessage(role="user", content="Hi"),),
    params=Params(max_tokens=4, temperature=0.0),
)


async def _nothing(_text: str, _tokens: int) -> None:
    return None


async def _ignore(_chunk: object) -> None:
    return None


@pytest.mark.slow
async def test_provider_admission_refuses_with_reasons(
    engine: LlamaCppEngine, memory: MemoryNetwork
) -> None:
    consumer_key = create_new_key_pair()
    other_id = str(ID.from_pubkey(create_new_key_pair().public_key))
    strict = NodeConfig(
        measure_tokens=0,
        provider=providerlib.Config(
            admission=admission.Config(allowlist=frozenset({other_id})), requests_per_minute=2
        ),
    )
    async with (
        open_memory_node(memory, strict, engines=[engine]) as provider,
        open_memory_node(memory, NodeConfig(), key_pair=consumer_key) as consumer,
    ):
        await consumer.dialer.connect(provider.addrs[0])
        pid = ID.from_base58(provider.peer_id)
        peers = {"local_peer": consumer.host.get_id(), "remote_peer": pid}
        with trio.fail_after(BOUND_S):
            stream = await consumer.dialer.open_stream(pid, session.PROTOCOL_ID)
            rejected = await session_service.open_session(stream, BUNDLED_MODEL_ID, 5, **peers)
            assert isinstance(rejected, Refusal)
            assert rejected.code is session.RejectCode.NOT_ALLOWED

            provider.provider.cfg = providerlib.Config(requests_per_minute=2)  # type: ignore[union-attr]
            stream = await consumer.dialer.open_stream(pid, session.PROTOCOL_ID)
            rejected = await session_service.open_session(stream, "no-such-model", 5, **peers)
            assert isinstance(rejected, Refusal)
            assert rejected.code is session.RejectCode.UNKNOWN_MODEL

            stream = await consumer.dialer.open_stream(pid, session.PROTOCOL_ID)
            est = await session_service.open_session(stream, BUNDLED_MODEL_ID, 5, **peers)
            # A session id nobody opened is refused, in the clear, before any prompt.
            stream = await consumer.dialer.open_stream(pid, infer.PROTOCOL_ID)
            machine = ConsumerMachine(1 << 20, est.keys, b"\x00" * 32, 1)
            wire = WireRequest(request_id="x", model_id=BUNDLED_MODEL_ID, kind="chat")
            refused = await infer_service.request(
                stream, machine, wire, _ignore, lambda _d: b"", infer_service.Config()
            )
            assert isinstance(refused, Refusal)
            assert refused.code is ErrorCode.UNKNOWN_SESSION
            # Two session opens a minute: the third is rate limited.
            stream = await consumer.dialer.open_stream(pid, session.PROTOCOL_ID)
            await session_service.open_session(stream, BUNDLED_MODEL_ID, 5, **peers)
            stream = await consumer.dialer.open_stream(pid, session.PROTOCOL_ID)
            rejected = await session_service.open_session(stream, BUNDLED_MODEL_ID, 5, **peers)
            assert isinstance(rejected, Refusal)
            assert rejected.code is session.RejectCode.RATE_LIMITED
        assert provider.provider is not None
        assert provider.provider.counters.sessions == 2


@pytest.mark.slow
async def test_every_provider_rate_limiting_is_reported_as_such(
    engine: LlamaCppEngine, memory: MemoryNetwork
) -> None:
    limited = NodeConfig(measure_tokens=0, provider=providerlib.Config(requests_per_minute=1))
    async with (
        open_memory_node(memory, limited, engines=[engine]) as provider,
        open_memory_node(memory, NodeConfig()) as consumer,
    ):
        await consumer.dialer.connect(provider.addrs[0])
        with trio.fail_after(BOUND_S):
            while consumer.offer_book.get(provider.peer_id) is None:
                await consumer.finder.refresh_offer(provider.peer_id)
            with pytest.raises(NoProviderError) as failed:
                await consumer.generate(REQUEST, _nothing)
        assert failed.value.rate_limited
        # Refusals are not failures: the provider keeps its rank.
        assert consumer.consumer.counters.provider_failures == 0


@pytest.mark.slow
async def test_a_busy_provider_is_waited_for_not_given_up(memory: MemoryNetwork) -> None:
    # One slot and no queue: of three requests at once, two are refused busy.
    # The only provider is asked again once it has room, and each request is
    # served; being busy is counted once per request, never towards a ban.
    cfg = Config(
        model_path=bundled_model_path(), model_id=BUNDLED_MODEL_ID, n_threads=1, queue_limit=0
    )
    async with (
        open_llamacpp(cfg) as engine,
        open_memory_node(memory, NodeConfig(measure_tokens=0), engines=[engine]) as provider,
        open_memory_node(memory, NodeConfig()) as consumer,
    ):
        assert provider.provider is not None
        await consumer.dialer.connect(provider.addrs[0])
        outcomes: list[str] = []

        async def ask() -> None:
            outcome = await consumer.generate(REQUEST, _nothing)
            outcomes.append(outcome.provider)

        with trio.fail_after(BOUND_S):
            while consumer.offer_book.get(provider.peer_id) is None:
                await consumer.finder.refresh_offer(provider.peer_id)
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(ask)
        assert outcomes == [provider.peer_id] * 3
        assert provider.provider.counters.refused >= 1
        counters = consumer.consumer.counters
        assert 1 <= counters.provider_refusals <= 2
        assert counters.provider_failures == 0
        assert not consumer.consumer.reputation.banned(provider.peer_id, trio.current_time())


@pytest.mark.slow
async def test_a_stale_or_future_hello_is_refused(
    engine: LlamaCppEngine, memory: MemoryNetwork
) -> None:
    async with open_memory_node(memory, NodeConfig(measure_tokens=0), engines=[engine]) as provider:
        assert provider.provider is not None

        def hello(skew: float) -> session.Hello:
            return session.Hello(
                model_id=BUNDLED_MODEL_ID,
                ephemeral=bytes(32),
                nonce=bytes(16),
                timestamp=time.time() + skew,
            )

        admit = provider.provider._admit
        assert admit("peer", hello(-3600)) == session.RejectCode.STALE_HELLO
        assert admit("peer", hello(+3600)) == session.RejectCode.STALE_HELLO
        assert admit("peer", hello(-5)) is None


@pytest.mark.parametrize("audited", [False, True])
async def test_a_request_nobody_can_serve_says_why(memory: MemoryNetwork, audited: bool) -> None:
    # "none announces it", "caught", "banned": what the user sees in the shim's 503 body,
    # from a consumer that audits and from one that does not.
    audit = AuditConfig() if audited else None
    async with (
        open_memory_node(memory, NodeConfig(measure_tokens=0, audit=audit)) as lonely,
        open_memory_node(
            memory,
            NodeConfig(measure_tokens=0),
            engines=[SyntheticEngine()],
        ) as provider,
        open_memory_node(
            memory, NodeConfig(measure_tokens=0), engines=[SyntheticEngine()]
        ) as other,
    ):
        absent = replace(REQUEST, model_id="nobody-serves-this")
        with trio.fail_after(BOUND_S), pytest.raises(NoProviderError) as failed:
            await lonely.generate(absent, _nothing)
        assert "no provider offers this model (0 peers connected; none announces it)" in str(
            failed.value
        )
        await lonely.dialer.connect(provider.addrs[0])
        with trio.fail_after(BOUND_S):
            while lonely.offer_book.get(provider.peer_id) is None:
                await lonely.finder.refresh_offer(provider.peer_id)
        for _ in range(3):  # three malformed-frame offences: past the ban score
            lonely.reputation.record(provider.peer_id, Offence.AUTH, trio.current_time())
        synthetic = replace(REQUEST, model_id=SyntheticEngine().models()[0].model_id)
        with trio.fail_after(BOUND_S), pytest.raises(NoProviderError) as failed:
            await lonely.generate(synthetic, _nothing)
        assert "(1 provider seen; all banned for misbehaviour)" in str(failed.value)
        # A second provider, banned too.
        await lonely.dialer.connect(other.addrs[0])
        with trio.fail_after(BOUND_S):
            while lonely.offer_book.get(other.peer_id) is None:
                await lonely.finder.refresh_offer(other.peer_id)
        for _ in range(3):
            lonely.reputation.record(other.peer_id, Offence.AUTH, trio.current_time())
        with trio.fail_after(BOUND_S), pytest.raises(NoProviderError) as failed:
            await lonely.generate(synthetic, _nothing)
        assert "(2 providers seen; all banned for misbehaviour)" in str(failed.value)
        if not audited:
            return
        # Caught by an audit: said before (and instead of) any ban.
        assert lonely.auditor is not None
        lonely.auditor.records[provider.peer_id] = AuditRecord(audits=1, failed=1, caught="ids")
        with trio.fail_after(BOUND_S), pytest.raises(NoProviderError) as failed:
            await lonely.generate(synthetic, _nothing)
        assert (
            "(2 providers seen; 1 caught by audits serving other than the model; "
            "all banned for misbehaviour)"
        ) in str(failed.value)
        lonely.auditor.records[other.peer_id] = AuditRecord(audits=1, failed=1, caught="ids")
        with trio.fail_after(BOUND_S), pytest.raises(NoProviderError) as failed:
            await lonely.generate(synthetic, _nothing)
        assert "(2 providers seen; all caught by audits serving other than the model)" in str(
            failed.value
        )


@pytest.mark.parametrize(
    ("a", "a_stats", "b", "b_stats"),
    [
        # An unmeasured round trip counts as 50 ms.
        (_offer("a"), PeerStats(), _offer("b"), PeerStats(rtt_ms=50.5)),
        # Only a provider with no free slot waits in its queue: 500 ms per request
        # queued, its own included.
        (_offer("a", free=1), PeerStats(rtt_ms=10.0), _offer("b"), PeerStats(rtt_ms=20.0)),
        (_offer("a", free=0, queue=1), PeerStats(), _offer("b"), PeerStats(rtt_ms=1051.0)),
        (
            _offer("a"),
            PeerStats(rtt_ms=1000.0),
            _offer("b", free=0, queue=0),
            PeerStats(rtt_ms=600),
        ),
        # Then the time per token: 1000 / tokens per second, measured or claimed.
        (_offer("a"), PeerStats(tokens_per_s=10.0), _offer("b"), PeerStats(rtt_ms=150.05)),
        (_offer("a"), PeerStats(rtt_ms=1000.0), _offer("b", tps=1.0), PeerStats()),
        (_offer("a", tps=2.0), PeerStats(), _offer("b"), PeerStats(rtt_ms=550.5)),
    ],
)
def test_the_quickest_is_the_least_expected_wait(
    a: Offer, a_stats: PeerStats, b: Offer, b_stats: PeerStats
) -> None:
    stats = {"a": a_stats, "b": b_stats}
    assert [o.peer_id for o in rank([b, a], "m", stats, {})] == ["a", "b"]
