"""``/p2pnode/dialback/1.0.0``: am I reachable? A peer dials me back to find out.

py-libp2p 0.8.1's AutoNAT dials back over the connection that already
exists, so it calls any address "reachable", even a port nobody listens on.
Here the asked peer dials each listed address from a *fresh* host with a new identity
and no listener, and answers with those where a secured (Noise) connection
to the asker's peer ID came up: an address is reachable only if something
the asker holds the key of answers there. It dials only plain TCP addresses
(``/ip4|ip6/<ip>/tcp/<port>``, no names to resolve) on the IP it sees the
asker connect from, over a direct connection (through a relay, the address it
sees is the relay's), each once and at most ``max_addrs`` of them, so it
cannot be used to probe third parties; and it answers a bounded number of
requests per asker, overall, and at once.
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
    # Requests answered per asking peer and overall, per minute (token
    # buckets: a burst up to the figure passes). A node asks each helper once
    # per check (every 5 minutes), so 6 leaves room for restarts; each
    # request costs up to ``max_addrs`` dials from a fresh host, so 60 a
    # minute overall is at most ~4 dials a second.
    requests_per_peer_per_minute: int = 6
    requests_per_minute: int = 60
    # Requests being answered at once (each runs a throwaway host); one more
    # is refused as busy.
    max_concurrent: int = 4


__all__ = ["CODEC", "PROTOCOL_ID", "Config", "DialBackRequest", "DialBackResponse"]
