"""Frames and typed messages shared by every p2pnode protocol (docs/protocols.md#framing).

A frame is an unsigned varint (multiformats, minimal encoding) giving the body
length, then the body: a msgpack map ``{"t": type_tag, ...fields}``.

Everything here is pure: no I/O, no clock, no libp2p. A :class:`FrameDecoder`
is fed bytes as they arrive (``receive_data``; ``b""`` means EOF) and hands out
complete bodies (``next_frame``) or :data:`NEED_DATA`. The declared length is
checked against the cap *before* the body is buffered, so a peer cannot make us
allocate more than ``max_size`` plus one read (hivemind allocates whatever the
peer declares; we do not).

Messages are frozen dataclasses deriving from :class:`Message`. Their field
annotations are the schema: ``from_wire`` checks every field's type (a float
must be finite) and rejects missing ones, so a handler only ever sees
well-typed messages. Fields a newer peer adds are ignored, which lets a
protocol grow without a version bump.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Final, Self

import msgpack

from p2pnode.errors import ErrorCode, LocalProtocolError, RemoteProtocolError


class Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    PEER_CLOSED = "PEER_CLOSED"


NEED_DATA: Final = Sentinel.NEED_DATA
"""More bytes are needed before the next frame or event is complete."""

PEER_CLOSED: Final = Sentinel.PEER_CLOSED
"""The peer closed its side cleanly, between frames."""

DEFAULT_MAX_FRAME: Final = 64 * 1024
"""Cap for control messages: far above any of ours (a status answer is <2 KiB)
and small enough that a hostile peer costs little memory."""

PROMPT_MAX_FRAME: Final = 1024 * 1024
"""Cap for frames that carry prompts: the sealed frames of an infer stream."""

# A length below 2**63 fits in 9 varint bytes (multiformats unsigned-varint).
_MAX_VARINT_BYTES: Final = 9


def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer as a minimal unsigned LEB128 varint."""
    if value < 0:
        raise LocalProtocolError(ErrorCode.BAD_FIELD, "varint must be non-negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buf: bytes | bytearray, max_value: int) -> tuple[int, int] | None:
    """Parse a varint at the start of ``buf``.

    Returns ``(value, bytes_used)``, or ``None`` if ``buf`` ends inside the
    varint. Raises :class:`RemoteProtocolError` as soon as the value can be
    seen to exceed ``max_value`` (OVERSIZE) or the encoding is not minimal or
    too long (MALFORMED), without waiting for further bytes.
    """
    value = 0
    for i, byte in enumerate(buf):
        if i >= _MAX_VARINT_BYTES:
            raise RemoteProtocolError(ErrorCode.MALFORMED, "varint longer than 9 bytes")
        value |= (byte & 0x7F) << (7 * i)
        if value > max_value:
            raise RemoteProtocolError(
                ErrorCode.OVERSIZE, f"frame length above the {max_value}-byte cap"
            )
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise RemoteProtocolError(ErrorCode.MALFORMED, "varint not minimally encoded")
            return value, i + 1
    return None


class FrameDecoder:
    """Splits a byte stream into frame bodies, enforcing a size cap.

    Feed it with :meth:`receive_data` and drain it with :meth:`next_frame`
    until that returns :data:`NEED_DATA`. After EOF (``receive_data(b"")``)
    it returns :data:`PEER_CLOSED` once the buffer is empty, and raises
    TRUNCATED if EOF came inside a frame.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out as frames."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; ``b""`` marks EOF."""
        if self._eof and data:
            raise LocalProtocolError(ErrorCode.UNEXPECTED, "data after EOF")
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_frame(self) -> bytes | Sentinel:
        """Return the next complete body, NEED_DATA, or PEER_CLOSED."""
        header = decode_varint(self._buf, self.max_size)
        if header is not None:
            length, used = header
            if len(self._buf) - used >= length:
                body = bytes(self._buf[used : used + length])
                del self._buf[: used + length]
                return body
        if not self._eof:
            return NEED_DATA
        if self._buf:
            raise RemoteProtocolError(ErrorCode.TRUNCATED, "stream ended inside a frame")
        return PEER_CLOSED


def encode_frame(body: bytes) -> bytes:
    """Prefix ``body`` with its varint length."""
    return encode_varint(len(body)) + body


# --- typed messages --------------------------------------------------------


class Message:
    """Base of all wire messages: frozen dataclasses with a ``TYPE`` tag.

    Subclasses are declared as
    ``@dataclass(frozen=True, slots=True, kw_only=True)`` with a ``TYPE``
    class variable. Supported field types: ``str``, ``int``, ``float``
    (finite: NaN and infinities are BAD_FIELD), ``bool``, ``bytes``,
    ``X | None``, ``tuple[X, ...]``, ``dict[str, X]`` and nested
    :class:`Message` subclasses (encoded as maps without a tag).
    """

    TYPE: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-ready map for this message, with its type tag."""
        body = _encode_fields(self)
        body["t"] = self.TYPE
        return body

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Self:
        """Build the message from a decoded map; the tag is not checked here."""
        return _decode_fields(cls, data, cls.__name__)


_ADDED: Final = "p2pnode.added"


def added(default: Any) -> Any:
    """A field added to a message after peers already spoke it: left out of the
    encoding while it holds ``default`` (an immutable value), so a message that
    does not use it is, byte for byte, what an older peer sends, hashes and
    signs (docs/protocols.md#messages)."""
    return dataclasses.field(default=default, metadata={_ADDED: True})


def _encode_fields(msg: Message) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for f in dataclasses.fields(msg):  # type: ignore[arg-type]
        value = getattr(msg, f.name)
        if f.metadata.get(_ADDED) and value == f.default:
            continue
        body[f.name] = _encode_value(value)
    return body


def _encode_value(value: Any) -> Any:
    if isinstance(value, Message):
        return _encode_fields(value)
    if isinstance(value, tuple):
        return [_encode_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode_value(v) for k, v in value.items()}
    return value


_M = typing.TypeVar("_M", bound=Message)

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


def _decode_fields(cls: type[_M], data: Mapping[str, Any], where: str) -> _M:
    if not isinstance(data, Mapping):
        raise RemoteProtocolError(ErrorCode.BAD_FIELD, f"{where}: expected a map")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        path = f"{where}.{field.name}"
        if field.name in data:
            kwargs[field.name] = _decode_value(hints[field.name], data[field.name], path)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, f"{path}: missing")
    return cls(**kwargs)


def _bad(path: str, expected: str, value: Any) -> RemoteProtocolError:
    return RemoteProtocolError(
        ErrorCode.BAD_FIELD, f"{path}: expected {expected}, got {type(value).__name__}"
    )


def _decode_value(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is types.UnionType or origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode_value(inner, value, path)
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, list | tuple):
            raise _bad(path, "an array", value)
        return tuple(_decode_value(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _bad(path, "a map", value)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _bad(path, "string keys", k)
            out[k] = _decode_value(item_tp, v, f"{path}.{k}")
        return out
    if isinstance(tp, type) and issubclass(tp, Message):
        return _decode_fields(tp, value, path)
    if tp is int:
        # bool is an int subclass; a peer sending true for a count is malformed
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(path, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad(path, "a number", value)
        # NaN compares false with everything, so a NaN timestamp or price
        # would pass every bound a handler checks; infinities are no better.
        if not math.isfinite(value):
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, f"{path}: not a finite number")
        return float(value)
    if tp in (str, bool, bytes):
        if type(value) is not tp:
            raise _bad(path, tp.__name__, value)
        return value
    raise LocalProtocolError(ErrorCode.INTERNAL, f"{path}: unsupported field type {tp!r}")


def signing_payload(msg: Message, domain: bytes) -> bytes:
    """What a signature over ``msg`` covers: ``domain`` and every field but ``signature``.

    The domain keeps a signature made for one kind of message from passing
    for another.
    """
    body = msg.to_wire()
    del body["signature"]
    return domain + bytes(msgpack.packb(body, use_bin_type=True))


class Codec:
    """Encodes and decodes the messages of one protocol.

    ``Codec([StatusRequest, StatusResponse, Error])`` accepts exactly those
    types; any other tag is UNKNOWN_TYPE.
    """

    def __init__(self, messages: Iterable[type[Message]]) -> None:
        self._by_tag: dict[str, type[Message]] = {}
        for cls in messages:
            if not cls.TYPE or cls.TYPE in self._by_tag:
                raise LocalProtocolError(ErrorCode.INTERNAL, f"bad or duplicate tag on {cls}")
            self._by_tag[cls.TYPE] = cls

    def encode(self, msg: Message) -> bytes:
        """One complete frame (length prefix included) carrying ``msg``."""
        return encode_frame(self.encode_body(msg))

    def encode_body(self, msg: Message) -> bytes:
        """The frame body alone, for carriers that frame messages themselves (gossip)."""
        if type(msg).TYPE not in self._by_tag:
            raise LocalProtocolError(
                ErrorCode.UNKNOWN_TYPE, f"{type(msg).__name__} is not part of this protocol"
            )
        return bytes(msgpack.packb(msg.to_wire(), use_bin_type=True))

    def decode(self, body: bytes) -> Message:
        """Parse one frame body; anything wrong raises RemoteProtocolError."""
        try:
            data = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            # ValueError covers bad UTF-8, ExtraData, FormatError and StackError.
            raise RemoteProtocolError(ErrorCode.MALFORMED, "body is not valid msgpack") from exc
        if not isinstance(data, dict):
            raise RemoteProtocolError(ErrorCode.MALFORMED, "body is not a map")
        tag = data.get("t")
        if not isinstance(tag, str):
            raise RemoteProtocolError(ErrorCode.MALFORMED, "missing type tag")
        cls = self._by_tag.get(tag)
        if cls is None:
            raise RemoteProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {tag[:40]!r}")
        return cls.from_wire(data)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Error(Message):
    """Sent before a stream is reset, so the peer learns why (every protocol)."""

    TYPE: ClassVar[str] = "error"
    code: int
    message: str = ""

    @classmethod
    def from_exception(cls, exc: Exception) -> Error:
        """The frame that reports ``exc``; internal failures say nothing more."""
        if isinstance(exc, RemoteProtocolError):
            return cls(code=int(exc.code), message=exc.detail[:200])
        return cls(code=int(ErrorCode.INTERNAL), message="internal error")
