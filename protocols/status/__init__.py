"""``/p2pnode/status/1.0.0``: ask a node who it is, what it serves and how busy it is.

One exchange per stream: the client sends ``StatusRequest``, the server answers
``StatusResponse`` (or ``Error``) and closes. Consumers use it to confirm an
offer before they trust it (docs/protocols.md#status); ``p2pnode status`` shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from p2pnode.protocols.status.machine import ClientMachine, ServerMachine, State
from p2pnode.protocols.status.messages import (
    CODEC,
    Load,
    StatusRequest,
    StatusResponse,
)
from p2pnode.protocols.wire import DEFAULT_MAX_FRAME

PROTOCOL_ID: Final = "/p2pnode/status/1.0.0"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Limits of the status protocol."""

    # An answer lists addresses and models: a few KiB at most. The shared
    # control-frame cap leaves room for growth and bounds a hostile peer.
    max_frame: int = DEFAULT_MAX_FRAME
    # A node on loopback answers in ~1 ms and across the world in <1 s; five
    # seconds tells "slow" from "gone" without hanging a caller.
    timeout: float = 5.0


__all__ = [
    "CODEC",
    "PROTOCOL_ID",
    "ClientMachine",
    "Config",
    "Load",
    "ServerMachine",
    "State",
    "StatusRequest",
    "StatusResponse",
]
