"""``/p2pnode/dialback/1.0.0``: am I reachable? A peer dials me back to find out.

py-libp2p 0.8.1's AutoNAT dials back over the connection that already
exists, so it calls any address "reachable" (LIBP2P_NOTES trap 5). Here the
asked peer dials each listed address from a *fresh* host with a new identity
and no listener, and answers with those where a secured (Noise) connection
to the asker's peer ID came up: an address is reachable only if something
the asker holds the key of answers there. It dials only addresses on the IP
it sees the asker connect from, at most ``max_addrs`` of them, so it cannot
be used to probe third parties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from p2pnode.protocols.dialback.messages import CODEC, DialBackRequest, DialBackResponse
from p2pnode.protocols.wire import DEFAULT_MAX_FRAME

PROTOCOL_ID: Final = "/p2pnode/dialback/1.0.0"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    max_frame: int = DEFAULT_MAX_FRAME
    max_addrs: int = 4
    # Each dial-back: a TCP connect and a Noise handshake; a NATed port
    # simply times out.
    dial_timeout: float = 3.0
    # Whole exchange, client side: every address may time out.
    timeout: float = 20.0


__all__ = ["CODEC", "PROTOCOL_ID", "Config", "DialBackRequest", "DialBackResponse"]
