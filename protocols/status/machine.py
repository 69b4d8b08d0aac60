"""State machines of the status protocol: the unary machines bound to its messages."""

from __future__ import annotations

from p2pnode.protocols import unary
from p2pnode.protocols.status.messages import CODEC, StatusRequest, StatusResponse
from p2pnode.protocols.unary import State


class ClientMachine(unary.ClientMachine[StatusRequest, StatusResponse]):
    """Asks once for status (see ``protocols/unary.py`` for the states)."""

    def __init__(self, max_frame: int) -> None:
        super().__init__(CODEC, StatusResponse, max_frame)


class ServerMachine(unary.ServerMachine[StatusRequest, StatusResponse]):
    """Answers one status request."""

    def __init__(self, max_frame: int) -> None:
        super().__init__(CODEC, StatusRequest, max_frame)


__all__ = ["ClientMachine", "ServerMachine", "State"]
