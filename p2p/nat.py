"""Reachability: whether other peers can dial this node (docs/protocols.md#dial-back).

Theory of operation. A node asks up to ``helpers`` of its connected peers to
dial it back (``/p2pnode/dialback/1.0.0``); each helper dials the listed
addresses from a fresh throwaway host, so an existing connection cannot make
a closed port look open (py-libp2p 0.8.1's AutoNAT reuses the connection the
request came on and calls any port open). A helper dials only plain TCP
addresses on the IP the asker connects from (:func:`dial_targets`), and
answers few requests per asker and overall (:class:`Helper`): otherwise any
peer could make it scan third parties.

The node is *public* when a confirmed address exists (two helpers agreeing
when two or more answered, so one lying peer cannot make a NATed node
believe it is reachable), *private* when helpers answered and none could
dial it, and *unknown* when nobody answered. ``--reachability
public|private`` overrides the check. Relay reservations and hole punching
build on this (``p2p/relay.py``).
"""

from __future__ import annotations

import collections
import enum
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.config import RetryConfig
from libp2p.peer.id import ID

from p2pnode.errors import ErrorCode
from p2pnode.p2p import host as hostlib
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p.host import short
from p2pnode.p2p.ratelimit import RateLimiter, TokenBucket
from p2pnode.protocols import dialback
from p2pnode.protocols.dialback import service as dialback_service
from p2pnode.protocols.dialback.messages import DialBackRequest, DialBackResponse
from p2pnode.protocols.wire import Error

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


# An IP address as the standard library parses it.
IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class HelperCounters:
    """What this node's dial-back service did for others."""

    answered: int = 0
    refused_rate: int = 0  # over the asker's or the overall budget
    refused_busy: int = 0  # ``max_concurrent`` answers already running
    refused_relayed: int = 0  # asked over a relay: the asker's address is unknown
    dials: int = 0  # dial-backs tried, over all answers


class Helper:
    """The answering side of dial-back, with its budgets (one per node).

    ``serve`` answers one inbound ``/p2pnode/dialback/1.0.0`` stream: it
    dials the asker back on the addresses :func:`dial_targets` allows, from a
    fresh host, then closes the stream. A request over a relayed connection,
    beyond the asker's rate or the overall rate, or beyond ``max_concurrent``
    gets an Error frame (UNSUPPORTED, RATE_LIMITED, BUSY) before its request
    is read, so refusing costs nothing. Raises what ``unary_service.serve``
    raises (RemoteProtocolError for a malformed request).
    """

    def __init__(self, cfg: dialback.Config) -> None:
        self.cfg = cfg
        self.counters = HelperCounters()
        self._per_peer = RateLimiter(cfg.requests_per_peer_per_minute)
        self._overall = TokenBucket(cfg.requests_per_minute, cfg.requests_per_minute / 60.0)
        self._running = 0

    async def serve(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        relayed = relaylib.is_relayed(stream.muxed_conn)
        remote = None if relayed else stream.get_remote_address()
        observed = parse_ip(remote[0]) if remote else None
        refusal = self._admit(str(peer), relayed, trio.current_time())
        if refusal is not None:
            await dialback_service.refuse(stream, refusal, self.cfg)
            return

        async def answer(request: DialBackRequest) -> DialBackResponse:
            targets = dial_targets(request.addrs, observed, self.cfg.max_addrs)
            self.counters.dials += len(targets)
            reachable = await _dial_back(peer, targets, self.cfg.dial_timeout)
            self.counters.answered += 1
            seen = f"{remote[0]}:{remote[1]}" if remote else ""
            return DialBackResponse(reachable=tuple(reachable), observed=seen)

        # The dial-backs may each take dial_timeout: the answer gets their time.
        wait_s = self.cfg.dial_timeout * self.cfg.max_addrs + 5.0
        self._running += 1
        try:
            await dialback_service.serve(stream, answer, self.cfg, wait_s)
        finally:
            self._running -= 1

    def _admit(self, peer: str, relayed: bool, now: float) -> Error | None:
        """None if a request may be answered now, else the Error frame that refuses it."""
        if relayed:
            self.counters.refused_relayed += 1
            return Error(code=ErrorCode.UNSUPPORTED, message="dial-back needs a direct connection")
        if self._running >= self.cfg.max_concurrent:
            self.counters.refused_busy += 1
            return Error(code=ErrorCode.BUSY, message="too many dial-backs at once")
        # The asker's own budget first: one peer's flood must not spend the
        # overall budget before it is cut off.
        if not self._per_peer.allow(peer, now) or not self._overall.take(1.0, now):
            self.counters.refused_rate += 1
            return Error(code=ErrorCode.RATE_LIMITED, message="too many dial-back requests")
        return None


def dial_targets(addrs: Sequence[str], observed: IP | None, max_addrs: int) -> list[str]:
    """The addresses a helper may dial for an asker it sees at IP ``observed``.

    Only ``/ip4/<ip>/tcp/<port>`` and ``/ip6/<ip>/tcp/<port>`` with ``<ip>``
    the asker's own: no names to resolve (``/dns`` could point anywhere),
    nothing stacked after the port. Each address once, looking at no more
    than the first ``max_addrs`` listed. None at all when ``observed`` is
    None (unknown, or the connection is relayed and the address seen is the
    relay's). Returns the addresses as the asker wrote them.
    """
    if observed is None:
        return []
    out: list[str] = []
    for text in addrs[:max_addrs]:
        if text not in out and _plain_tcp_ip(text) == observed:
            out.append(text)
    return out


def _plain_tcp_ip(text: str) -> IP | None:
    """The IP of ``/ip4|ip6/<ip>/tcp/<port>`` (a real port), else None."""
    try:
        ma = multiaddr.Multiaddr(text)
        names = [p.name for p in ma.protocols()]
        if names not in (["ip4", "tcp"], ["ip6", "tcp"]):
            return None
        if int(ma.value_for_protocol("tcp")) == 0:
            return None
        return parse_ip(str(ma.value_for_protocol(names[0])))
    except Exception:  # noqa: BLE001 - multiaddr raises several kinds on bad text
        return None


def parse_ip(text: str) -> IP | None:
    """An IP address, IPv4-mapped IPv6 ones as IPv4 (as a dual-stack socket reports them)."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


async def _dial_back(peer: ID, addrs: Sequence[str], dial_s: float) -> list[str]:
    """The addresses where a secured connection to ``peer`` comes up, each tried once."""
    if not addrs:
        return []
    reachable = []
    # A fresh identity and no listener: the connection this check makes
    # cannot be confused with (or reuse) the one the request came on.
    prober = hostlib.build(create_new_key_pair(), hostlib.Config(listen=()))
    # py-libp2p 0.8.1's host.connect() tries an address 4 times (retries with
    # backoff), then refuses to dial the peer again for a while (a negative
    # cache): each address would cost its target 4 connections, and only the
    # first address listed would be tested. One attempt per address instead
    # (docs/libp2p-traps.md#dial-retries-and-the-negative-cache).
    network: Any = prober.get_network()  # retry_config and dial_addr are Swarm's
    network.retry_config = RetryConfig(max_retries=0)
    async with prober.run(listen_addrs=[]):
        try:
            for addr in addrs:
                try:
                    with trio.fail_after(dial_s):
                        await network.dial_addr(multiaddr.Multiaddr(addr), peer)
                    reachable.append(addr)
                except trio.TooSlowError:
                    logger.debug("dial-back to %s at %s timed out", short(peer), addr)
                except Exception as exc:  # noqa: BLE001 - SwarmException, OSError, handshake errors
                    logger.debug("dial-back to %s at %s failed: %s", short(peer), addr, exc)
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 2.0):
                await prober.close()
    return reachable


__all__ = ["Helper", "Reachability", "Verdict", "dial_targets", "dialable", "judge"]
