"""Reachability: whether other peers can dial this node (ARCHITECTURE §10).

Theory of operation. A node asks up to ``helpers`` of its connected peers to
dial it back (``/p2pnode/dialback/1.0.0``); each helper dials every listed
address from a fresh throwaway host, so an existing connection cannot make a
closed port look open (py-libp2p's AutoNAT can, LIBP2P_NOTES trap 5). The
node is *public* when a confirmed address exists (two helpers agreeing when
two or more answered, so one lying peer cannot make a NATed node believe it
is reachable), *private* when helpers answered and none could dial it, and
*unknown* when nobody answered. ``--reachability public|private`` overrides
the check. Relay reservations and hole punching build on this (to come).
"""

from __future__ import annotations

import collections
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from p2pnode.errors import NetworkError
from p2pnode.p2p import host as hostlib
from p2pnode.p2p.host import short
from p2pnode.protocols import dialback, unary_service
from p2pnode.protocols.dialback.machine import ClientMachine, ServerMachine
from p2pnode.protocols.dialback.messages import DialBackRequest, DialBackResponse

logger = logging.getLogger(__name__)


class Reachability(enum.Enum):
    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"


@dataclass
class Verdict:
    """What the last check found."""

    reachability: Reachability = Reachability.UNKNOWN
    confirmed: tuple[str, ...] = ()  # addresses some helper(s) dialled back
    helpers: int = 0  # peers that answered
    forced: bool = False  # set by configuration, not measured
    votes: collections.Counter[str] = field(default_factory=collections.Counter)


def judge(answers: Sequence[DialBackResponse]) -> Verdict:
    """Public if an address was confirmed by two helpers (one, if only one answered)."""
    votes: collections.Counter[str] = collections.Counter()
    for answer in answers:
        votes.update(set(answer.reachable))
    if not answers:
        return Verdict()
    needed = 1 if len(answers) == 1 else 2
    confirmed = tuple(sorted(a for a, n in votes.items() if n >= needed))
    state = Reachability.PUBLIC if confirmed else Reachability.PRIVATE
    return Verdict(state, confirmed, len(answers), votes=votes)


def dialable(addrs: Sequence[str]) -> list[str]:
    """The node's own TCP addresses, without /p2p/: what helpers are asked to dial."""
    out = []
    for text in addrs:
        names = [p.name for p in multiaddr.Multiaddr(text).protocols()]
        if names[:2] in (["ip4", "tcp"], ["ip6", "tcp"]) and "ws" not in names:
            out.append(text.split("/p2p/")[0])
    return out


async def serve(stream: INetStream, cfg: dialback.Config) -> None:
    """Dial the asker back on its addresses (same IP as it came from) from a fresh host."""
    peer = stream.muxed_conn.peer_id
    remote = stream.get_remote_address()
    observed_ip = remote[0] if remote else None

    async def answer(request: DialBackRequest) -> DialBackResponse:
        candidates = [a for a in request.addrs[: cfg.max_addrs] if _ip_of(a) == observed_ip]
        reachable = await _dial_back(peer, candidates, cfg.dial_timeout)
        observed = f"{remote[0]}:{remote[1]}" if remote else ""
        return DialBackResponse(reachable=tuple(reachable), observed=observed)

    # The dial-backs may each take dial_timeout: the answer gets their time.
    wait_s = cfg.dial_timeout * cfg.max_addrs + 5.0
    await unary_service.serve(stream, ServerMachine(cfg.max_frame), answer, wait_s)


def _ip_of(addr: str) -> str | None:
    try:
        ma = multiaddr.Multiaddr(addr)
        for proto in ("ip4", "ip6"):
            if proto in [p.name for p in ma.protocols()]:
                return str(ma.value_for_protocol(proto))
    except Exception:  # noqa: BLE001 - multiaddr raises several kinds on bad text
        return None
    return None


async def _dial_back(peer: ID, addrs: Sequence[str], dial_s: float) -> list[str]:
    if not addrs:
        return []
    reachable = []
    # A fresh identity and no listener: the connection this check makes
    # cannot be confused with (or reuse) the one the request came on.
    prober = hostlib.build(create_new_key_pair(), hostlib.Config(listen=()))
    async with prober.run(listen_addrs=[]):
        try:
            for addr in addrs:
                try:
                    info = PeerInfo(peer, [multiaddr.Multiaddr(addr)])
                    await hostlib.connect(prober, info, dial_s)
                    reachable.append(addr)
                except (NetworkError, ValueError) as exc:
                    logger.debug("dial-back to %s at %s failed: %s", short(peer), addr, exc)
        finally:
            with trio.move_on_after(2.0), trio.CancelScope(shield=True):
                await prober.close()
    return reachable


async def ask(stream: INetStream, addrs: Sequence[str], cfg: dialback.Config) -> DialBackResponse:
    """Ask one peer to dial us back (see ``unary_service.request``)."""
    request = DialBackRequest(addrs=tuple(addrs[: cfg.max_addrs]))
    return await unary_service.request(stream, ClientMachine(cfg.max_frame), request, cfg.timeout)


__all__ = ["Reachability", "Verdict", "ask", "dialable", "judge", "serve"]
