"""The part every protocol machine shares: a frame decoder and a state that can fail."""

from __future__ import annotations

import enum
from typing import Generic, TypeVar

from p2pnode.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from p2pnode.protocols.wire import Codec, FrameDecoder, Message, Sentinel

S = TypeVar("S", bound=enum.Enum)


class FramedMachine(Generic[S]):
    """Base of the per-stream machines: bytes in through ``receive_data``, state out.

    ``error_state`` is where the machine goes when the peer breaks the
    protocol or a write fails; it accepts nothing after that.
    """

    def __init__(self, max_frame: int, state: S, error_state: S) -> None:
        self._decoder = FrameDecoder(max_frame)
        self.state = state
        self._error_state = error_state

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the stream; ``b""`` when the peer closed."""
        self._decoder.receive_data(data)

    def send_failed(self) -> None:
        """The adapter could not write what this machine produced."""
        self.state = self._error_state

    def _next_frame(self, codec: Codec) -> tuple[Message, bytes] | Sentinel:
        """The next message and its exact body bytes, NEED_DATA or PEER_CLOSED.

        A malformed frame moves the machine to its error state and raises.
        """
        body = self._next_body()
        if isinstance(body, Sentinel):
            return body
        try:
            return codec.decode(body), body
        except RemoteProtocolError:
            self.state = self._error_state
            raise

    def _next_body(self) -> bytes | Sentinel:
        """The next frame's body undecoded (for machines that unwrap it first)."""
        try:
            return self._decoder.next_frame()
        except RemoteProtocolError:
            self.state = self._error_state
            raise

    def _fail(self, code: ErrorCode, detail: str) -> RemoteProtocolError:
        self.state = self._error_state
        return RemoteProtocolError(code, detail)

    def _require(self, state: S, action: str) -> None:
        if self.state is not state:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED, f"cannot {action} in state {self.state.value}"
            )
