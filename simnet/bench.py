"""Benchmarks that print figures against a baseline measured in the same run.

They never assert on time: the machines are noisy, so each figure comes with
the same measurement over a simpler stack, taken moments apart, and the ratio
between them (STYLE: benchmarks print figures and ratios).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from p2pnode.p2p.node import NodeConfig, open_node
from p2pnode.protocols import status
from p2pnode.protocols.wire import FrameDecoder, Sentinel


def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    """Median, 90th percentile, min and max of a list of milliseconds."""
    ordered = sorted(samples_ms)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {
        "median": round(statistics.median(ordered), 3),
        "p90": round(p90, 3),
        "min": round(ordered[0], 3),
        "max": round(ordered[-1], 3),
    }


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


async def bench_connect(rounds: int = 20, rtts: int = 50) -> dict[str, Any]:
    """Connect time and status round trip over libp2p vs plain TCP on loopback.

    libp2p: ``rounds`` fresh client identities each connect to one server node
    (TCP + Noise + yamux, identify in the background), then ``rtts`` status
    calls, each on a new stream as the protocol does it. Baseline: trio TCP
    to a server that answers the same request frame with the same response
    bytes.
    """
    connect_ms: list[float] = []
    rtt_ms: list[float] = []
    async with open_node(NodeConfig(), key_pair=create_new_key_pair()) as server:
        target = server.addrs[0]
        for i in range(rounds):
            async with open_node(NodeConfig(), key_pair=create_new_key_pair()) as client:
                start = time.perf_counter()
                await client.connect(target)
                connect_ms.append(_ms_since(start))
                if i == 0:
                    await client.status_of(server.peer_id)  # warm up code paths
                    for _ in range(rtts):
                        start = time.perf_counter()
                        await client.status_of(server.peer_id)
                        rtt_ms.append(_ms_since(start))
        answer = status.CODEC.encode(server.status_info())
    tcp_connect_ms, tcp_rtt_ms = await _tcp_baseline(answer, rounds, rtts)
    libp2p = {"connect_ms": summarize(connect_ms), "status_rtt_ms": summarize(rtt_ms)}
    tcp = {"connect_ms": summarize(tcp_connect_ms), "rtt_ms": summarize(tcp_rtt_ms)}
    return {
        "bench": "connect",
        "rounds": rounds,
        "rtts": rtts,
        "libp2p": libp2p,
        "tcp": tcp,
        "ratio_connect_median": round(
            libp2p["connect_ms"]["median"] / tcp["connect_ms"]["median"], 1
        ),
        "ratio_rtt_median": round(libp2p["status_rtt_ms"]["median"] / tcp["rtt_ms"]["median"], 1),
        "goal_connect_ms": 25.0,
        "goal_met": libp2p["connect_ms"]["median"] <= 25.0,
    }


async def _tcp_baseline(answer: bytes, rounds: int, rtts: int) -> tuple[list[float], list[float]]:
    request = status.ClientMachine(status.Config().max_frame).send_request(status.StatusRequest())

    async def serve(conn: trio.SocketStream) -> None:
        decoder = FrameDecoder()
        async with conn:
            while data := await conn.receive_some(65536):
                decoder.receive_data(data)
                while not isinstance(decoder.next_frame(), Sentinel):
                    await conn.send_all(answer)

    connect_ms: list[float] = []
    rtt_ms: list[float] = []
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        for i in range(rounds):
            start = time.perf_counter()
            conn = await trio.open_tcp_stream("127.0.0.1", port)
            connect_ms.append(_ms_since(start))
            async with conn:
                if i == 0:
                    for _ in range(rtts + 1):
                        start = time.perf_counter()
                        await conn.send_all(request)
                        got = 0
                        while got < len(answer):
                            got += len(await conn.receive_some(65536))
                        rtt_ms.append(_ms_since(start))
                    del rtt_ms[0]  # warm-up, as on the libp2p side
        nursery.cancel_scope.cancel()
    return connect_ms, rtt_ms
