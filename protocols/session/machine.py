"""State machines of the session handshake, one per side.

Theory of operation::

    consumer                                   provider
    IDLE ──send_hello()──► AWAIT_APPROVE        AWAIT_HELLO ──Hello──► DECIDING
         ◄── Approve ── approve() ──────────────  DECIDING ──approve()──► AWAIT_OPENED
         (or Reject: REJECTED)                            └─reject()──► REJECTED
    AWAIT_APPROVE ──Approve──► APPROVED (keys derived)
    APPROVED ──send_opened(id)──► AWAIT_READY   AWAIT_OPENED ──Opened──► CHECKING
         ◄── Ready ── ready() ──────────────────  CHECKING ──ready()──► READY
    AWAIT_READY ──Ready──► READY                          └─reject()──► REJECTED

Both sides hash the two peer ids of the stream (consumer's, provider's) and
the exact Hello and Approve bodies that crossed the wire into the transcript
(``crypto.handshake_transcript``); the keys come from it
(``crypto.SessionKeys``), and in free mode the session id is that hash. Each
machine is built with its own peer id and the one the stream authenticated
for the other end, so a handshake relayed through a third peer derives keys
the two real ends do not share. In chain mode the consumer opens the session
on chain between Approve and Opened, and the provider checks the chain
before ``ready()``: those decisions belong to the adapter, which sees
``Hello`` and ``Opened`` events and answers with ``approve``/``reject``/
``ready``. Randomness (the ephemeral keys) is passed in; the machines never
read a clock or do I/O.
"""

from __future__ import annotations

import enum

from p2pnode.errors import ErrorCode, LocalProtocolError
from p2pnode.protocols.framed import FramedMachine
from p2pnode.protocols.session.crypto import Ephemeral, SessionKeys, handshake_transcript
from p2pnode.protocols.session.messages import (
    CODEC,
    Approve,
    Hello,
    Opened,
    Ready,
    Reject,
    RejectCode,
)
from p2pnode.protocols.wire import PEER_CLOSED, Error, Message, Sentinel

EPHEMERAL_BYTES = 32
NONCE_BYTES = 16


class State(enum.Enum):
    IDLE = "idle"
    AWAIT_HELLO = "await_hello"
    DECIDING = "deciding"
    AWAIT_APPROVE = "await_approve"
    APPROVED = "approved"
    AWAIT_OPENED = "await_opened"
    CHECKING = "checking"
    AWAIT_READY = "await_ready"
    READY = "ready"
    REJECTED = "rejected"
    ERROR = "error"


class _Side(FramedMachine[State]):
    def __init__(self, max_frame: int, state: State, *, consumer: bytes, provider: bytes) -> None:
        super().__init__(max_frame, state, State.ERROR)
        if not consumer or not provider:
            raise LocalProtocolError(ErrorCode.BAD_FIELD, "a handshake needs both peer ids")
        self._consumer = consumer
        self._provider = provider
        self.keys: SessionKeys | None = None
        self.transcript = b""
        self._hello_body = b""

    def _next(self) -> tuple[Message, bytes] | Sentinel:
        got = self._next_frame(CODEC)
        if got is PEER_CLOSED:
            raise self._fail(ErrorCode.TRUNCATED, "closed during the handshake")
        return got

    def _derive(self, ours: Ephemeral, theirs: bytes, approve_body: bytes) -> None:
        self.transcript = handshake_transcript(
            consumer=self._consumer,
            provider=self._provider,
            hello=self._hello_body,
            approve=approve_body,
        )
        self.keys = SessionKeys.derive(ours.shared_secret(theirs), self.transcript)

    def send_error(self, error: Error) -> bytes:
        """Bytes of an Error frame; the handshake is over."""
        self.state = State.ERROR
        return CODEC.encode(error)

    def _check_key_sizes(self, ephemeral: bytes, nonce: bytes) -> None:
        if len(ephemeral) != EPHEMERAL_BYTES or len(nonce) != NONCE_BYTES:
            raise self._fail(ErrorCode.BAD_FIELD, "ephemeral key or nonce of the wrong size")


class ConsumerMachine(_Side):
    """The consumer's side: asks, derives keys on Approve, names the session, waits for Ready.

    ``local_peer`` is our libp2p peer id, ``remote_peer`` the provider's as
    the stream authenticated it (both as bytes); both go into the transcript.
    """

    def __init__(
        self, max_frame: int, ephemeral: Ephemeral, *, local_peer: bytes, remote_peer: bytes
    ) -> None:
        super().__init__(max_frame, State.IDLE, consumer=local_peer, provider=remote_peer)
        self._ephemeral = ephemeral
        self.session_id = b""

    def send_hello(self, hello: Hello) -> bytes:
        """Bytes of the Hello (its ``ephemeral`` must be this machine's public key)."""
        self._require(State.IDLE, "send Hello")
        if hello.ephemeral != self._ephemeral.public:
            raise LocalProtocolError(ErrorCode.BAD_FIELD, "Hello must carry our ephemeral key")
        frame = CODEC.encode(hello)
        self._hello_body = CODEC.encode_body(hello)
        self.state = State.AWAIT_APPROVE
        return frame

    def next_event(self) -> Approve | Reject | Ready | Error | Sentinel:
        """Approve (keys are then derived), Ready, or the provider's Reject/Error."""
        if self.state not in (State.AWAIT_APPROVE, State.AWAIT_READY):
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED, f"no event expected in {self.state.value}"
            )
        got = self._next()
        if isinstance(got, Sentinel):
            return got
        msg, body = got
        if isinstance(msg, Reject | Error):
            self.state = State.REJECTED
            return msg
        if self.state is State.AWAIT_APPROVE and isinstance(msg, Approve):
            self._check_key_sizes(msg.ephemeral, msg.nonce)
            self._derive(self._ephemeral, msg.ephemeral, body)
            self.state = State.APPROVED
            return msg
        if self.state is State.AWAIT_READY and isinstance(msg, Ready):
            if msg.session_id != self.session_id:
                raise self._fail(ErrorCode.BAD_FIELD, "Ready names another session")
            self.state = State.READY
            return msg
        raise self._fail(ErrorCode.UNEXPECTED, f"{msg.TYPE} in {self.state.value}")

    def send_opened(self, session_id: bytes | None = None) -> bytes:
        """Bytes of Opened; free mode (None): the session id is the transcript hash."""
        self._require(State.APPROVED, "send Opened")
        self.session_id = session_id if session_id is not None else self.transcript
        self.state = State.AWAIT_READY
        return CODEC.encode(Opened(session_id=self.session_id))


class ProviderMachine(_Side):
    """The provider's side: sees Hello, approves or rejects, checks Opened, says Ready.

    ``local_peer`` is our libp2p peer id, ``remote_peer`` the consumer's as
    the stream authenticated it (both as bytes); both go into the transcript.
    """

    def __init__(self, max_frame: int, *, local_peer: bytes, remote_peer: bytes) -> None:
        super().__init__(max_frame, State.AWAIT_HELLO, consumer=remote_peer, provider=local_peer)
        self.hello: Hello | None = None
        self.session_id = b""

    def next_event(self) -> Hello | Opened | Error | Sentinel:
        """The Hello to decide on, then the Opened to check (or the consumer's Error)."""
        if self.state not in (State.AWAIT_HELLO, State.AWAIT_OPENED):
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED, f"no event expected in {self.state.value}"
            )
        got = self._next()
        if isinstance(got, Sentinel):
            return got
        msg, body = got
        if isinstance(msg, Error):
            self.state = State.REJECTED
            return msg
        if self.state is State.AWAIT_HELLO and isinstance(msg, Hello):
            self._check_key_sizes(msg.ephemeral, msg.nonce)
            self._hello_body = body
            self.hello = msg
            self.state = State.DECIDING
            return msg
        if self.state is State.AWAIT_OPENED and isinstance(msg, Opened):
            self.session_id = msg.session_id
            self.state = State.CHECKING
            return msg
        raise self._fail(ErrorCode.UNEXPECTED, f"{msg.TYPE} in {self.state.value}")

    def approve(self, ephemeral: Ephemeral, approve: Approve) -> bytes:
        """Bytes of Approve (carrying ``ephemeral``'s public key); keys are derived now."""
        self._require(State.DECIDING, "approve")
        assert self.hello is not None
        if approve.ephemeral != ephemeral.public:
            raise LocalProtocolError(ErrorCode.BAD_FIELD, "Approve must carry our ephemeral key")
        frame = CODEC.encode(approve)
        self._derive(ephemeral, self.hello.ephemeral, CODEC.encode_body(approve))
        self.state = State.AWAIT_OPENED
        return frame

    @property
    def free_mode_session_ok(self) -> bool:
        """In free mode, whether the consumer named the session by the transcript hash."""
        return self.state is State.CHECKING and self.session_id == self.transcript

    def ready(self) -> bytes:
        """Bytes of Ready, once the adapter has checked the session."""
        self._require(State.CHECKING, "say Ready")
        self.state = State.READY
        return CODEC.encode(Ready(session_id=self.session_id))

    def reject(self, code: RejectCode, reason: str = "") -> bytes:
        """Bytes of Reject, while deciding on Hello or checking Opened."""
        if self.state not in (State.DECIDING, State.CHECKING):
            raise LocalProtocolError(ErrorCode.UNEXPECTED, f"cannot reject in {self.state.value}")
        self.state = State.REJECTED
        return CODEC.encode(Reject(code=int(code), reason=reason[:200]))
