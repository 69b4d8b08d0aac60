"""Messages of the dial-back protocol (docs/protocols.md#dial-back: honest reachability)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from p2pnode.protocols.wire import Codec, Error, Message


@dataclass(frozen=True, slots=True, kw_only=True)
class DialBackRequest(Message):
    """Please dial me back on these addresses (without /p2p/), from a fresh identity."""

    TYPE: ClassVar[str] = "dialback.request"
    addrs: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DialBackResponse(Message):
    """The addresses on which a secured connection to the asker succeeded."""

    TYPE: ClassVar[str] = "dialback.response"
    reachable: tuple[str, ...]
    observed: str = ""  # the asker's address as this peer sees it ("ip:port")


CODEC = Codec([DialBackRequest, DialBackResponse, Error])
