"""State machines of the inference stream, one per side (docs/protocols.md#sealed-frames).

Theory of operation. Every frame's body starts with one byte saying what
follows: ``CLEAR`` (a msgpack message anyone can read) or ``SEALED`` (a
session-key ciphertext of one). A stream carries one request::

    consumer                                       provider
    open(request) ─► InferOpen (clear) + Request (sealed) ─►  AWAIT_OPEN
                                                   ──InferOpen──► CHECKING
                      ◄── Error (clear) ─────────── refuse()   (unknown session)
                                                   accept(keys) ──► AWAIT_REQUEST
                                                   ──Request──► STREAMING
    STREAMING ◄── Chunk… (sealed) ───────────────── chunk()
              ◄── Done{usage, receipt} ─────────── done()     ──► AWAIT_ACK
    DONE ── ack(signature) ─► Ack (sealed) ─►                  ──Ack──► CLOSED

A consumer that closes or resets the stream before Done has cancelled the
request; the provider's adapter stops generating when it sees that. Either
side may send an ``Error`` (sealed once keys are known) instead of its next
frame. Chunks are numbered from 0 and must arrive in order; the sealed
frames' counters make replay, reordering and splicing fail authentication
(``session.crypto``), which this machine reports as a RemoteProtocolError and
never as text.

Pure: no I/O, no clock. The provider's adapter looks the session's keys up
and decides admission; the consumer's adapter owns failover.
"""

from __future__ import annotations

import enum
from typing import Final

from p2pnode.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from p2pnode.protocols.framed import FramedMachine
from p2pnode.protocols.infer.messages import (
    CLEAR_CODEC,
    SEALED_CODEC,
    Ack,
    Chunk,
    Done,
    InferOpen,
    Request,
    TokenLogprob,
)
from p2pnode.protocols.session.crypto import MAX_STREAM_ID, Opener, Sealer, SessionKeys
from p2pnode.protocols.wire import (
    DEFAULT_MAX_FRAME,
    PEER_CLOSED,
    Codec,
    Error,
    Message,
    Sentinel,
    encode_frame,
)

CLEAR: Final = 0x00
SEALED: Final = 0x01


class State(enum.Enum):
    IDLE = "idle"
    AWAIT_OPEN = "await_open"
    CHECKING = "checking"
    AWAIT_REQUEST = "await_request"
    STREAMING = "streaming"
    AWAIT_ACK = "await_ack"
    DONE = "done"
    CLOSED = "closed"
    ERROR = "error"


class _Side(FramedMachine[State]):
    def __init__(self, max_frame: int, state: State) -> None:
        super().__init__(max_frame, state, State.ERROR)
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None

    def _keys(self, send_key: bytes, receive_key: bytes, session_id: bytes, stream: int) -> None:
        self._sealer = Sealer(send_key, session_id, stream)
        self._opener = Opener(receive_key, session_id, stream)

    def _clear(self, msg: Message) -> bytes:
        return encode_frame(bytes([CLEAR]) + CLEAR_CODEC.encode_body(msg))

    def sealed_frame(self, msg: Message) -> bytes:
        """``msg`` as a sealed frame under this machine's keys (for any state: no checks)."""
        if self._sealer is None:
            raise LocalProtocolError(ErrorCode.UNEXPECTED, "no session keys yet")
        return encode_frame(bytes([SEALED]) + self._sealer.seal(SEALED_CODEC.encode_body(msg)))

    def send_error(self, error: Error) -> bytes:
        """Bytes of an Error frame (sealed once keys are known); the machine is done."""
        frame = self._clear(error) if self._sealer is None else self.sealed_frame(error)
        self.state = State.ERROR
        return frame

    def _next(self, *, clear_ok: bool) -> Message | Sentinel:
        """The next message, opened and authenticated if sealed."""
        got = self._next_body()
        if isinstance(got, Sentinel):
            return got
        if not got:
            raise self._fail(ErrorCode.MALFORMED, "empty frame")
        kind, rest = got[0], got[1:]
        codec: Codec
        if kind == SEALED and self._opener is not None:
            try:
                rest = self._opener.open(rest)
            except RemoteProtocolError:
                self.state = State.ERROR
                raise
            codec = SEALED_CODEC
        elif kind == CLEAR and clear_ok:
            codec = CLEAR_CODEC
        else:
            raise self._fail(ErrorCode.UNEXPECTED, f"frame kind {kind} in {self.state.value}")
        try:
            return codec.decode(rest)
        except RemoteProtocolError:
            self.state = State.ERROR
            raise


class ConsumerMachine(_Side):
    """The consumer's side of one request."""

    def __init__(
        self, max_frame: int, keys: SessionKeys, session_id: bytes, stream_id: int
    ) -> None:
        super().__init__(max_frame, State.IDLE)
        self._session_id = session_id
        self._stream_id = stream_id
        self._keys(keys.consumer_to_provider, keys.provider_to_consumer, session_id, stream_id)
        self._seq = 0
        self._first = True

    def open(self, request: Request) -> bytes:
        """Bytes of InferOpen and the sealed Request: one write, no round trip."""
        self._require(State.IDLE, "open")
        self.state = State.STREAMING
        head = self._clear(InferOpen(session_id=self._session_id, stream_id=self._stream_id))
        return head + self.sealed_frame(request)

    def next_event(self) -> Chunk | Done | Error | Sentinel:
        """The next Chunk, then Done; or the provider's Error; PEER_CLOSED after Done."""
        if self.state in (State.DONE, State.CLOSED):
            got = self._next(clear_ok=False)
            if got is PEER_CLOSED or got is Sentinel.NEED_DATA:
                return got
            raise self._fail(ErrorCode.UNEXPECTED, "frame after Done")
        if self.state is not State.STREAMING:
            raise LocalProtocolError(ErrorCode.UNEXPECTED, f"no event in {self.state.value}")
        got = self._next(clear_ok=self._first)
        if got is PEER_CLOSED:
            raise self._fail(ErrorCode.TRUNCATED, "provider closed before Done")
        if isinstance(got, Sentinel):
            return got
        self._first = False
        if isinstance(got, Error):
            self.state = State.ERROR
            return got
        if isinstance(got, Chunk):
            if got.seq != self._seq:
                raise self._fail(ErrorCode.BAD_FIELD, f"chunk {got.seq}, expected {self._seq}")
            self._seq += 1
            return got
        if isinstance(got, Done):
            self.state = State.DONE
            return got
        raise self._fail(ErrorCode.UNEXPECTED, f"{got.TYPE} from a provider")

    def ack(self, signature: bytes, used_until: int = 0, usage_signature: bytes = b"") -> bytes:
        """Bytes of the sealed Ack over the receipt in Done (and, paid, the usage
        acknowledgement: ``used_until`` and the wallet's signature of it)."""
        self._require(State.DONE, "ack")
        frame = self.sealed_frame(
            Ack(signature=signature, used_until=used_until, usage_signature=usage_signature)
        )
        self.state = State.CLOSED
        return frame


class ProviderMachine(_Side):
    """The provider's side of one request.

    Until ``accept`` the peer is anyone who can open a stream, and what it
    sends is clear msgpack, which Python inflates many times over (a frame
    of empty maps costs ~70 bytes of objects per byte): the InferOpen frame
    gets the control-frame cap, and ``max_frame`` applies once the session's
    keys authenticate what follows.
    """

    def __init__(self, max_frame: int) -> None:
        super().__init__(min(max_frame, DEFAULT_MAX_FRAME), State.AWAIT_OPEN)
        self._max_frame = max_frame
        self.opened: InferOpen | None = None
        self._seq = 0

    def next_event(self) -> InferOpen | Request | Ack | Error | Sentinel:
        """InferOpen (look the keys up), Request, later Ack; PEER_CLOSED if the consumer left.

        While streaming, anything but PEER_CLOSED from the consumer is a
        protocol error; PEER_CLOSED then means the consumer cancelled.
        """
        if self.state not in (
            State.AWAIT_OPEN,
            State.AWAIT_REQUEST,
            State.STREAMING,
            State.AWAIT_ACK,
        ):
            raise LocalProtocolError(ErrorCode.UNEXPECTED, f"no event in {self.state.value}")
        got = self._next(clear_ok=self.state is State.AWAIT_OPEN)
        if isinstance(got, Sentinel):
            return got
        if isinstance(got, Error):
            self.state = State.ERROR
            return got
        if self.state is State.AWAIT_OPEN and isinstance(got, InferOpen):
            if not 0 <= got.stream_id <= MAX_STREAM_ID:
                raise self._fail(ErrorCode.BAD_FIELD, "stream id must fit in 32 bits")
            self.opened = got
            self.state = State.CHECKING
            return got
        if self.state is State.AWAIT_REQUEST and isinstance(got, Request):
            self.state = State.STREAMING
            return got
        if self.state is State.AWAIT_ACK and isinstance(got, Ack):
            self.state = State.CLOSED
            return got
        raise self._fail(ErrorCode.UNEXPECTED, f"{got.TYPE} in {self.state.value}")

    def accept(self, keys: SessionKeys) -> None:
        """The session named in InferOpen is known: its keys open what follows."""
        self._require(State.CHECKING, "accept")
        assert self.opened is not None
        self._keys(
            keys.provider_to_consumer,
            keys.consumer_to_provider,
            self.opened.session_id,
            self.opened.stream_id,
        )
        self._decoder.max_size = self._max_frame
        self.state = State.AWAIT_REQUEST

    def refuse(self, code: ErrorCode, message: str) -> bytes:
        """Bytes of a clear Error: no such session here (or not for this peer)."""
        self._require(State.CHECKING, "refuse")
        return self.send_error(Error(code=int(code), message=message[:200]))

    def chunk(
        self,
        text: str,
        tokens: int,
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[int, ...] = (),
        entries: tuple[TokenLogprob, ...] = (),
    ) -> bytes:
        """Bytes of the next sealed Chunk."""
        self._require(State.STREAMING, "send a chunk")
        chunk = Chunk(
            seq=self._seq,
            text=text,
            tokens=tokens,
            token_ids=token_ids,
            logprobs=logprobs,
            logprob_tokens=entries,
        )
        frame = self.sealed_frame(chunk)
        self._seq += 1
        return frame

    def done(self, done: Done) -> bytes:
        """Bytes of the sealed Done; the consumer's Ack comes next."""
        self._require(State.STREAMING, "send Done")
        frame = self.sealed_frame(done)
        self.state = State.AWAIT_ACK
        return frame


__all__ = ["CLEAR", "SEALED", "ConsumerMachine", "ProviderMachine", "State"]
