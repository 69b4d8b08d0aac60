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
from pathlib import Path
from typing import Any

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from p2pnode.inference.engine import Params, Request, tokens_per_second
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


async def bench_engine(
    model_path: Path, rounds: int = 7, max_tokens: int = 128, threads: int | None = None
) -> dict[str, Any]:
    """Generation speed through LlamaCppEngine vs llama-cpp-python directly.

    Same file, prompt, settings and thread count; rounds alternate between
    the two so that machine noise falls on both. Speed counts tokens after
    the first over the time they took (the prompt is excluded on both sides).
    """
    from p2pnode.inference import llamacpp

    n_threads = threads or llamacpp.Config(model_path=model_path, model_id="x").n_threads
    cfg = llamacpp.Config(model_path=model_path, model_id="bench", n_threads=n_threads)
    request = Request(
        model_id="bench",
        kind="completion",
        prompt="The history of the printing press",
        params=Params(max_tokens=max_tokens, temperature=0.0),
    )
    direct = await trio.to_thread.run_sync(_load_direct, model_path, cfg.n_ctx, n_threads)
    engine_speeds: list[float] = []
    direct_speeds: list[float] = []
    try:
        async with llamacpp.open_llamacpp(cfg) as engine:
            await tokens_per_second(engine, request)  # warm-up, both sides
            await trio.to_thread.run_sync(_direct_speed, direct, request)
            for _ in range(rounds):
                engine_speeds.append(await tokens_per_second(engine, request))
                direct_speeds.append(await trio.to_thread.run_sync(_direct_speed, direct, request))
    finally:
        direct.close()
    # Each round runs both back to back, so the per-round ratio cancels most
    # of the machine's drift; its median is the figure (goal >= 0.98).
    ratios = [e / d for e, d in zip(engine_speeds, direct_speeds, strict=True) if d]
    ratio = statistics.median(ratios) if ratios else 0.0
    return {
        "bench": "engine",
        "model": model_path.name,
        "threads": n_threads,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "engine_tokens_per_s": summarize(engine_speeds),
        "direct_tokens_per_s": summarize(direct_speeds),
        "ratio": round(ratio, 3),
        "ratios": [round(r, 3) for r in ratios],
        "goal_met": ratio >= 0.98,
    }


def _load_direct(path: Path, n_ctx: int, n_threads: int) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False)


def _direct_speed(llm: Any, request: Request) -> float:
    llm.reset()  # as the engine does, so both evaluate the whole prompt
    p = request.params
    first = last = 0.0
    tokens = 0
    for part in llm.create_completion(
        prompt=request.prompt, max_tokens=p.max_tokens, temperature=p.temperature, stream=True
    ):
        if part["choices"][0].get("text"):
            last = time.perf_counter()
            if tokens == 0:
                first = last
            tokens += 1
    return round((tokens - 1) / (last - first), 1) if tokens > 1 and last > first else 0.0
