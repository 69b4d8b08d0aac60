"""The inference stream machines, consumer and provider piped into each other."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pnode.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from p2pnode.protocols.infer.machine import CLEAR, ConsumerMachine, ProviderMachine, State
from p2pnode.protocols.infer.messages import (
    CLEAR_CODEC,
    Ack,
    Chunk,
    Done,
    InferOpen,
    Receipt,
    Request,
)
from p2pnode.protocols.session.crypto import MAX_STREAM_ID, SessionKeys
from p2pnode.protocols.wire import (
    DEFAULT_MAX_FRAME,
    NEED_DATA,
    PEER_CLOSED,
    Error,
    FrameDecoder,
    encode_frame,
    encode_varint,
)

MAX = 1024 * 1024
SESSION = secrets.token_bytes(32)
KEYS = SessionKeys(secrets.token_bytes(32), secrets.token_bytes(32))
REQUEST = Request(request_id="r1", model_id="m", kind="completion", prompt="Once upon")


def _frames(data: bytes) -> list[bytes]:
    """Split bytes into whole frames (with their length prefixes)."""
    decoder = FrameDecoder(MAX)
    decoder.receive_data(data)
    out = []
    while isinstance(body := decoder.next_frame(), bytes):
        out.append(encode_frame(body))
    return out


def _opened(stream_id: int = 1) -> tuple[ConsumerMachine, ProviderMachine]:
    consumer = ConsumerMachine(MAX, KEYS, SESSION, stream_id)
    provider = ProviderMachine(MAX)
    provider.receive_data(consumer.open(REQUEST))
    opened = provider.next_event()
    assert opened == InferOpen(session_id=SESSION, stream_id=stream_id)
    assert provider.state is State.CHECKING
    provider.accept(KEYS)
    assert provider.next_event() == REQUEST
    return consumer, provider


def _done() -> Done:
    receipt = Receipt(session_id=SESSION, requests=1, prompt_tokens=3, completion_tokens=2)
    return Done(finish_reason="stop", prompt_tokens=3, completion_tokens=2, receipt=receipt)


def test_a_request_streams_chunks_then_done_and_ack() -> None:
    consumer, provider = _opened()
    consumer.receive_data(provider.chunk("Hello", 1) + provider.chunk(" world", 1))
    assert consumer.next_event() == Chunk(seq=0, text="Hello", tokens=1)
    assert consumer.next_event() == Chunk(seq=1, text=" world", tokens=1)
    assert consumer.next_event() is NEED_DATA
    consumer.receive_data(provider.done(_done()))
    assert consumer.next_event() == _done()
    provider.receive_data(consumer.ack(b"sig"))
    assert provider.next_event() == Ack(signature=b"sig")
    assert provider.state is State.CLOSED
    consumer.receive_data(b"")
    assert consumer.next_event() is PEER_CLOSED


def test_the_prompt_is_sealed_on_the_wire() -> None:
    data = ConsumerMachine(MAX, KEYS, SESSION, 1).open(REQUEST)
    assert b"Once upon" not in data


def test_a_flipped_bit_fails_authentication_and_delivers_nothing() -> None:
    consumer, provider = _opened()
    frame = bytearray(provider.chunk("secret text", 2))
    frame[-1] ^= 0x01
    consumer.receive_data(bytes(frame))
    with pytest.raises(RemoteProtocolError, match="authentication"):
        consumer.next_event()
    assert consumer.state is State.ERROR


def test_a_replayed_frame_fails_authentication() -> None:
    consumer, provider = _opened()
    first = provider.chunk("once", 1)
    consumer.receive_data(first)
    assert isinstance(consumer.next_event(), Chunk)
    consumer.receive_data(first)
    with pytest.raises(RemoteProtocolError, match="authentication"):
        consumer.next_event()


def test_reordered_frames_fail_authentication() -> None:
    consumer, provider = _opened()
    a, b = provider.chunk("a", 1), provider.chunk("b", 1)
    consumer.receive_data(b + a)
    with pytest.raises(RemoteProtocolError):
        consumer.next_event()


def test_a_frame_from_another_stream_of_the_session_fails() -> None:
    consumer, _ = _opened(stream_id=1)
    _, other = _opened(stream_id=2)
    consumer.receive_data(other.chunk("spliced", 1))
    with pytest.raises(RemoteProtocolError):
        consumer.next_event()


def test_a_clear_error_is_accepted_only_as_the_first_answer() -> None:
    consumer = ConsumerMachine(MAX, KEYS, SESSION, 1)
    provider = ProviderMachine(MAX)
    provider.receive_data(consumer.open(REQUEST))
    assert isinstance(provider.next_event(), InferOpen)
    consumer.receive_data(provider.refuse(ErrorCode.UNKNOWN_SESSION, "no such session"))
    event = consumer.next_event()
    assert isinstance(event, Error)
    assert event.code == ErrorCode.UNKNOWN_SESSION

    consumer, provider = _opened()
    consumer.receive_data(provider.chunk("a", 1))
    consumer.next_event()
    forged = encode_frame(bytes([CLEAR]) + CLEAR_CODEC.encode_body(Error(code=8)))
    consumer.receive_data(forged)
    with pytest.raises(RemoteProtocolError, match="frame kind"):
        consumer.next_event()


def test_a_sealed_error_mid_stream_reaches_the_consumer() -> None:
    consumer, provider = _opened()
    chunk = provider.chunk("a", 1)
    consumer.receive_data(chunk + provider.send_error(Error(code=8, message="boom")))
    assert isinstance(consumer.next_event(), Chunk)
    assert consumer.next_event() == Error(code=8, message="boom")


def test_the_consumer_closing_mid_stream_is_a_cancellation() -> None:
    _, provider = _opened()
    provider.chunk("a", 1)
    provider.receive_data(b"")
    assert provider.next_event() is PEER_CLOSED


def test_a_consumer_sending_during_the_stream_breaks_the_protocol() -> None:
    consumer, provider = _opened()
    provider.receive_data(consumer.sealed_frame(REQUEST))
    with pytest.raises(RemoteProtocolError, match="infer.request in streaming"):
        provider.next_event()
    # An Ack too: it acknowledges a Done, and none was sent yet.
    consumer, provider = _opened()
    provider.receive_data(consumer.sealed_frame(Ack(signature=b"early")))
    with pytest.raises(RemoteProtocolError, match="infer.ack in streaming"):
        provider.next_event()


def test_the_provider_closing_before_done_is_truncation() -> None:
    consumer, provider = _opened()
    consumer.receive_data(provider.chunk("a", 1))
    consumer.next_event()
    consumer.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="before Done"):
        consumer.next_event()


def test_chunks_must_be_numbered_in_order() -> None:
    consumer, provider = _opened()
    provider._seq = 5
    consumer.receive_data(provider.chunk("a", 1))
    with pytest.raises(RemoteProtocolError, match="chunk 5, expected 0"):
        consumer.next_event()


def test_wrong_keys_fail_at_the_request() -> None:
    consumer = ConsumerMachine(MAX, KEYS, SESSION, 1)
    provider = ProviderMachine(MAX)
    provider.receive_data(consumer.open(REQUEST))
    provider.next_event()
    provider.accept(SessionKeys(secrets.token_bytes(32), secrets.token_bytes(32)))
    with pytest.raises(RemoteProtocolError, match="authentication"):
        provider.next_event()


def test_empty_or_unknown_kind_frames_are_malformed() -> None:
    provider = ProviderMachine(MAX)
    provider.receive_data(encode_frame(b""))
    with pytest.raises(RemoteProtocolError, match=": empty frame$") as info:
        provider.next_event()
    assert info.value.code is ErrorCode.MALFORMED
    assert provider.state is State.ERROR
    provider = ProviderMachine(MAX)
    provider.receive_data(encode_frame(b"\x07abc"))
    with pytest.raises(RemoteProtocolError, match="frame kind 7"):
        provider.next_event()


def _misuse(action: str, state: str) -> str:
    return f": cannot {action} in state {state}$"


def test_out_of_order_calls_are_local_errors_naming_the_call_and_state() -> None:
    consumer, provider = _opened()
    with pytest.raises(LocalProtocolError, match=_misuse("ack", "streaming")) as raised:
        consumer.ack(b"")
    assert raised.value.code is ErrorCode.UNEXPECTED
    with pytest.raises(LocalProtocolError, match=_misuse("open", "streaming")):
        consumer.open(REQUEST)
    for call, action in (
        (lambda: provider.accept(KEYS), "accept"),
        (lambda: provider.refuse(ErrorCode.BUSY, "x"), "refuse"),
    ):
        with pytest.raises(LocalProtocolError, match=_misuse(action, "streaming")):
            call()
    assert len(_frames(provider.chunk("x", 1) + provider.done(_done()))) == 2
    with pytest.raises(LocalProtocolError, match=_misuse("send a chunk", "await_ack")):
        provider.chunk("late", 1)
    with pytest.raises(LocalProtocolError, match=_misuse("send Done", "await_ack")):
        provider.done(_done())


def test_a_paid_ack_carries_the_usage_acknowledgement() -> None:
    consumer, provider = _opened()
    consumer.receive_data(provider.done(_done()))
    assert consumer.next_event() == _done()
    provider.receive_data(consumer.ack(b"sig", 1_800_000_123, b"usage"))
    assert provider.next_event() == Ack(
        signature=b"sig", used_until=1_800_000_123, usage_signature=b"usage"
    )


def test_a_refusal_says_why_in_at_most_200_characters() -> None:
    consumer = ConsumerMachine(MAX, KEYS, SESSION, 1)
    provider = ProviderMachine(MAX)
    provider.receive_data(consumer.open(REQUEST))
    assert isinstance(provider.next_event(), InferOpen)
    consumer.receive_data(provider.refuse(ErrorCode.BUSY, "y" * 300))
    refused = consumer.next_event()
    assert refused == Error(code=int(ErrorCode.BUSY), message="y" * 200)


# --- what an unauthenticated peer can make the provider do --------------------


def _clear_open(session_id: bytes, stream_id: int) -> bytes:
    body = CLEAR_CODEC.encode_body(InferOpen(session_id=session_id, stream_id=stream_id))
    return encode_frame(bytes([CLEAR]) + body)


@pytest.mark.parametrize("stream_id", [-1, MAX_STREAM_ID + 1, 2**64 - 1, -(2**63)])
def test_a_stream_id_outside_the_nonce_is_the_peers_error(stream_id: int) -> None:
    """It would not fit the 32-bit nonce field: a BAD_FIELD from the peer, not our bug."""
    provider = ProviderMachine(MAX)
    provider.receive_data(_clear_open(SESSION, stream_id))
    with pytest.raises(RemoteProtocolError) as info:
        provider.next_event()
    assert (info.value.code, info.value.detail) == (
        ErrorCode.BAD_FIELD,
        "stream id must fit in 32 bits",
    )
    assert provider.state is State.ERROR


def test_stream_ids_at_the_ends_of_the_range_are_served() -> None:
    for stream_id in (0, MAX_STREAM_ID):
        _opened(stream_id)


@given(
    st.binary(max_size=64),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.binary(max_size=256),
)
def test_whatever_opens_a_stream_is_served_or_the_peers_error(
    session_id: bytes, stream_id: int, rest: bytes
) -> None:
    """h11's fuzz invariant for the provider, through ``accept``: nothing but
    events or RemoteProtocolError, whatever InferOpen and bytes follow."""
    provider = ProviderMachine(MAX)
    provider.receive_data(_clear_open(session_id, stream_id) + rest)
    provider.receive_data(b"")
    try:
        while (event := provider.next_event()) is not PEER_CLOSED:
            assert event is not NEED_DATA
            if isinstance(event, InferOpen):
                provider.accept(KEYS)
    except RemoteProtocolError:
        pass


def test_before_the_session_is_known_frames_get_the_control_cap() -> None:
    """Anyone may open an infer stream: its clear first frame is held to the
    control cap (clear msgpack inflates ~70x in memory); only sealed frames
    get the prompt cap."""
    provider = ProviderMachine(MAX)
    provider.receive_data(encode_varint(DEFAULT_MAX_FRAME + 1))
    with pytest.raises(RemoteProtocolError) as info:
        provider.next_event()
    assert info.value.code is ErrorCode.OVERSIZE


def test_once_the_session_is_known_a_long_prompt_fits() -> None:
    long = Request(request_id="r", model_id="m", kind="completion", prompt="x" * (MAX // 2))
    consumer = ConsumerMachine(MAX, KEYS, SESSION, 1)
    provider = ProviderMachine(MAX)
    provider.receive_data(consumer.open(long))
    assert isinstance(provider.next_event(), InferOpen)
    provider.accept(KEYS)
    assert provider.next_event() == long


# --- the consumer's side, rule by rule ---------------------------------------------


def _done_stream() -> tuple[ConsumerMachine, ProviderMachine]:
    consumer, provider = _opened()
    consumer.receive_data(provider.done(_done()))
    assert consumer.next_event() == _done()
    return consumer, provider


def test_after_done_the_consumer_waits_for_the_close_and_nothing_else() -> None:
    consumer, provider = _done_stream()
    assert consumer.next_event() is NEED_DATA
    consumer.receive_data(provider.send_error(Error(code=8, message="late")))
    with pytest.raises(RemoteProtocolError) as info:
        consumer.next_event()
    assert (info.value.code, info.value.detail) == (ErrorCode.UNEXPECTED, "frame after Done")
    # A frame in the clear is not even opened after the first answer.
    consumer, _ = _done_stream()
    consumer.receive_data(encode_frame(bytes([CLEAR]) + CLEAR_CODEC.encode_body(Error(code=8))))
    with pytest.raises(RemoteProtocolError) as info:
        consumer.next_event()
    assert info.value.detail == f"frame kind {CLEAR} in done"


def test_a_provider_sending_what_only_a_consumer_sends_breaks_the_protocol() -> None:
    consumer, provider = _opened()
    consumer.receive_data(provider.sealed_frame(REQUEST))
    with pytest.raises(RemoteProtocolError) as info:
        consumer.next_event()
    assert (info.value.code, info.value.detail) == (
        ErrorCode.UNEXPECTED,
        "infer.request from a provider",
    )
    assert consumer.state is State.ERROR


def test_events_before_the_request_or_after_an_error_are_our_bug() -> None:
    consumer = ConsumerMachine(MAX, KEYS, SESSION, 1)
    with pytest.raises(LocalProtocolError, match=": no event in idle$") as info:
        consumer.next_event()
    assert info.value.code is ErrorCode.UNEXPECTED
    consumer, provider = _opened()
    consumer.receive_data(provider.send_error(Error(code=8, message="boom")))
    assert consumer.next_event() == Error(code=8, message="boom")
    assert consumer.state is State.ERROR
    with pytest.raises(LocalProtocolError, match=": no event in error$"):
        consumer.next_event()


def test_the_provider_closing_before_done_says_so() -> None:
    consumer, _ = _opened()
    consumer.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        consumer.next_event()
    assert (info.value.code, info.value.detail) == (
        ErrorCode.TRUNCATED,
        "provider closed before Done",
    )


def test_a_sealed_frame_before_the_session_is_known_is_the_peers_error() -> None:
    provider = ProviderMachine(MAX)
    consumer = ConsumerMachine(MAX, KEYS, SESSION, 1)
    opened = consumer.open(REQUEST)
    sealed_request = _frames(opened)[1]  # the open's second frame: the sealed Request
    provider.receive_data(sealed_request)
    with pytest.raises(RemoteProtocolError) as info:
        provider.next_event()
    assert (info.value.code, info.value.detail) == (
        ErrorCode.UNEXPECTED,
        "frame kind 1 in await_open",
    )
    assert provider.state is State.ERROR
    with pytest.raises(LocalProtocolError, match=": no event in error$") as after:
        provider.next_event()
    assert after.value.code is ErrorCode.UNEXPECTED


def test_sealing_before_the_keys_are_known_is_our_bug() -> None:
    provider = ProviderMachine(MAX)
    with pytest.raises(LocalProtocolError) as info:
        provider.sealed_frame(Chunk(seq=0, text="x", tokens=1))
    assert (info.value.code, info.value.detail) == (ErrorCode.UNEXPECTED, "no session keys yet")


def test_sending_an_error_ends_the_stream_for_the_sender() -> None:
    _, provider = _opened()
    provider.send_error(Error(code=8, message="stop"))
    assert provider.state is State.ERROR


def test_a_sealed_frame_that_opens_to_junk_ends_the_stream() -> None:
    consumer, provider = _opened()
    junk = provider._sealer.seal(b"\xc1")  # noqa: SLF001 - authentic, but not msgpack
    consumer.receive_data(encode_frame(bytes([1]) + junk))
    with pytest.raises(RemoteProtocolError) as info:
        consumer.next_event()
    assert info.value.code is ErrorCode.MALFORMED
    assert consumer.state is State.ERROR
