"""The node's background loops that keep it joined, judged reachable and relayed.

Each is a service: ``run(task_status=...)`` starts it in the node's nursery
and it runs until cancelled.

- :class:`Bootstrap` dials the configured bootstrap peers at start, then
  redials lost ones every ``retry_s``.
- :class:`Reachability` asks a few connected peers to dial this node back
  (``p2p/nat.py``) and keeps the verdict.
- :class:`RelayKeeping`: while the node is private it holds reservations on
  relays (configured, else found in the DHT) and advertises the circuit
  addresses they give instead of its own.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from p2pnode.errors import NetworkError, RemoteProtocolError
from p2pnode.p2p import host as hostlib
from p2pnode.p2p import nat
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p.dialer import Dialer
from p2pnode.p2p.discovery import Discovery
from p2pnode.p2p.host import short
from p2pnode.protocols import dialback
from p2pnode.protocols.dialback import service as dialback_service

logger = logging.getLogger(__name__)
_RANDOM = secrets.SystemRandom()
# The longest wait between searches for relays while short of them.
_MAX_RELAY_SEARCH_WAIT_S = 600.0

TaskStatus = Any  # trio.TaskStatus is shadowed by the trio-typing stubs


class Bootstrap:
    """Connections to the bootstrap peers, kept."""

    def __init__(self, host: IHost, peers: Sequence[PeerInfo], *, timeout: float, retry_s: float):
        self._host = host
        self._peers = list(peers)
        self._timeout = timeout
        self._retry_s = retry_s

    async def run(self, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Try every bootstrap peer once (started after that), then redial lost ones."""
        await self.dial()
        task_status.started()
        while True:
            await trio.sleep(self._retry_s)
            await self.dial()

    async def dial(self) -> None:
        """Dial the bootstrap peers this node is not connected to, each bounded."""
        connected = set(self._host.get_connected_peers())

        async def dial(info: PeerInfo) -> None:
            try:
                await hostlib.connect(self._host, info, self._timeout)
                logger.info("connected to bootstrap peer %s", short(info.peer_id))
            except NetworkError as exc:
                logger.warning("bootstrap peer %s: %s", short(info.peer_id), exc)

        async with trio.open_nursery() as nursery:
            for info in self._peers:
                if info.peer_id not in connected:
                    nursery.start_soon(dial, info)


class Reachability:
    """Whether others can dial this node, by dial-back; forced by configuration or measured."""

    def __init__(
        self,
        host: IHost,
        dialer: Dialer,
        cfg: dialback.Config,
        *,
        own_addrs: Callable[[], Sequence[str]],
        forced: str = "auto",
        first_s: float = 30.0,
        every_s: float = 300.0,
    ) -> None:
        self._host = host
        self._dialer = dialer
        self._cfg = cfg
        self._own_addrs = own_addrs
        self._first_s = first_s
        self._every_s = every_s
        self.verdict = nat.Verdict()
        if forced != "auto":
            self.verdict = nat.Verdict(nat.Reachability(forced), forced=True)

    @property
    def private(self) -> bool:
        return self.verdict.reachability is nat.Reachability.PRIVATE

    async def run(self, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Check after the node's start-up is over, then every ``every_s``."""
        task_status.started()
        await trio.sleep(self._first_s)
        while True:
            await self.check()
            await trio.sleep(self._every_s)

    async def check(self, helpers: int = 3) -> nat.Verdict:
        """Ask up to ``helpers`` connected peers to dial this node back; keep the verdict."""
        if self.verdict.forced:
            return self.verdict
        own = nat.dialable(list(self._own_addrs()))
        answers = []

        async def ask(peer: ID) -> None:
            try:
                stream = await self._dialer.open_stream(peer, dialback.PROTOCOL_ID)
                answers.append(await dialback_service.request(stream, own, self._cfg))
            except (NetworkError, RemoteProtocolError) as exc:
                logger.debug("dial-back by %s failed: %s", short(peer), exc)

        async with trio.open_nursery() as nursery:
            # A random few, not the first to connect: peers that rush to
            # connect first cannot decide together what we believe.
            connected = list(self._host.get_connected_peers())
            for peer in _RANDOM.sample(connected, min(helpers, len(connected))):
                nursery.start_soon(ask, peer)
        self.verdict = nat.judge(answers)
        logger.info("reachability: %s (%d helpers)", self.verdict.reachability.value, len(answers))
        return self.verdict


class RelayKeeping:
    """While private: reservations on relays, and the circuit addresses as the node's own.

    ``direct_addrs`` are the addresses the node listens on; ``addrs`` is what
    it advertises (the circuits while private). ``addrs_changed()`` is told
    when that changes.
    """

    def __init__(
        self,
        host: IHost,
        relay: relaylib.Relay,
        reachability: Reachability,
        discovery: Discovery | None,
        *,
        check_s: float,
        addrs_changed: Callable[[], None],
    ) -> None:
        self._host = host
        self._relay = relay
        self._reachability = reachability
        self._discovery = discovery
        self._check_s = check_s
        self._addrs_changed = addrs_changed
        self.direct_addrs: list[str] = []
        self.addrs: list[str] = []
        # When the DHT may next be searched for relays, and the wait after
        # a search that left the node short of reservations.
        self._search_at = 0.0
        self._search_wait_s = check_s
        self.relay_searches = 0

    def listening(self, addrs: Sequence[str]) -> None:
        """The host listens at ``addrs``: advertised as they are until relayed."""
        self.direct_addrs = list(addrs)
        self.addrs = list(addrs)

    async def run(self, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Check the reservations every ``check_s`` while private (renewals run inside)."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                if self._reachability.private:
                    await self._keep(nursery)
                await trio.sleep(self._check_s)

    async def _keep(self, nursery: trio.Nursery) -> None:
        connected = self._host.get_connected_peers()
        for relay_id in list(self._relay.reservations):
            if ID.from_base58(relay_id) not in connected:
                logger.warning("relay %s is gone; reserving elsewhere", short(relay_id))
                self._relay.forget(relay_id)
                self._search_at, self._search_wait_s = 0.0, self._check_s
        discovered: list[str] = []
        short_of = len(self._relay.reservations) < self._relay.cfg.want
        searched = False
        now = trio.current_time()
        if short_of and self._discovery is not None and now >= self._search_at:
            searched = True
            self.relay_searches += 1
            configured = {hostlib.parse_peer_addr(a).peer_id for a in self._relay.cfg.relays}
            discovered = [
                a
                for a in await self._discovery.find_relays()
                if hostlib.parse_peer_addr(a).peer_id not in configured
            ]
        circuits = await self._relay.reserve_all(nursery, discovered)
        # A network with fewer relays than the node wants left it searching
        # the DHT every check for good (every second in the relay scenario:
        # ~13% of its process's loop). A search that leaves it short waits
        # twice as long before the next, up to _MAX_RELAY_SEARCH_WAIT_S.
        if len(self._relay.reservations) >= self._relay.cfg.want:
            self._search_wait_s = self._check_s
        elif searched:
            self._search_at = trio.current_time() + self._search_wait_s
            self._search_wait_s = min(2 * self._search_wait_s, _MAX_RELAY_SEARCH_WAIT_S)
        # A private node's own addresses are no use to others.
        addrs = circuits or self.direct_addrs
        if addrs != self.addrs:
            self.addrs = addrs
            self._addrs_changed()
