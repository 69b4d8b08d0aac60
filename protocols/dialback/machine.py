"""State machines of the dial-back protocol: the unary machines bound to its messages."""

from __future__ import annotations

from p2pnode.protocols import unary
from p2pnode.protocols.dialback.messages import CODEC, DialBackRequest, DialBackResponse


class ClientMachine(unary.ClientMachine[DialBackRequest, DialBackResponse]):
    def __init__(self, max_frame: int) -> None:
        super().__init__(CODEC, DialBackResponse, max_frame)


class ServerMachine(unary.ServerMachine[DialBackRequest, DialBackResponse]):
    def __init__(self, max_frame: int) -> None:
        super().__init__(CODEC, DialBackRequest, max_frame)
