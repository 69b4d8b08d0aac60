"""Messages of the status protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from p2pnode.protocols.offers.messages import ModelOffer
from p2pnode.protocols.wire import Codec, Error, Message


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusRequest(Message):
    """Ask for the node's current status. Carries nothing yet."""

    TYPE: ClassVar[str] = "status.request"


@dataclass(frozen=True, slots=True, kw_only=True)
class Load(Message):
    """How busy the node's engines are right now."""

    slots_total: int = 0
    slots_free: int = 0
    queue_len: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusResponse(Message):
    """Who the node is and what it can do, as of the moment it answered."""

    TYPE: ClassVar[str] = "status.response"
    peer_id: str
    version: str
    addrs: tuple[str, ...]
    connected_peers: int
    uptime_s: float
    # As in the node's offer (terms included); empty when it serves nothing.
    models: tuple[ModelOffer, ...] = ()
    load: Load = Load()
    # The node's current signed offer (its gossip body), if it provides: a
    # consumer that found it in the DHT learns its terms from one call.
    offer: bytes = b""
    # "public", "private" or "unknown": what the node's dial-back check found.
    reachability: str = "unknown"
    # Peer ids of the relays the node holds a reservation on (when private).
    relays: tuple[str, ...] = ()
    # Live connections, by kind, and relayed connections this node upgraded
    # to direct ones (hole punching).
    direct_connections: int = 0
    relayed_connections: int = 0
    upgraded_connections: int = 0


CODEC = Codec([StatusRequest, StatusResponse, Error])
