"""The session adapters over in-memory streams, with and without a peer relaying them."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from p2pnode.errors import BrokenStreamError, ErrorCode, RemoteProtocolError
from p2pnode.protocols.infer import service as infer_service
from p2pnode.protocols.infer.batching import Streams
from p2pnode.protocols.infer.machine import ConsumerMachine as InferConsumer
from p2pnode.protocols.infer.machine import ProviderMachine as InferProvider
from p2pnode.protocols.infer.messages import Chunk, Done, InferOpen, Receipt, Request
from p2pnode.protocols.refusal import Refusal
from p2pnode.protocols.session import service
from p2pnode.protocols.session.messages import Approve, Hello, RejectCode
from p2pnode.protocols.stream import next_event

BOUND_S = 5
MAX = 1 << 20
ON_CHAIN_ID = b"\x07" * 32
REQUEST = Request(request_id="r1", model_id="m", kind="completion", prompt="Once upon")


class _Stream:
    """A trio byte stream with the face of a libp2p stream (``protocols.stream.ByteStream``)."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self._inner = inner

    async def read(self, n: int | None = None) -> bytes:
        data = await self._inner.receive_some(n)
        if not data:
            raise EOFError
        return data

    async def write(self, data: bytes) -> None:
        await self._inner.send_all(data)

    async def close(self) -> None:
        await self._inner.send_eof()

    async def reset(self) -> None:
        await self._inner.aclose()


def _pair() -> tuple[_Stream, _Stream]:
    left, right = trio.testing.memory_stream_pair()
    return _Stream(left), _Stream(right)


def _peer() -> ID:
    return ID.from_pubkey(create_new_key_pair().public_key)


async def _relay(source: _Stream, sink: _Stream) -> None:
    """Copy bytes one way until EOF: all a relaying peer needs to do."""
    while True:
        try:
            data = await source.read()
        except EOFError:
            await sink.close()
            return
        await sink.write(data)


async def _on_chain(_hello: Hello, _approve: Approve) -> bytes:
    return ON_CHAIN_ID


async def _confirmed(_hello: Hello, _session_id: bytes) -> RejectCode | None:
    return None


async def _handshake(
    *, mallory: ID | None, chain: bool
) -> tuple[service.Established | Refusal, service.Established | None]:
    """Run both adapters, the consumer's stream copied byte for byte to the provider's.

    Direct (``mallory`` None), each end names the other; relayed, each end
    names M, the peer its stream really reaches. The bytes are the same.
    """
    consumer_id, provider_id = _peer(), _peer()
    c_end, c_far = _pair()
    p_end, p_far = _pair()
    at_provider: list[service.Established | None] = []
    at_consumer: list[service.Established | Refusal] = []

    async def provider() -> None:
        at_provider.append(
            await service.serve_session(
                p_end,
                lambda _hello: None,
                BOUND_S,
                local_peer=provider_id,
                remote_peer=mallory or consumer_id,
                confirm=_confirmed if chain else None,
            )
        )

    async def consumer() -> None:
        est = await service.open_session(
            c_end,
            "m",
            BOUND_S,
            local_peer=consumer_id,
            remote_peer=mallory or provider_id,
            on_approve=_on_chain if chain else None,
        )
        at_consumer.append(est)

    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider)
            nursery.start_soon(consumer)
            nursery.start_soon(_relay, c_far, p_far)
            nursery.start_soon(_relay, p_far, c_far)
    return at_consumer[0], at_provider[0]


async def _direct_session() -> tuple[service.Established, service.Established]:
    """A free-mode session straight between the two ends: (consumer's, provider's)."""
    consumer, provider = await _handshake(mallory=None, chain=False)
    assert isinstance(consumer, service.Established)
    assert provider is not None
    return consumer, provider


@pytest.mark.parametrize("chain", [False, True])
async def test_a_direct_session_agrees_on_id_and_keys(chain: bool) -> None:
    at_consumer, at_provider = await _handshake(mallory=None, chain=chain)
    assert isinstance(at_consumer, service.Established)
    assert at_provider is not None
    assert at_consumer.session_id == at_provider.session_id
    assert at_consumer.keys == at_provider.keys
    # And a request goes through sealed.
    consumer = InferConsumer(MAX, at_consumer.keys, at_consumer.session_id, 1)
    provider = InferProvider(MAX)
    provider.receive_data(consumer.open(REQUEST))
    assert isinstance(provider.next_event(), InferOpen)
    provider.accept(at_provider.keys)
    assert provider.next_event() == REQUEST


async def test_a_relayed_session_has_keys_the_two_ends_do_not_share() -> None:
    """M relays C's handshake to P. Both ends finish it (chain mode), but
    the provider's first sealed frame fails authentication at the consumer."""
    at_consumer, at_provider = await _handshake(mallory=_peer(), chain=True)
    assert isinstance(at_consumer, service.Established)
    assert at_provider is not None
    assert at_consumer.session_id == at_provider.session_id == ON_CHAIN_ID
    assert at_consumer.keys != at_provider.keys

    consumer = InferConsumer(MAX, at_consumer.keys, at_consumer.session_id, 1)
    provider = InferProvider(MAX)
    provider.receive_data(consumer.open(REQUEST))
    assert isinstance(provider.next_event(), InferOpen)
    provider.accept(at_provider.keys)
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        provider.next_event()  # the consumer's Request
    # Were the provider to answer anyway, its first sealed frame fails at the consumer.
    answer = InferProvider(MAX)
    answer.receive_data(InferConsumer(MAX, at_provider.keys, ON_CHAIN_ID, 1).open(REQUEST))
    answer.next_event()
    answer.accept(at_provider.keys)
    answer.next_event()
    consumer.receive_data(answer.chunk("token", 1))
    with pytest.raises(RemoteProtocolError, match="failed authentication") as info:
        consumer.next_event()
    assert info.value.code is ErrorCode.UNAUTHENTIC


async def test_a_relayed_free_mode_session_is_refused() -> None:
    """Free mode: the id the consumer names is its transcript hash, not the provider's."""
    at_consumer, at_provider = await _handshake(mallory=_peer(), chain=False)
    assert isinstance(at_consumer, Refusal)
    assert at_consumer.code is RejectCode.BAD_SESSION
    assert at_provider is None


async def test_a_consumer_that_stops_reading_loses_its_request_after_the_write_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A consumer that asks, then never reads, used to hold the provider's
    # generation (a slot, free of charge in free mode) for as long as it liked.
    consumer, provider = await _direct_session()
    left, right = trio.testing.lockstep_stream_pair()  # a write waits for the reader
    c_end, p_end = _Stream(left), _Stream(right)
    cfg = infer_service.Config(write_s=30.0)
    machine = InferConsumer(cfg.max_frame, consumer.keys, consumer.session_id, 1)
    generated = 0
    streams = Streams()  # the provider's count, which widens each stream's batching window
    counted = []

    async def generate(_opened: InferOpen, _request: Request, emit: infer_service.Emit) -> Done:
        nonlocal generated
        counted.append(streams.active)
        while True:
            await emit(" tok", 1)
            generated += 1
            await trio.sleep(0.01)

    async def ask() -> None:
        await c_end.write(machine.open(REQUEST))  # and then reads nothing

    async def serve() -> None:
        with pytest.raises(BrokenStreamError, match="read nothing for 30 s"):
            await infer_service.serve_infer(
                p_end, lambda _o: keys, generate, lambda *_: None, cfg, streams
            )

    keys = provider.keys
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await serve()
    assert trio.current_time() - started < 31
    assert generated < 4_000  # the generation stopped with the write
    assert counted == [1]
    assert streams.active == 0


async def test_the_last_text_and_done_leave_in_one_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Each write is a frame at every layer below (yamux, Noise, TCP): Done
    # sent on its own cost every request one more of them, each way.
    consumer, provider = await _direct_session()
    c_end, p_end = _pair()
    writes: list[bytes] = []
    write = p_end.write

    async def recorded(data: bytes) -> None:
        writes.append(data)
        await write(data)

    p_end.write = recorded  # type: ignore[method-assign]
    cfg = infer_service.Config()
    machine = InferConsumer(cfg.max_frame, consumer.keys, consumer.session_id, 1)
    receipt = Receipt(
        session_id=consumer.session_id, requests=1, prompt_tokens=2, completion_tokens=3
    )

    async def generate(_opened: InferOpen, _request: Request, emit: infer_service.Emit) -> Done:
        for piece in (" once", " upon", " a"):  # within one window after the first
            await emit(piece, 1)
        return Done(finish_reason="stop", prompt_tokens=2, completion_tokens=3, receipt=receipt)

    async def ask() -> None:
        await c_end.write(machine.open(REQUEST))
        texts = []
        while not isinstance(event := await next_event(c_end, machine), Done):
            assert isinstance(event, Chunk)
            texts.append(event.text)
        await c_end.write(machine.ack(b"\x00" * 64))
        assert texts == [" once", " upon a"]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await infer_service.serve_infer(
            p_end, lambda _o: provider.keys, generate, lambda *_: None, cfg, Streams()
        )
    # The first token at once; the rest with Done.
    assert len(writes) == 2
