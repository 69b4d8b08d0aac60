"""State machines for one-request, one-answer protocols (status, dial-back).

Theory of operation. A unary stream carries one exchange::

    client                                   server
    IDLE ──send_request()──► AWAITING         AWAITING ──request──► ANSWERING
    AWAITING ──response | Error──► DONE       ANSWERING ──send_response()──► DONE

Each machine is built for one protocol: its codec, and the request and
response classes it may carry. It is fed with ``receive_data(bytes)``
(``b""`` = EOF) and drained with ``next_event()``, which returns a message,
``NEED_DATA`` or ``PEER_CLOSED``. Anything the peer sends that the protocol
does not allow raises :class:`RemoteProtocolError` and moves the machine to
ERROR; so does a write the adapter reports as failed (``send_failed()``).
``send_error()`` answers with an Error frame from any state but DONE. No I/O,
no clock: the adapter owns time.
"""

from __future__ import annotations

import enum
from typing import Generic, TypeVar

from p2pnode.errors import ErrorCode, LocalProtocolError
from p2pnode.protocols.framed import FramedMachine
from p2pnode.protocols.wire import (
    NEED_DATA,
    PEER_CLOSED,
    Codec,
    Error,
    Message,
    Sentinel,
)

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


class State(enum.Enum):
    IDLE = "idle"
    AWAITING = "awaiting"
    ANSWERING = "answering"
    DONE = "done"
    ERROR = "error"


class _Side(FramedMachine[State]):
    def __init__(self, codec: Codec, max_frame: int, initial: State) -> None:
        super().__init__(max_frame, initial, State.ERROR)
        self._codec = codec

    def _next_message(self) -> Message | Sentinel:
        got = self._next_frame(self._codec)
        return got if isinstance(got, Sentinel) else got[0]


class ClientMachine(_Side, Generic[Req, Resp]):
    """The asking side: one request, then one response or error."""

    def __init__(self, codec: Codec, response: type[Resp], max_frame: int) -> None:
        super().__init__(codec, max_frame, State.IDLE)
        self._response = response

    def send_request(self, request: Req) -> bytes:
        """Bytes of the request; the machine then waits for the answer."""
        self._require(State.IDLE, "send a request")
        self.state = State.AWAITING
        return self._codec.encode(request)

    def next_event(self) -> Resp | Error | Sentinel:
        """The answer (the response or the server's Error) or NEED_DATA.

        EOF before an answer is TRUNCATED: a server must answer or send Error.
        """
        self._require(State.AWAITING, "wait for an answer")
        msg = self._next_message()
        if msg is NEED_DATA:
            return NEED_DATA
        if msg is PEER_CLOSED:
            raise self._fail(ErrorCode.TRUNCATED, "closed without an answer")
        if isinstance(msg, self._response | Error):
            self.state = State.DONE
            return msg
        assert isinstance(msg, Message)
        raise self._fail(ErrorCode.UNEXPECTED, f"{type(msg).TYPE} from a server")


class ServerMachine(_Side, Generic[Req, Resp]):
    """The answering side: waits for one request, sends one answer."""

    def __init__(self, codec: Codec, request: type[Req], max_frame: int) -> None:
        super().__init__(codec, max_frame, State.AWAITING)
        self._request = request

    def next_event(self) -> Req | Sentinel:
        """The request, NEED_DATA, or PEER_CLOSED if the client left first."""
        self._require(State.AWAITING, "wait for a request")
        msg = self._next_message()
        if msg is PEER_CLOSED:
            self.state = State.DONE
            return PEER_CLOSED
        if msg is NEED_DATA:
            return NEED_DATA
        if isinstance(msg, self._request):
            self.state = State.ANSWERING
            return msg
        assert isinstance(msg, Message)
        raise self._fail(ErrorCode.UNEXPECTED, f"{type(msg).TYPE} from a client")

    def send_response(self, response: Resp) -> bytes:
        """Bytes of the answer; only after a request arrived."""
        self._require(State.ANSWERING, "answer")
        self.state = State.DONE
        return self._codec.encode(response)

    def send_error(self, error: Error) -> bytes:
        """Bytes of an Error frame, to send before closing the stream."""
        if self.state is State.DONE:
            raise LocalProtocolError(ErrorCode.UNEXPECTED, "already answered")
        self.state = State.ERROR
        return self._codec.encode(error)
