"""Circuit relay v2 for private nodes (ARCHITECTURE §10), on py-libp2p's implementation.

Theory of operation. Every node runs the circuit v2 protocol's STOP side and
its transport, so it can accept relayed connections and dial ``/p2p-circuit``
addresses. A node started with ``relay_service`` also runs the HOP side with
limits (reservations, connection duration, bytes per circuit): any public
node can be a relay, none is special. A node that is private (by its
dial-back check or by configuration) and knows relays (``--relay``) connects
to them, reserves a slot once identify has run (trap 4: earlier, py-libp2p
caches "not a relay" for good), and advertises
``<relay>/p2p-circuit/p2p/<itself>`` in its offers; the transport renews the
reservations. A consumer that finds only circuit addresses in an offer dials
them through the relay transport (``host.connect`` ignores them, trap 4).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID, STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from p2pnode.errors import NetworkError
from p2pnode.p2p import host as hostlib
from p2pnode.p2p.host import short

logger = logging.getLogger(__name__)

CIRCUIT = "/p2p-circuit"
TaskStatus = Any  # trio.TaskStatus is shadowed by the trio-typing stubs


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Relay service limits (when this node relays for others) and relays to use."""

    service: bool = False
    max_reservations: int = 16
    max_circuits: int = 32
    circuit_duration_s: int = 3600
    circuit_bytes: int = 1 << 30
    reservation_ttl_s: int = 3600
    # Relays this node reserves on when it is private (full multiaddrs);
    # without any, it finds relays in the DHT.
    relays: tuple[str, ...] = ()
    # Reservations a private node keeps (several: a relay may die).
    want: int = 2
    reserve_timeout_s: float = 10.0


def is_circuit(addr: str) -> bool:
    return CIRCUIT in addr


class Relay:
    """The circuit v2 protocol, transport and this node's reservations."""

    def __init__(self, host: IHost, cfg: Config) -> None:
        self.cfg = cfg
        self._host = host
        limits = RelayLimits(
            duration=cfg.circuit_duration_s,
            data=cfg.circuit_bytes,
            max_circuit_conns=cfg.max_circuits,
            max_reservations=cfg.max_reservations,
            reservation_ttl=cfg.reservation_ttl_s,
        )
        roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if cfg.service else RelayRole(0))
        self.protocol = CircuitV2Protocol(host, limits=limits, allow_hop=cfg.service)
        self.transport = CircuitV2Transport(
            host, self.protocol, RelayConfig(roles=roles, limits=limits)
        )
        # relay peer id -> the circuit address it gives this node
        self.reservations: dict[str, str] = {}
        host.set_stream_handler(TProtocol(PROTOCOL_ID), self.protocol._handle_hop_stream)
        host.set_stream_handler(TProtocol(STOP_PROTOCOL_ID), self.protocol._handle_stop_stream)

    async def run(self, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Run the protocol service until cancelled."""
        async with background_trio_service(self.protocol):
            task_status.started()
            await trio.sleep_forever()

    async def reserve_all(self, nursery: trio.Nursery, discovered: Sequence[str] = ()) -> list[str]:
        """Reserve on the relays not yet reserved; returns the circuit addresses.

        The configured relays first, then ``discovered`` ones (from the DHT)
        until ``want`` reservations are held.
        """
        for addr in [*self.cfg.relays, *discovered]:
            if len(self.reservations) >= self.cfg.want:
                break
            info = hostlib.parse_peer_addr(addr)
            if str(info.peer_id) in self.reservations:
                continue
            try:
                await self.reserve(addr, nursery)
            except NetworkError as exc:
                logger.warning("no reservation on relay %s: %s", short(info.peer_id), exc)
        return list(self.reservations.values())

    async def reserve(self, relay_addr: str, nursery: trio.Nursery) -> str:
        """Reserve a slot on one relay; returns this node's circuit address through it."""
        info = hostlib.parse_peer_addr(relay_addr)
        relay = info.peer_id
        try:
            with trio.fail_after(self.cfg.reserve_timeout_s):
                await hostlib.connect(self._host, info, self.cfg.reserve_timeout_s)
                await self._identified(relay)
                stream = await self._host.new_stream(relay, [TProtocol(PROTOCOL_ID)])
                ok = await self.transport.reserve(stream, relay, nursery)
        except trio.TooSlowError as exc:
            raise NetworkError(f"relay {short(relay)} did not answer in time") from exc
        except NetworkError:
            raise
        except Exception as exc:  # noqa: BLE001 - py-libp2p's stream and relay errors
            raise NetworkError(f"relay {short(relay)}: {exc}") from exc
        if not ok:
            raise NetworkError(f"relay {short(relay)} refused the reservation")
        base = relay_addr.split("/p2p/")[0]
        circuit = f"{base}/p2p/{relay}{CIRCUIT}/p2p/{self._host.get_id()}"
        self.reservations[str(relay)] = circuit
        logger.info("reserved on relay %s: %s", short(relay), circuit)
        return circuit

    async def _identified(self, peer: ID) -> None:
        """Wait until identify has told us the peer's protocols (trap 4)."""
        peerstore = self._host.get_peerstore()
        while True:
            try:
                if peerstore.get_protocols(peer):
                    return
            except Exception:  # noqa: BLE001, S110 - unknown peer: not yet identified
                pass
            await trio.sleep(0.02)

    async def dial(self, circuit_addr: str) -> None:
        """Connect to a peer through the relay in its circuit address."""
        try:
            await self.transport.dial(multiaddr.Multiaddr(circuit_addr))
        except Exception as exc:  # noqa: BLE001 - ConnectionError and relay errors
            raise NetworkError(f"cannot dial {circuit_addr} through its relay: {exc}") from exc
