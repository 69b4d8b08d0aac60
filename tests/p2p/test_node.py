"""Real nodes on 127.0.0.1: bootstrap, status, hostile peers, listen failures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio
import trio.testing
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.io.trio import TrioTCPStream
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux.yamux import YamuxStream

from p2pnode import __version__
from p2pnode.errors import ConfigError, ErrorCode
from p2pnode.p2p import host as hostlib
from p2pnode.p2p import market
from p2pnode.p2p.node import Node, NodeConfig, open_node
from p2pnode.protocols import status
from p2pnode.protocols.wire import (
    PEER_CLOSED,
    Codec,
    Error,
    FrameDecoder,
    encode_frame,
    encode_varint,
)

# Generous bound for anything on loopback; the real figures are ~10 ms.
BOUND_S = 10


def _config(**kw: object) -> NodeConfig:
    return NodeConfig(**kw)  # type: ignore[arg-type]


OpenNode = Callable[..., AbstractAsyncContextManager[Node]]


@pytest.fixture
def node_factory() -> OpenNode:
    @asynccontextmanager
    async def factory(**kw: object) -> AsyncIterator[Node]:
        async with open_node(_config(**kw), key_pair=create_new_key_pair()) as node:
            yield node

    return factory


async def test_bootstrap_and_status_both_ways(node_factory: OpenNode) -> None:
    async with node_factory() as a, node_factory(bootstrap=(a.addrs[0],)) as b:
        assert a.peer_id in b.connected_peers()
        with trio.fail_after(BOUND_S):
            about_a = await b.finder.status_of(a.peer_id)
            about_b = await a.finder.status_of(b.peer_id)  # over the inbound connection
        assert about_a.peer_id == a.peer_id
        assert about_a.version == __version__
        assert about_a.addrs == tuple(a.addrs)
        assert about_a.connected_peers == 1
        assert about_a.models == ()
        assert about_b.peer_id == b.peer_id
        assert about_b.connected_peers == 1


async def test_three_nodes_join_through_one(node_factory: OpenNode) -> None:
    async with node_factory() as hub:
        boot = (hub.addrs[0],)
        async with node_factory(bootstrap=boot) as b, node_factory(bootstrap=boot) as c:
            with trio.fail_after(BOUND_S):
                assert (await c.finder.status_of(hub.peer_id)).connected_peers == 2
                # c knows b only by its address; it dials it directly.
                assert (await c.finder.status_of(b.addrs[0])).peer_id == b.peer_id


async def test_status_over_websocket(node_factory: OpenNode) -> None:
    ws = hostlib.Config(listen=("/ip4/127.0.0.1/tcp/0/ws",))
    async with node_factory(host=ws) as a, node_factory() as b:
        assert "/ws/" in a.addrs[0]
        with trio.fail_after(BOUND_S):
            assert (await b.finder.status_of(a.addrs[0])).peer_id == a.peer_id


async def test_unreachable_bootstrap_peer_does_not_stop_the_start(node_factory: OpenNode) -> None:
    async with node_factory() as gone:
        addr = gone.addrs[0]
    async with node_factory(bootstrap=(addr,), bootstrap_timeout=2.0) as node:
        assert node.connected_peers() == []


async def _raw_exchange(client: Node, server: Node, payload: bytes) -> Error | None:
    """Send raw bytes on a status stream and return the Error frame we get back."""
    peer = ID.from_base58(server.peer_id)
    stream = await client.host.new_stream(peer, [TProtocol(status.PROTOCOL_ID)])
    await stream.write(payload)
    decoder = FrameDecoder()
    while True:
        frame = decoder.next_frame()
        if isinstance(frame, bytes):
            msg = Codec([Error]).decode(frame)
            assert isinstance(msg, Error)
            return msg
        if frame is PEER_CLOSED:
            return None
        try:
            decoder.receive_data(await stream.read(65536))
        except EOFError:
            decoder.receive_data(b"")


async def test_hostile_peer_gets_error_codes_while_others_are_served(
    node_factory: OpenNode,
) -> None:
    async with node_factory() as server, node_factory() as good, node_factory() as bad:
        await good.dialer.connect(server.addrs[0])
        await bad.dialer.connect(server.addrs[0])
        answers: list[status.StatusResponse] = []

        async def keep_asking() -> None:
            for _ in range(30):
                answers.append(await good.finder.status_of(server.peer_id))

        with trio.fail_after(BOUND_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_asking)
                garbage = await _raw_exchange(bad, server, encode_frame(b"\xc1\xc1 not msgpack"))
                oversize = await _raw_exchange(
                    bad, server, encode_varint(50 * 1024 * 1024) + b"\x00" * 4096
                )
                unknown = await _raw_exchange(
                    bad,
                    server,
                    encode_frame(b"\x81\xa1t\xa5hello"),  # {"t": "hello"}
                )
        assert garbage is not None
        assert garbage.code == ErrorCode.MALFORMED
        assert oversize is not None
        assert oversize.code == ErrorCode.OVERSIZE
        assert unknown is not None
        assert unknown.code == ErrorCode.UNKNOWN_TYPE
        assert len(answers) == 30
        assert all(a.peer_id == server.peer_id for a in answers)
        standing = server.reputation.standing(bad.peer_id, trio.current_time())
        assert standing is not None
        assert standing.offences == {"protocol": 3}
        assert server.reputation.standing(good.peer_id, trio.current_time()) is None
        # The hostile peer's connection survives too: only its streams were closed.
        assert (await bad.finder.status_of(server.peer_id)).peer_id == server.peer_id


async def test_silent_client_gets_a_timeout_error(node_factory: OpenNode) -> None:
    quick = status.Config(timeout=0.3)
    async with node_factory(status=quick) as server, node_factory() as client:
        await client.dialer.connect(server.addrs[0])
        with trio.fail_after(BOUND_S):
            error = await _raw_exchange(client, server, b"")
        assert error is not None
        assert error.code == ErrorCode.TIMEOUT


async def test_fixed_port_in_use_is_a_config_error(node_factory: OpenNode) -> None:
    async with node_factory() as first:
        port = first.addrs[0].split("/tcp/")[1].split("/")[0]
        taken = hostlib.Config(listen=(f"/ip4/127.0.0.1/tcp/{port}",))
        with pytest.raises(ConfigError, match=f"port {port} is already in use"):
            async with node_factory(host=taken):
                pass


async def test_address_no_transport_can_serve_is_a_config_error(node_factory: OpenNode) -> None:
    """py-libp2p silently listens nowhere; we refuse to start.

    See docs/libp2p-traps.md#silent-listen-failures.
    """
    quic = hostlib.Config(listen=("/ip4/127.0.0.1/udp/0/quic-v1",))
    with pytest.raises(ConfigError, match="could not listen on /ip4/127.0.0.1/udp/0/quic-v1"):
        async with node_factory(host=quic):
            pass


async def test_malformed_bootstrap_address_is_a_config_error(node_factory: OpenNode) -> None:
    with pytest.raises(ConfigError, match="no /p2p/<peer id> part"):
        async with node_factory(bootstrap=("/ip4/127.0.0.1/tcp/4001",)):
            pass


async def test_paid_terms_without_a_wallet_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="paid mode needs both the market's terms and a wallet"):
        async with open_node(NodeConfig(market=market.Config()), key_pair=create_new_key_pair()):
            pass


SINK = TProtocol("/p2pnode-test/sink/1")


async def _stream_to(
    server: Node, client: Node, sink: Callable[[INetStream], Awaitable[None]]
) -> INetStream:
    """A stream from ``client`` to ``server``, whose handler is ``sink``."""
    server.host.set_stream_handler(SINK, sink)
    await client.dialer.connect(server.addrs[0])
    return await client.host.new_stream(ID.from_base58(server.peer_id), [SINK])


async def test_a_reader_returns_credit_by_half_windows_not_per_read(
    node_factory: OpenNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # py-libp2p's yamux sent a WINDOW_UPDATE after nearly every read: one more
    # encrypted frame each way per token chunk (docs/libp2p-traps.md#a-window-update-per-read).
    updates: list[int] = []
    library_update = YamuxStream.send_window_update

    async def counted(self: YamuxStream, increment: int, skip_lock: bool = False) -> None:
        updates.append(increment)
        await library_update(self, increment, skip_lock)

    monkeypatch.setattr(YamuxStream, "send_window_update", counted)
    small, large = 50 * 1000, 600 * 1024  # under half a window (128 KiB), then past it
    received = trio.Event()
    read_small = trio.Event()
    total = 0

    async def sink(stream: INetStream) -> None:
        nonlocal total
        while total < small + large:
            total += len(await stream.read(65536))
            if total >= small:
                read_small.set()
        received.set()

    async with node_factory() as server, node_factory() as client:
        with trio.fail_after(BOUND_S):
            stream = await _stream_to(server, client, sink)
            for _ in range(50):
                await stream.write(b"x" * 1000)  # each a frame, each read alone
                await trio.sleep(0.001)
            await read_small.wait()
            assert updates == []
            # More than the whole window: the sender waits for credit, which comes.
            await stream.write(b"y" * large)
            await received.wait()
    assert total == small + large
    assert 1 <= len(updates) <= 8


async def test_a_stream_is_proposed_in_one_write(
    node_factory: OpenNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # py-libp2p wrote multistream-select's header, waited for its echo, then
    # proposed the protocol and waited again: two round trips before a stream
    # carried anything (docs/libp2p-traps.md#two-round-trips-to-open-a-stream).
    writes: list[tuple[YamuxStream, bytes]] = []
    library_write = YamuxStream.write

    async def counted(self: YamuxStream, data: bytes) -> None:
        writes.append((self, data))
        await library_write(self, data)

    async def sink(stream: INetStream) -> None:
        await stream.close()

    async with node_factory() as server, node_factory() as client:
        with trio.fail_after(BOUND_S):
            await _stream_to(server, client, sink)  # connected, the handler set
            monkeypatch.setattr(YamuxStream, "write", counted)
            peer = ID.from_base58(server.peer_id)
            stream = await client.host.new_stream(peer, [SINK])
            ours = [data for muxed, data in writes if muxed is stream.muxed_stream]
            assert len(ours) == 1
            assert b"/multistream/1.0.0\n" in ours[0]
            assert ours[0].endswith(SINK.encode() + b"\n")
            # A protocol the peer does not speak is still refused.
            with pytest.raises(StreamFailure) as refused:
                await client.host.new_stream(peer, [TProtocol("/p2pnode-test/none/1")])
            assert "protocols not supported" in str(refused.value.__cause__)


async def test_reading_ahead_keeps_order_bounds_the_socket_read_and_ends_at_close() -> None:
    asked: list[int | None] = []

    class Recorded:
        """A socket stream's reading side over bytes, noting what each read asks for."""

        def __init__(self, data: bytes) -> None:
            self._inner = trio.testing.MemoryReceiveStream()
            self._inner.put_data(data)
            self._inner.put_eof()

        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            asked.append(max_bytes)
            return await self._inner.receive_some(max_bytes)

        async def aclose(self) -> None:
            await self._inner.aclose()

    def over(data: bytes) -> TrioTCPStream:
        return TrioTCPStream(Recorded(data))  # type: ignore[arg-type]

    stream = over(b"\x00\x03abc\x00\x02de")
    # Two length-prefixed messages, read as Noise reads them: one socket read.
    assert [await stream.read(n) for n in (2, 3, 2, 2)] == [b"\x00\x03", b"abc", b"\x00\x02", b"de"]
    assert asked == [hostlib.READ_AHEAD]
    assert await stream.read(2) == b""  # then the end of the stream
    # A length a peer sent does not size the socket read.
    asked.clear()
    assert await over(b"xy").read(1 << 30) == b"xy"
    assert asked == [hostlib.READ_AHEAD]
    # After a local close, nothing read ahead is served.
    stream = over(b"abcdef")
    assert await stream.read(2) == b"ab"
    await stream.close()
    assert await stream.read(4) == b""
    with pytest.raises(ValueError, match="max_bytes"):
        await over(b"abc").read(-1)


async def test_a_burst_of_frames_is_read_from_the_socket_ahead(
    node_factory: OpenNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Noise read each message as its 2-byte length, then its body: two socket
    # reads per frame (docs/libp2p-traps.md#two-socket-reads-per-message).
    reads = 0
    library_receive = trio.SocketStream.receive_some

    async def counted(self: trio.SocketStream, max_bytes: int | None = None) -> bytes:
        nonlocal reads
        reads += 1
        return await library_receive(self, max_bytes)

    frames, size = 50, 1000
    received = trio.Event()
    total = 0

    async def sink(stream: INetStream) -> None:
        nonlocal total
        while total < frames * size:
            total += len(await stream.read(65536))
        received.set()

    async with node_factory() as server, node_factory() as client:
        with trio.fail_after(BOUND_S):
            stream = await _stream_to(server, client, sink)
            monkeypatch.setattr(trio.SocketStream, "receive_some", counted)
            for _ in range(frames):
                await stream.write(b"x" * size)  # each a yamux frame in a Noise message
            await received.wait()
            read_for_frames = reads
    assert total == frames * size
    # At most one read per frame however they arrive (a few more for other
    # traffic, the gossip heartbeat's): the library's way took two.
    assert read_for_frames <= frames + 10
