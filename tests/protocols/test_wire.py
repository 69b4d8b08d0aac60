"""The frame codec, in the manner of h11's test_io: whole, byte by byte, trailing."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pnode.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from p2pnode.protocols import offers, session, status
from p2pnode.protocols.wire import (
    NEED_DATA,
    PEER_CLOSED,
    Codec,
    Error,
    FrameDecoder,
    Message,
    decode_varint,
    encode_frame,
    encode_varint,
)

CODEC = status.CODEC

responses = st.builds(
    status.StatusResponse,
    peer_id=st.text(max_size=60),
    version=st.text(max_size=20),
    addrs=st.lists(st.text(max_size=80), max_size=5).map(tuple),
    connected_peers=st.integers(min_value=0, max_value=2**31),
    uptime_s=st.floats(allow_nan=False, allow_infinity=False),
    models=st.lists(
        st.builds(
            offers.ModelOffer,
            model_id=st.text(max_size=40),
            gguf_sha256=st.none() | st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
            context_length=st.integers(min_value=0, max_value=2**20),
            tokens_per_s=st.floats(min_value=0, max_value=1e6),
        ),
        max_size=4,
    ).map(tuple),
    load=st.builds(
        status.Load,
        slots_total=st.integers(0, 64),
        slots_free=st.integers(0, 64),
        queue_len=st.integers(0, 1000),
    ),
)


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_varint_round_trip(n: int) -> None:
    encoded = encode_varint(n)
    assert decode_varint(encoded + b"\xff", 2**63) == (n, len(encoded))


def test_varint_known_encodings() -> None:
    assert encode_varint(0) == b"\x00"
    assert encode_varint(127) == b"\x7f"
    assert encode_varint(128) == b"\x80\x01"
    assert encode_varint(300) == b"\xac\x02"


def test_varint_incomplete_needs_more() -> None:
    assert decode_varint(b"\x80", 1000) is None
    assert decode_varint(b"", 1000) is None


def test_varint_non_minimal_is_malformed() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_varint(b"\x81\x00", 1000)
    assert info.value.code is ErrorCode.MALFORMED


def test_varint_too_long_is_malformed() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_varint(b"\x80" * 9 + b"\x01", 2**70)
    assert info.value.code is ErrorCode.MALFORMED


def test_oversize_is_refused_from_the_header_alone() -> None:
    """The cap is checked before a single body byte is buffered."""
    decoder = FrameDecoder(max_size=1024)
    decoder.receive_data(encode_varint(1025))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.OVERSIZE


def test_oversize_is_refused_before_the_varint_ends() -> None:
    """A length that can only grow past the cap is refused at its first bytes."""
    decoder = FrameDecoder(max_size=1024)
    decoder.receive_data(b"\xff\xff")  # already >= 16383, varint not finished
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.OVERSIZE


def test_frame_at_the_cap_is_accepted() -> None:
    decoder = FrameDecoder(max_size=1024)
    decoder.receive_data(encode_frame(b"x" * 1024))
    assert decoder.next_frame() == b"x" * 1024


def _frames(*bodies: bytes) -> bytes:
    return b"".join(encode_frame(b) for b in bodies)


def test_whole_buffer() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(_frames(b"one", b"", b"three"))
    assert [decoder.next_frame() for _ in range(4)] == [b"one", b"", b"three", NEED_DATA]


def test_byte_at_a_time() -> None:
    data = _frames(b"hello", b"world" * 100)
    decoder = FrameDecoder()
    got = []
    for i in range(len(data)):
        decoder.receive_data(data[i : i + 1])
        while (frame := decoder.next_frame()) is not NEED_DATA:
            got.append(frame)
    assert got == [b"hello", b"world" * 100]


def test_trailing_bytes_are_kept() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(_frames(b"first") + b"\x05ab")
    assert decoder.next_frame() == b"first"
    assert decoder.next_frame() is NEED_DATA
    assert decoder.buffered == 3
    decoder.receive_data(b"cde")
    assert decoder.next_frame() == b"abcde"


def test_clean_eof_between_frames() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(_frames(b"last"))
    decoder.receive_data(b"")
    assert decoder.next_frame() == b"last"
    assert decoder.next_frame() is PEER_CLOSED


def test_eof_inside_a_frame_is_truncation() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"\x05ab")
    decoder.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.TRUNCATED


@given(responses)
def test_message_round_trip(msg: status.StatusResponse) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(CODEC.encode(msg))
    body = decoder.next_frame()
    assert isinstance(body, bytes)
    assert CODEC.decode(body) == msg


@given(st.binary(max_size=512))
def test_arbitrary_bytes_parse_or_raise_remote_protocol_error(data: bytes) -> None:
    """h11's fuzz invariant: nothing but a message or RemoteProtocolError."""
    decoder = FrameDecoder(max_size=256)
    decoder.receive_data(data)
    decoder.receive_data(b"")
    try:
        while (body := decoder.next_frame()) is not PEER_CLOSED:
            assert isinstance(body, bytes)
            CODEC.decode(body)
    except RemoteProtocolError:
        pass


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**64 - 1)
        | st.floats()
        | st.text()
        | st.binary(),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=20,
    )
)
def test_arbitrary_msgpack_values_decode_or_raise(value: object) -> None:
    """Well-formed msgpack of any shape, tagged or not, never escapes as another error."""
    for candidate in (
        value,
        {"t": "status.response", "x": value},
        {
            "t": "status.response",
            "peer_id": value,
            "version": value,
            "addrs": value,
            "connected_peers": value,
            "uptime_s": value,
            "load": value,
        },
    ):
        with contextlib.suppress(RemoteProtocolError):
            CODEC.decode(msgpack.packb(candidate, use_bin_type=True))


def _body(**fields: object) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def _decode_error(body: bytes) -> ErrorCode:
    with pytest.raises(RemoteProtocolError) as info:
        CODEC.decode(body)
    return info.value.code


def test_unknown_type_tag() -> None:
    assert _decode_error(_body(t="session.hello")) is ErrorCode.UNKNOWN_TYPE


def test_missing_tag_and_non_map_bodies() -> None:
    assert _decode_error(_body(peer_id="x")) is ErrorCode.MALFORMED
    assert _decode_error(msgpack.packb([1, 2, 3])) is ErrorCode.MALFORMED
    assert _decode_error(b"\xc1") is ErrorCode.MALFORMED  # never-used msgpack byte
    assert _decode_error(_body(t="error", code=1) + b"\x00") is ErrorCode.MALFORMED  # extra data


def test_missing_field() -> None:
    assert _decode_error(_body(t="error")) is ErrorCode.BAD_FIELD


def test_wrong_field_types() -> None:
    assert _decode_error(_body(t="error", code="1")) is ErrorCode.BAD_FIELD
    assert _decode_error(_body(t="error", code=True)) is ErrorCode.BAD_FIELD
    assert _decode_error(_body(t="error", code=1, message=b"bytes")) is ErrorCode.BAD_FIELD
    ok = status.StatusResponse(peer_id="p", version="v", addrs=(), connected_peers=0, uptime_s=0)
    wire = ok.to_wire()
    assert _decode_error(msgpack.packb(wire | {"addrs": "not a list"})) is ErrorCode.BAD_FIELD
    assert _decode_error(msgpack.packb(wire | {"addrs": [1]})) is ErrorCode.BAD_FIELD
    assert _decode_error(msgpack.packb(wire | {"load": {"slots_free": "x"}})) is ErrorCode.BAD_FIELD


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert CODEC.decode(_body(t="error", code=4, future_field=[1, 2])) == Error(code=4)


def test_integer_is_accepted_where_a_float_is_expected() -> None:
    ok = status.StatusResponse(peer_id="p", version="v", addrs=(), connected_peers=0, uptime_s=3)
    decoded = CODEC.decode(msgpack.packb(ok.to_wire()))
    assert isinstance(decoded, status.StatusResponse)
    assert decoded.uptime_s == 3.0


def test_encoding_a_message_of_another_protocol_is_our_bug() -> None:
    only_errors = Codec([Error])
    with pytest.raises(LocalProtocolError) as info:
        only_errors.encode(status.StatusRequest())
    assert (info.value.code, info.value.detail) == (
        ErrorCode.UNKNOWN_TYPE,
        "StatusRequest is not part of this protocol",
    )


def test_signed_bytes_fields_are_msgpack_bin() -> None:
    # What a signature covers must be the same bytes in every implementation:
    # a bytes field travels as msgpack bin (0xc4 and its length), never as str.
    from p2pnode.protocols.infer.messages import Receipt

    receipt = Receipt(session_id=b"\x07" * 32, requests=1, prompt_tokens=2, completion_tokens=3)
    assert b"\xc4\x20" + b"\x07" * 32 in receipt.signing_bytes()
    status_response = status.StatusResponse(
        peer_id="p", version="v", addrs=(), connected_peers=0, uptime_s=0, offer=b"\x07" * 32
    )
    assert b"\xc4\x20" + b"\x07" * 32 in CODEC.encode_body(status_response)


def test_error_frame_hides_internal_details() -> None:
    assert Error.from_exception(ValueError("secret path /home/x")) == Error(
        code=ErrorCode.INTERNAL, message="internal error"
    )
    remote = RemoteProtocolError(ErrorCode.OVERSIZE, "too big")
    assert Error.from_exception(remote) == Error(code=ErrorCode.OVERSIZE, message="too big")


def _status_with_uptime(value: object, *, single: bool = False) -> bytes:
    ok = status.StatusResponse(peer_id="p", version="v", addrs=(), connected_peers=0, uptime_s=0)
    return bytes(msgpack.packb(ok.to_wire() | {"uptime_s": value}, use_single_float=single))


@given(st.floats().map(lambda v: (v, False)) | st.floats(width=32).map(lambda v: (v, True)))
def test_a_float_field_decodes_only_if_finite(case: tuple[float, bool]) -> None:
    """NaN passes every comparison a handler makes (``abs(now - nan) > skew`` is
    False), and an infinity is no number to act on: both are the peer's BAD_FIELD."""
    value, single = case
    body = _status_with_uptime(value, single=single)
    sent = msgpack.unpackb(body)["uptime_s"]  # what float32 made of it
    if math.isfinite(sent):
        decoded = CODEC.decode(body)
        assert isinstance(decoded, status.StatusResponse)
        assert decoded.uptime_s == sent
    else:
        assert _decode_error(body) is ErrorCode.BAD_FIELD


@pytest.mark.parametrize("value", [math.nan, -math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_wherever_they_sit(value: float) -> None:
    assert _decode_error(_status_with_uptime(value)) is ErrorCode.BAD_FIELD
    assert _decode_error(_status_with_uptime(value, single=True)) is ErrorCode.BAD_FIELD
    # Nested in a tuple of messages.
    ok = status.StatusResponse(
        peer_id="p",
        version="v",
        addrs=(),
        connected_peers=0,
        uptime_s=0,
        models=(offers.ModelOffer(model_id="m"),),
    )
    wire = ok.to_wire()
    wire["models"][0]["tokens_per_s"] = value
    assert _decode_error(msgpack.packb(wire)) is ErrorCode.BAD_FIELD
    # The timestamp a provider checks a Hello's age with.
    hello = session.Hello(model_id="m", ephemeral=bytes(32), nonce=bytes(16), timestamp=0.0)
    with pytest.raises(RemoteProtocolError) as info:
        session.CODEC.decode(msgpack.packb(hello.to_wire() | {"timestamp": value}))
    assert info.value.code is ErrorCode.BAD_FIELD


# --- each refusal says which rule broke: the code the peer gets, and why -----------


def _eof_inside_a_frame() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"\x05ab")
    decoder.receive_data(b"")
    decoder.next_frame()


def _data_after_eof() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    decoder.receive_data(b"x")


def _oversize() -> None:
    decoder = FrameDecoder(max_size=1024)
    decoder.receive_data(encode_varint(1025))
    decoder.next_frame()


@pytest.mark.parametrize(
    ("call", "code", "detail"),
    [
        (lambda: encode_varint(-1), ErrorCode.BAD_FIELD, "varint must be non-negative"),
        (
            lambda: decode_varint(b"\x80" * 9 + b"\x01", 2**70),
            ErrorCode.MALFORMED,
            "varint longer than 9 bytes",
        ),
        (
            lambda: decode_varint(b"\x81\x00", 1000),
            ErrorCode.MALFORMED,
            "varint not minimally encoded",
        ),
        (_oversize, ErrorCode.OVERSIZE, "frame length above the 1024-byte cap"),
        (_eof_inside_a_frame, ErrorCode.TRUNCATED, "stream ended inside a frame"),
        (_data_after_eof, ErrorCode.UNEXPECTED, "data after EOF"),
        (
            lambda: CODEC.decode(_body(t="error", code="1")),
            ErrorCode.BAD_FIELD,
            "Error.code: expected an integer, got str",
        ),
        (
            lambda: CODEC.decode(_body(t="nope")),
            ErrorCode.UNKNOWN_TYPE,
            "unknown message type 'nope'",
        ),
        (lambda: CODEC.decode(b"\xc1"), ErrorCode.MALFORMED, "body is not valid msgpack"),
        (
            lambda: CODEC.decode(msgpack.packb({1: 2})),
            ErrorCode.MALFORMED,
            "body is not valid msgpack",
        ),
        (lambda: CODEC.decode(msgpack.packb([1])), ErrorCode.MALFORMED, "body is not a map"),
        (lambda: CODEC.decode(msgpack.packb({"x": 1})), ErrorCode.MALFORMED, "missing type tag"),
        (lambda: CODEC.decode(_body(t="error")), ErrorCode.BAD_FIELD, "Error.code: missing"),
        (
            lambda: CODEC.decode(_body(t="x" * 60)),
            ErrorCode.UNKNOWN_TYPE,
            f"unknown message type {'x' * 40!r}",
        ),
        (lambda: Codec([Error, Error]), ErrorCode.INTERNAL, f"bad or duplicate tag on {Error}"),
    ],
)
def test_each_refusal_names_its_code_and_reason(
    call: Callable[[], object], code: ErrorCode, detail: str
) -> None:
    with pytest.raises((LocalProtocolError, RemoteProtocolError)) as info:
        call()
    assert (info.value.code, info.value.detail) == (code, detail)  # type: ignore[union-attr]


def test_a_codec_built_here_decodes_what_it_encodes_and_nothing_else() -> None:
    # The module-level codecs are built at import; this one under the test.
    codec = Codec([status.StatusRequest, Error])
    assert codec.decode(codec.encode_body(Error(code=3, message="m"))) == Error(code=3, message="m")
    assert codec.decode(codec.encode_body(status.StatusRequest())) == status.StatusRequest()
    with pytest.raises(RemoteProtocolError) as info:
        codec.decode(CODEC.encode_body(status.StatusResponse(
            peer_id="p", version="v", addrs=(), connected_peers=0, uptime_s=0
        )))  # fmt: skip
    assert info.value.code is ErrorCode.UNKNOWN_TYPE


def test_an_error_frame_message_is_cut_to_200_characters() -> None:
    long = RemoteProtocolError(ErrorCode.MALFORMED, "m" * 300)
    assert Error.from_exception(long) == Error(code=ErrorCode.MALFORMED, message="m" * 200)


# --- each wrong field names where it is, what was expected and what came -------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Inner(Message):
    n: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class _Every(Message):
    """A test message with a field of every supported kind."""

    TYPE: ClassVar[str] = "test.every"
    s: str = ""
    i: int = 0
    f: float = 0.0
    b: bool = False
    raw: bytes = b""
    maybe: str | None = None
    items: tuple[int, ...] = ()
    table: dict[str, int] = field(default_factory=dict)
    inner: _Inner = _Inner()


EVERY = Codec([_Every])


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"s": 1}, "_Every.s: expected str, got int"),
        ({"i": "1"}, "_Every.i: expected an integer, got str"),
        ({"i": True}, "_Every.i: expected an integer, got bool"),
        ({"f": "1"}, "_Every.f: expected a number, got str"),
        ({"f": False}, "_Every.f: expected a number, got bool"),
        ({"f": math.inf}, "_Every.f: not a finite number"),
        ({"b": 1}, "_Every.b: expected bool, got int"),
        ({"raw": "x"}, "_Every.raw: expected bytes, got str"),
        ({"maybe": 5}, "_Every.maybe: expected str, got int"),
        ({"items": 5}, "_Every.items: expected an array, got int"),
        ({"items": [1, "2"]}, "_Every.items[1]: expected an integer, got str"),
        ({"table": [1]}, "_Every.table: expected a map, got list"),
        ({"table": {b"k": 1}}, "_Every.table: expected string keys, got bytes"),
        ({"table": {"a": 1, "k": "v"}}, "_Every.table.k: expected an integer, got str"),
        ({"inner": {"n": "x"}}, "_Every.inner.n: expected an integer, got str"),
        ({"inner": 5}, "_Every.inner: expected a map"),
    ],
)
def test_a_wrong_field_names_its_path_the_kind_expected_and_what_came(
    fields: dict[str, object], detail: str
) -> None:
    body = msgpack.packb({"t": "test.every", **fields}, use_bin_type=True)
    with pytest.raises(RemoteProtocolError) as info:
        EVERY.decode(body)
    assert (info.value.code, info.value.detail) == (ErrorCode.BAD_FIELD, detail)


def test_every_field_kind_round_trips() -> None:
    msg = _Every(
        s="s", i=-3, f=2.5, b=True, raw=b"\x00", maybe=None, items=(1, 2),
        table={"a": 1}, inner=_Inner(n=4),
    )  # fmt: skip
    assert EVERY.decode(EVERY.encode_body(msg)) == msg
    assert EVERY.decode(EVERY.encode_body(replace(msg, maybe="here"))).maybe == "here"
    # An integer where a float is wanted is taken as a float.
    decoded = EVERY.decode(msgpack.packb({"t": "test.every", "f": 3}))
    assert isinstance(decoded, _Every)
    assert decoded.f == 3.0
    assert isinstance(decoded.f, float)
