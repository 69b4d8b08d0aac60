"""Build and run the libp2p host, with py-libp2p 0.8.1's traps handled.

The traps met here are in docs/libp2p-traps.md#host-and-connections: the
250 ms connect stall, auto-connect meshes, transports fixed at construction
and silent listen failures, SO_REUSEPORT port sharing, run() leaving
listeners open, and unbounded awaits.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, IMultiselectCommunicator, ISecureTransport, ITransport
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import ConnectionClosedError, IOException
from libp2p.io.trio import TrioTCPStream
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.protocol_muxer.exceptions import MultiselectClientError, MultiselectCommunicatorError
from libp2p.protocol_muxer.multiselect_client import (
    DEFAULT_NEGOTIATE_TIMEOUT,
    MULTISELECT_PROTOCOL_ID,
    PROTOCOL_NOT_FOUND_MSG,
    MultiselectClient,
)
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import MuxedStreamReset
from libp2p.stream_muxer.yamux.yamux import YamuxStream
from libp2p.utils import encode_delim

from p2pnode.errors import ConfigError, NetworkError
from p2pnode.scopes import single_errors_ungrouped

logger = logging.getLogger(__name__)

# py-libp2p 0.8.1's yamux answers every read with a WINDOW_UPDATE frame: one
# more encrypted frame per gossip message or token chunk, each way
# (docs/libp2p-traps.md#a-window-update-per-read). Its PY_YAMUX_RELEASE_ON_READ
# switch turns off one of the two branches that do it (a user's own setting
# wins); the other, "partial slack", still fired on every read (38 updates for
# a 51-frame answer), so credit now goes back as go-yamux returns it: once
# half the window has been read.
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")
_library_window_update = YamuxStream._auto_tune_and_send_window_update


async def _window_update_at_half(self: YamuxStream, *, bytes_read: int = 0) -> None:
    if bytes_read > 0:
        async with self.window_lock:
            self._pending_recv_release += bytes_read
            if self._pending_recv_release < self._grow_threshold():
                return  # the sender still has at least half a window of credit
    # The library's own accounting (auto-tuning included), with the credit due.
    await _library_window_update(self, bytes_read=0)


YamuxStream._auto_tune_and_send_window_update = _window_update_at_half  # type: ignore[method-assign]

# An RST removes the stream from its connection at once, and a later read of
# it then ends as a clean EOF, not as a reset: the reader would take a peer
# that refused its stream for one that broke the protocol. Which one the
# reader saw depended on frame timing (with a window update per read, the
# reset usually came first). docs/libp2p-traps.md#a-reset-read-as-an-eof
_library_read = YamuxStream.read


async def _read_keeping_resets(self: YamuxStream, n: int | None = -1) -> bytes:
    if self.reset_received and not self.conn.stream_buffers.get(self.stream_id):
        raise MuxedStreamReset("Stream was reset")
    return await _library_read(self, n)


YamuxStream.read = _read_keeping_resets  # type: ignore[method-assign]

# Noise reads each message as its 2-byte length, then its body: two socket
# reads (each a syscall and a trip through the trio loop) per message, and a
# burst of gossip is read message by message. The TCP stream now reads ahead
# up to 64 KiB and serves later reads from what it already holds
# (docs/libp2p-traps.md#two-socket-reads-per-message).
READ_AHEAD = 64 * 1024


async def _read_ahead(self: TrioTCPStream, n: int | None = None) -> bytes:
    async with self.read_lock:
        if n == 0:
            return b""
        if n is not None and n < 0:
            raise ValueError("max_bytes must be >= 1")  # as the library's socket read
        held: bytearray | None = getattr(self, "_ahead", None)
        if held is None:
            held = self._ahead = bytearray()  # type: ignore[attr-defined]
        if not held:
            try:
                # Never more than READ_AHEAD, whatever was asked: a read may
                # return less, and a length a peer sent (multistream-select's,
                # before Noise) must not size the buffer the socket read fills.
                data = await self.stream.receive_some(READ_AHEAD)
            except trio.BrokenResourceError as exc:
                # As the library's read: a reset reaches the muxer as a closed
                # connection, a local close as end of stream.
                raise ConnectionClosedError(
                    f"TCP connection reset by remote peer: {exc}", transport="tcp"
                ) from exc
            except trio.ClosedResourceError:
                return b""
            if n is None or n >= len(data):
                return data
            held += data
        # Deleting from the front of a bytearray is amortised O(1) in CPython:
        # a burst is not copied again for each message read out of it.
        piece = bytes(held[:n] if n is not None else held)
        del held[: len(piece)]
        return piece


_library_tcp_close = TrioTCPStream.close


async def _close_dropping_ahead(self: TrioTCPStream) -> None:
    # After a local close a read ends the stream at once, as the library's
    # does, rather than serving what was read ahead.
    self._ahead = bytearray()  # type: ignore[attr-defined]
    await _library_tcp_close(self)


TrioTCPStream.read = _read_ahead  # type: ignore[method-assign]
TrioTCPStream.close = _close_dropping_ahead  # type: ignore[method-assign]

# py-libp2p's multistream-select client writes its header, waits for the
# echo, then proposes the protocol and waits again: two round trips before a
# stream carries anything. With one protocol to propose, header and proposal
# go in one write, as go-multistream sends them (the listener answers both
# in order): one round trip and one frame less per stream
# (docs/libp2p-traps.md#two-round-trips-to-open-a-stream).
_library_select = MultiselectClient.select_one_of


async def _select_in_one_write(
    self: MultiselectClient,
    protocols: Sequence[TProtocol],
    communicator: IMultiselectCommunicator,
    negotiate_timeout: int = DEFAULT_NEGOTIATE_TIMEOUT,
) -> TProtocol:
    if (
        len(protocols) != 1
        or not protocols[0]
        or not isinstance(communicator, MultiselectCommunicator)
    ):
        return await _library_select(self, protocols, communicator, negotiate_timeout)
    protocol = protocols[0]
    with trio.move_on_after(negotiate_timeout):
        try:
            await communicator.read_writer.write(
                encode_delim(MULTISELECT_PROTOCOL_ID.encode()) + encode_delim(protocol.encode())
            )
        except (IOException, AssertionError, ValueError) as exc:  # as the library's write
            raise MultiselectClientError(f"handshake write failed: {exc}") from exc
        try:
            header = await communicator.read()
            answer = await communicator.read()
        except MultiselectCommunicatorError as exc:
            raise MultiselectClientError(f"protocol read failed: {exc}") from exc
        if header != MULTISELECT_PROTOCOL_ID:
            raise MultiselectClientError(f"multiselect protocol ID mismatch: got {header!r}")
        if answer == protocol:
            return protocol
        if answer == PROTOCOL_NOT_FOUND_MSG:
            raise MultiselectClientError(
                f"protocols not supported: tried {[protocol]}, response={answer!r}"
            )
        raise MultiselectClientError(f"unrecognized response: {answer!r}, protocol={protocol}")
    raise MultiselectClientError(
        f"response timed out after {negotiate_timeout}s, protocols tried: {[protocol]}"
    )


MultiselectClient.select_one_of = _select_in_one_write  # type: ignore[method-assign]


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """How the host listens, dials and bounds its connections."""

    # Loopback and an ephemeral port: a node is private until its user says
    # otherwise with --listen.
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    # With the default of 3, connect() waits 250 ms for parallel dials that
    # never come; one connection per peer makes it ~10 ms
    # (docs/libp2p-traps.md#connect-stall).
    max_connections_per_peer: int = 1
    # py-libp2p's auto-connector dials toward the midpoint of the watermarks
    # (200 by default), which turns a local network into a full mesh
    # (docs/libp2p-traps.md#auto-connect-mesh). A p2pnode needs a handful of
    # links; the DHT finds the rest.
    low_watermark: int = 4
    high_watermark: int = 24
    max_connections: int = 256
    # A dial on loopback takes ~10 ms and across continents ~0.5 s; 10 s is
    # py-libp2p's default and leaves room for relays.
    dial_timeout: float = 10.0
    # Closing sends a FIN per connection; on a dead network it could hang, so
    # shutdown gives up after this long.
    close_timeout: float = 5.0


def parse_multiaddr(text: str) -> multiaddr.Multiaddr:
    """Parse a multiaddr given by a user, with a readable error."""
    try:
        return multiaddr.Multiaddr(text)
    except Exception as exc:  # noqa: BLE001 - multiaddr raises bare ValueError/BinaryParseError/...
        raise ConfigError(f"not a multiaddr: {text!r} ({exc})") from exc


def parse_peer_addr(text: str) -> PeerInfo:
    """Parse ``/ip4/…/tcp/…/p2p/<peer id>`` into a PeerInfo."""
    addr = parse_multiaddr(text)
    try:
        return info_from_p2p_addr(addr)
    except Exception as exc:  # noqa: BLE001 - raises InvalidAddrError or ValueError
        raise ConfigError(f"{text!r} has no /p2p/<peer id> part ({exc})") from exc


# Every offer's addresses are checked on arrival, and a provider's offers
# repeat the same few: parsing them was ~4% of a 200-node simnet's loop.
@functools.lru_cache(maxsize=4096)
def dials_peer(text: str, peer_id: str) -> bool:
    """Whether ``text`` is a multiaddr ending in ``/p2p/<peer_id>`` (direct or circuit).

    The check an offer's addresses pass before anyone stores or dials them:
    a provider may only advertise addresses of itself, so a signed offer
    cannot point consumers at a third party. Never raises.
    """
    try:
        addr = multiaddr.Multiaddr(text)
        return str(info_from_p2p_addr(addr).peer_id) == peer_id
    except Exception:  # noqa: BLE001 - multiaddr and PeerInfo raise a zoo of types on junk
        return False


def build(
    key_pair: KeyPair, cfg: Config, *, transports: Sequence[ITransport] | None = None
) -> IHost:
    """A host with TCP and WebSocket transports (or ``transports``), ready to ``run``.

    ``transports`` replaces both, e.g. with the memory transport
    (``p2p/memory.py``) for tests that run the real stack without sockets.
    """
    conn_cfg = ConnectionConfig(
        max_connections_per_peer=cfg.max_connections_per_peer,
        max_connections=cfg.max_connections,
        low_watermark=cfg.low_watermark,
        high_watermark=cfg.high_watermark,
        min_connections=min(cfg.low_watermark, 2),
        dial_timeout=cfg.dial_timeout,
    )
    # Transports are fixed here (docs/libp2p-traps.md#silent-listen-failures).
    # Passing no listen_addrs and both flags gives TCP and WebSocket, so a node
    # that listens on TCP only can still dial a /ws peer. Noise alone: by
    # default the host also agrees to plaintext, where a peer may claim any
    # peer id (docs/libp2p-traps.md#plaintext-security-is-accepted).
    return new_host(
        key_pair=key_pair,
        connection_config=conn_cfg,
        transports=transports,
        enable_tcp=transports is None,
        enable_websocket=transports is None,
        sec_opt=noise_only(key_pair),
    )


def noise_only(key_pair: KeyPair) -> dict[TProtocol, ISecureTransport]:
    """The one security protocol a p2pnode speaks: Noise, which proves the peer key."""
    noise_key = create_new_x25519_key_pair().private_key
    return {NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=noise_key)}


def check_ports_free(listen: Sequence[str]) -> None:
    """Fail clearly when a fixed TCP port is already taken.

    py-libp2p binds with SO_REUSEPORT, so a second host on the same port
    starts without error and the kernel splits connections between them
    (docs/libp2p-traps.md#shared-ports). A plain bind without SO_REUSEPORT
    tells us first.
    """
    for text in listen:
        addr = parse_multiaddr(text)
        protos = {p.name for p in addr.protocols()}
        if "tcp" not in protos:
            continue
        port = int(addr.value_for_protocol("tcp"))
        if port == 0:
            continue
        family, ip = (
            (socket.AF_INET6, addr.value_for_protocol("ip6"))
            if "ip6" in protos
            else (socket.AF_INET, addr.value_for_protocol("ip4") if "ip4" in protos else "")
        )
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((ip, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(f"port {port} is already in use ({text})") from exc
                raise ConfigError(f"cannot listen on {text}: {exc.strerror}") from exc


@asynccontextmanager
async def running(host: IHost, cfg: Config) -> AsyncIterator[list[str]]:
    """Run the host and yield its full listen multiaddrs (with /p2p/<id>).

    Raises :class:`ConfigError` if any requested address does not end up
    listening (py-libp2p reports nothing: docs/libp2p-traps.md#silent-listen-failures).
    """
    check_ports_free(cfg.listen)
    addrs = [parse_multiaddr(a) for a in cfg.listen]
    with single_errors_ungrouped():
        async with host.run(listen_addrs=addrs):
            try:
                listening = host.get_transport_addrs()
                missing = [str(a) for a in addrs if not _covered(a, listening)]
                if missing:
                    raise ConfigError(f"could not listen on {', '.join(missing)}")
                try:
                    yield [str(a) for a in host.get_addrs()]
                finally:
                    # Before run() exits: its own stop path closes connections
                    # only while not cancelled, and a node is usually stopped
                    # by cancellation; its peers would then wait out their
                    # timeouts (docs/libp2p-traps.md#stopping-leaves-connections-open).
                    with trio.CancelScope(
                        shield=True, deadline=trio.current_time() + 2 * cfg.close_timeout
                    ):
                        await close_connections(host, cfg.close_timeout)
            finally:
                # py-libp2p 0.8.1: leaving run() stops its services but leaves
                # listeners accepting and connections open; close() ends both
                # (docs/libp2p-traps.md#run-leaves-listeners-open).
                with trio.CancelScope(
                    shield=True, deadline=trio.current_time() + cfg.close_timeout
                ):
                    await host.close()


async def close_connections(host: IHost, timeout: float) -> None:  # noqa: ASYNC109
    """Close every connection of ``host`` at once (each peer sees it end); never raises.

    The muxed connection itself: a cancelled ``SwarmConn.close`` has marked
    itself closed before its socket was (docs/libp2p-traps.md#stopping-leaves-connections-open).
    Each gets ``timeout`` for yamux's goodbye (a peer that stops reading can
    block it); past that, the socket is closed without one.
    """

    async def close(muxed: Any) -> None:
        try:
            with trio.move_on_after(timeout) as bounded:
                if not muxed.is_closed:
                    await muxed.close()
            if bounded.cancelled_caught:
                await muxed.secured_conn.close()
        except Exception as exc:  # noqa: BLE001 - py-libp2p's close raises a zoo of types on dead links
            logger.debug("closing a connection to %s: %s", short(muxed.peer_id), exc)

    async with trio.open_nursery() as nursery:
        for conn in host.get_network().get_connections():
            nursery.start_soon(close, conn.muxed_conn)


def _covered(wanted: multiaddr.Multiaddr, listening: Sequence[multiaddr.Multiaddr]) -> bool:
    """Whether some listener serves ``wanted`` (port 0 matches any port)."""
    want = [(p.name, _value(wanted, p.name)) for p in wanted.protocols()]
    for have in listening:
        got = [(p.name, _value(have, p.name)) for p in have.protocols()]
        if len(got) != len(want):
            continue
        if all(
            wn == gn and (wv == gv or (wn in ("tcp", "udp", "memory") and wv == "0"))
            for (wn, wv), (gn, gv) in zip(want, got, strict=True)
        ):
            return True
    return False


def _value(addr: multiaddr.Multiaddr, proto: str) -> str | None:
    try:
        return str(addr.value_for_protocol(proto))
    except Exception:  # noqa: BLE001 - protocols without a value (ws) raise
        return None


async def connect(host: IHost, peer: PeerInfo, timeout: float) -> None:  # noqa: ASYNC109
    """Connect to a peer, bounded; failures become NetworkError.

    See docs/libp2p-traps.md#unbounded-awaits.
    """
    forget_closed(host, peer.peer_id)
    try:
        with trio.fail_after(timeout):
            await host.connect(peer)
    except trio.TooSlowError as exc:
        raise NetworkError(f"no connection to {short(peer.peer_id)} within {timeout:g} s") from exc
    except NetworkError:
        raise
    except Exception as exc:  # noqa: BLE001 - py-libp2p raises SwarmException, OpenConnectionError, OSError...
        raise NetworkError(f"cannot connect to {short(peer.peer_id)}: {exc}") from exc


def forget_closed(host: IHost, peer: ID) -> None:
    """Take ``peer``'s connections that are marked closed off the swarm's records.

    A connection marks itself closed before its clean-up takes it off them; a
    clean-up that blocks or is cancelled leaves it listed, closed, for good, and
    while it is listed py-libp2p neither dials the peer again nor opens a
    stream to it (docs/libp2p-traps.md#closed-connections-stay-listed).
    """
    network: Any = host.get_network()  # remove_conn is Swarm's, not INetwork's
    for conn in list(network.get_connections(peer)):
        if conn.is_closed:
            network.remove_conn(conn)


def protect(host: IHost, peer: ID, tag: str) -> None:
    """Keep the swarm's pruner off ``peer``'s connections until :func:`unprotect`.

    Above its high watermark py-libp2p closes idle connections
    (docs/libp2p-traps.md#connection-trim): a relay and the private nodes
    holding reservations on it must not lose each other that way, or
    squatters take the freed slot. ``tag`` names who protects, so one
    role's exit does not lift another's protection of the same peer.
    """
    network: Any = host.get_network()  # protect/unprotect are Swarm's, not INetwork's
    network.protect(peer, tag)


def unprotect(host: IHost, peer: ID, tag: str) -> None:
    """Lift the protection :func:`protect` put on ``peer`` under ``tag``."""
    network: Any = host.get_network()
    network.unprotect(peer, tag)


def short(peer_id: ID | str) -> str:
    """The last 8 characters of a peer ID, enough for logs."""
    text = str(peer_id)
    return text[-8:]
