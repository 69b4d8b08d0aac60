"""A simnet over several OS processes: ``p2pnode simnet --workers N``.

One process runs every node of :func:`harness.open_simnet` on one core; the
other cores sit idle, and past ~100 nodes the one loop delivers gossip too
late. Here each of ``N`` worker processes runs its share of the nodes
(:func:`place`: providers and the other nodes each dealt out in turn), real
nodes on TCP loopback that dial each other
across processes as any real peers do. This process only steers: it plans
the same start-up waves and bootstrap choices as ``open_simnet`` (same seed,
same graph), tells each worker what to start, measure or change, and builds
one report. Workers reply with times read on ``time.monotonic()``, one clock
for every process of the machine, so figures from different workers compare.

The steering is a request/reply protocol over a ``multiprocessing`` pipe
per worker (:class:`Worker`): small pickled tuples, nothing of the network.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import time
import traceback
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import count
from multiprocessing.connection import Connection
from typing import Any

import trio

from p2pnode.errors import P2PNodeError
from p2pnode.p2p.node import Node, NodeConfig, freeze_startup_heap
from p2pnode.p2p.reputation import Offence
from p2pnode.protocols import offers
from p2pnode.simnet import harness
from p2pnode.simnet.harness import SIMNET_MODEL, Simnet, Topology, add_node, rss_mb
from p2pnode.simnet.scenarios import (
    discovery_report,
    knows_all,
    note_when,
    offer_round,
    sees_price,
)

# A worker that does not answer a command within this is taken as hung.
REPLY_S = 600.0
# Starting a worker: a fresh interpreter importing libp2p, web3 and the node.
SPAWN_S = 120.0


def default_workers() -> int:
    """As many workers as this process may use cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# --- the steering side ------------------------------------------------------------


@dataclass
class Worker:
    """One worker process and the pipe that steers it."""

    index: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    _ids: count[int] = field(default_factory=count)
    _waiting: dict[int, trio.MemorySendChannel[tuple[str, Any]]] = field(default_factory=dict)

    async def call(self, name: str, *args: Any) -> Any:
        """Run command ``name`` in the worker; its result, or P2PNodeError with its traceback."""
        cid = next(self._ids)
        send, receive = trio.open_memory_channel[tuple[str, Any]](1)
        self._waiting[cid] = send
        self.conn.send((cid, name, args))
        try:
            with trio.fail_after(REPLY_S):
                kind, body = await receive.receive()
        finally:
            self._waiting.pop(cid, None)
        if kind == "error":
            raise P2PNodeError(f"simnet worker {self.index}: {name} failed:\n{body}")
        return body

    async def read_replies(self) -> None:
        """Hand each reply to its caller, until the worker's end closes."""
        while True:
            await trio.lowlevel.wait_readable(self.conn.fileno())
            try:
                cid, kind, body = self.conn.recv()
            except (EOFError, OSError):
                for send in self._waiting.values():
                    send.send_nowait(("error", f"worker {self.index} ended"))
                return
            if (waiting := self._waiting.get(cid)) is not None:
                waiting.send_nowait((kind, body))


@dataclass
class Cluster:
    """The workers of one run, and where each node lives."""

    workers: list[Worker]
    # Per node index: the worker it lives in (:func:`place`), its listen
    # address and peer id.
    placement: dict[int, int] = field(default_factory=dict)
    addrs: dict[int, str] = field(default_factory=dict)
    peer_ids: dict[int, str] = field(default_factory=dict)
    provider_ids: set[str] = field(default_factory=set)

    def worker_of(self, index: int) -> Worker:
        return self.workers[self.placement[index]]

    async def each(self, name: str, *args: Any) -> list[Any]:
        """``name`` in every worker at once; their results in worker order."""
        results: list[Any] = [None] * len(self.workers)

        async def one(w: Worker) -> None:
            results[w.index] = await w.call(name, *args)

        async with trio.open_nursery() as nursery:
            for w in self.workers:
                nursery.start_soon(one, w)
        return results


async def _spawn(nursery: trio.Nursery, index: int) -> Worker:
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe(duplex=True)
    process = ctx.Process(target=_worker_process, args=(child,), name=f"simnet-worker-{index}")
    process.daemon = True
    process.start()
    child.close()
    worker = Worker(index, process, conn)
    nursery.start_soon(worker.read_replies)
    with trio.fail_after(SPAWN_S):
        await worker.call("hello")
    return worker


def place(topology: Topology, workers: int) -> dict[int, int]:
    """The worker of each node index: providers dealt out in turn, and the
    other nodes too, so that each worker carries its share of both (node i
    in worker i mod N put every provider of 50 peers / 5 providers in one)."""
    placement: dict[int, int] = {}
    providers = set(topology.provider_indices())
    dealt = {True: 0, False: 0}
    for i in range(topology.peers):
        kind = i in providers
        placement[i] = dealt[kind] % workers
        dealt[kind] += 1
    return placement


async def _start(cluster: Cluster, topology: Topology) -> None:
    """Start every node in waves, as harness.open_simnet plans them (same seed, same graph)."""
    rng = random.Random(topology.seed)  # noqa: S311 - topology, not cryptography
    provider_at = set(topology.provider_indices())
    first = 0
    while first < topology.peers:
        started = list(cluster.addrs.values())
        size = 1 if first == 0 else min(topology.wave, len(started), topology.peers - first)
        plan: dict[int, list[tuple[int, bool, tuple[str, ...]]]] = {}
        for i in range(first, first + size):
            bootstrap = tuple(rng.sample(started, min(topology.fanout, len(started))))
            plan.setdefault(cluster.placement[i], []).append((i, i in provider_at, bootstrap))

        async def start(worker: Worker, nodes: list[tuple[int, bool, tuple[str, ...]]]) -> None:
            for index, peer_id, addr in await worker.call("start", nodes):
                cluster.addrs[index] = addr
                cluster.peer_ids[index] = peer_id
                if index in provider_at:
                    cluster.provider_ids.add(peer_id)

        async with trio.open_nursery() as wave:
            for w, nodes in plan.items():
                wave.start_soon(start, cluster.workers[w], nodes)
        first += size
        if (told := harness.STARTED.get()) is not None:
            told(len(cluster.addrs), topology.peers)


async def discovery(
    topology: Topology,
    *,
    workers: int,
    lookups: int = 10,
    rounds: int = 5,
    bound_s: float = 30.0,
) -> dict[str, Any]:
    """simnet/scenarios.py:discovery with the nodes spread over ``workers`` processes.

    The same measurements and the same report, plus ``workers`` and
    ``nodes_per_worker``. ``rss_mb_per_peer`` sums every worker's growth.
    """
    errors: list[str] = []
    async with trio.open_nursery() as nursery:
        spawned: list[Worker] = []
        async with trio.open_nursery() as spawning:
            for i in range(workers):
                spawning.start_soon(lambda i=i: _spawn_into(spawned, nursery, i))
        cluster = Cluster(
            sorted(spawned, key=lambda w: w.index), placement=place(topology, workers)
        )
        try:
            rss_before = sum(await cluster.each("rss"))
            started = time.monotonic()
            await _start(cluster, topology)
            start_s = time.monotonic() - started
            await cluster.each("freeze", sorted(cluster.provider_ids))
            ready_at: dict[str, float] = {}
            for times in await cluster.each("ready", bound_s):
                ready_at.update(times)
            missing = topology.peers - len(ready_at)
            ready_s = max(ready_at.values()) - started if not missing else None
            if missing:
                errors.append(f"{missing} nodes never held every provider's offer")
            rss_after = sum(await cluster.each("rss"))
            started_tallies = await cluster.each("tally")
            links = sum(t["links"] for t in started_tallies) // 2
            lookup_ms, lookup_found = await _late_lookups(cluster, topology, lookups, errors)
            offer_rounds = await _offer_rounds(cluster, rounds, bound_s=5.0)
            tallies = await cluster.each("tally")
        finally:
            with trio.CancelScope(shield=True):
                await _stop(cluster)
            nursery.cancel_scope.cancel()
    protocol_errors = sum(t["protocol_errors"] for t in tallies)
    if protocol_errors:
        errors.append(f"{protocol_errors} protocol errors between nodes")
    rejected: dict[str, int] = {}
    for t in tallies:
        for k, n in t["rejected"].items():
            rejected[k] = rejected.get(k, 0) + n
    # As each worker counts what it runs (before the lookups' joiners).
    spread = {
        "workers": workers,
        "nodes_per_worker": [t["nodes"] for t in started_tallies],
        "providers_per_worker": [t["providers"] for t in started_tallies],
    }
    return discovery_report(
        topology,
        spread=spread,
        start_s=start_s,
        ready_s=ready_s,
        lookup_ms=lookup_ms,
        lookup_found=lookup_found,
        ready_ms=[(t - started) * 1000 for t in ready_at.values()],
        offer_rounds=offer_rounds,
        links=links,
        rss_mb_per_peer=(rss_after - rss_before) / topology.peers,
        rejected=rejected,
        errors=errors,
    )


async def _spawn_into(spawned: list[Worker], nursery: trio.Nursery, index: int) -> None:
    spawned.append(await _spawn(nursery, index))


async def _stop(cluster: Cluster) -> None:
    for w in cluster.workers:
        try:
            with trio.move_on_after(30):
                await w.call("stop")
        except P2PNodeError:
            pass
    for w in cluster.workers:
        await trio.to_thread.run_sync(w.process.join, 10)
        if w.process.is_alive():
            w.process.kill()
        w.conn.close()


async def _late_lookups(
    cluster: Cluster, topology: Topology, count_: int, errors: list[str]
) -> tuple[list[float], list[int]]:
    """As scenarios.py's: nodes join late through one consumer and look providers up, cold.

    Joiners take turns over the workers.
    """
    rng = random.Random(topology.seed + 1)  # noqa: S311 - topology, not cryptography
    consumers = [i for i, p in cluster.peer_ids.items() if p not in cluster.provider_ids]
    times: list[float] = []
    found: list[int] = []
    for k in range(count_):
        entry = cluster.addrs[rng.choice(consumers)]
        worker = cluster.workers[k % len(cluster.workers)]
        result = await worker.call("lookup", entry, 10.0)
        if cluster.provider_ids & set(result["connected"]):
            errors.append("a late joiner was connected to a provider before its lookup")
        if result["ms"] is None:
            errors.append(f"lookup from {result['peer_id'][-8:]} took over 10 s")
            continue
        times.append(result["ms"])
        found.append(len(set(result["found"]) & cluster.provider_ids))
    if found and min(found) < len(cluster.provider_ids):
        errors.append(f"some lookups found fewer than all providers: {found}")
    return times, found


async def _offer_rounds(cluster: Cluster, rounds: int, bound_s: float) -> list[dict[str, Any]]:
    """As scenarios.py's: each round one provider re-prices; who sees it, and when."""
    providers = sorted(i for i, p in cluster.peer_ids.items() if p in cluster.provider_ids)
    results: list[dict[str, Any]] = []
    for r in range(rounds):
        index = providers[r % len(providers)]
        marker = 1_000 + r
        seen: dict[str, float] = {}
        # Every worker watches before the change is made, and is then asked what it saw.
        await cluster.each("watch", cluster.peer_ids[index], marker, bound_s)
        start = await cluster.worker_of(index).call("reprice", index, marker)
        for times in await cluster.each("seen"):
            seen.update(times)
        results.append(offer_round(seen, len(cluster.peer_ids) - 1, start))
    return results


# --- the worker side --------------------------------------------------------------


def _worker_process(conn: Connection) -> None:
    # Its import resets its logger: quiet it after (docs/libp2p-traps.md#logger-reset-on-import).
    import libp2p  # noqa: F401

    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    logging.getLogger("p2pnode").setLevel(logging.CRITICAL)
    trio.run(_serve, conn)


@dataclass
class _Nodes:
    """What one worker runs."""

    net: Simnet
    nursery: trio.Nursery
    by_index: dict[int, Node] = field(default_factory=dict)
    provider_ids: frozenset[str] = frozenset()
    stop: trio.Event = field(default_factory=trio.Event)
    # The running watch (:func:`_watch`): its result once it ends.
    watched: trio.MemoryReceiveChannel[dict[str, float]] | None = None


async def _serve(conn: Connection) -> None:
    """Run commands from the steering process until it says stop or goes away."""
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as nodes_nursery:
            state = _Nodes(Simnet(Topology(peers=0, providers=0)), nodes_nursery)
            outer.start_soon(_read_commands, conn, state, outer)
            await state.stop.wait()
            await harness.stop_all(state.net)
            nodes_nursery.cancel_scope.cancel()
        outer.cancel_scope.cancel()


async def _read_commands(conn: Connection, state: _Nodes, nursery: trio.Nursery) -> None:
    while True:
        await trio.lowlevel.wait_readable(conn.fileno())
        try:
            cid, name, args = conn.recv()
        except (EOFError, OSError):
            state.stop.set()  # the steering process is gone
            return
        nursery.start_soon(_run_command, conn, state, cid, name, args)


async def _run_command(
    conn: Connection, state: _Nodes, cid: int, name: str, args: tuple[Any, ...]
) -> None:
    try:
        result = await _COMMANDS[name](state, *args)
    except Exception:  # noqa: BLE001 - the steering process raises it, with this traceback
        reply: tuple[int, str, Any] = (cid, "error", traceback.format_exc())
    else:
        reply = (cid, "ok", result)
    try:
        conn.send(reply)
    except OSError:
        state.stop.set()


async def _hello(state: _Nodes) -> int:
    return os.getpid()


async def _rss(state: _Nodes) -> float:
    return rss_mb()


async def _start_nodes(
    state: _Nodes, nodes: list[tuple[int, bool, tuple[str, ...]]]
) -> list[tuple[int, str, str]]:
    started: list[tuple[int, str, str]] = []

    async def one(index: int, is_provider: bool, bootstrap: tuple[str, ...]) -> None:
        config = replace(harness.default_config(index, is_provider), bootstrap=bootstrap)
        node = await add_node(state.net, state.nursery, config)
        state.by_index[index] = node
        started.append((index, node.peer_id, node.addrs[0]))

    async with trio.open_nursery() as wave:
        for index, is_provider, bootstrap in nodes:
            wave.start_soon(one, index, is_provider, bootstrap)
    return started


async def _freeze(state: _Nodes, provider_ids: list[str]) -> None:
    """Start-up is over: as open_simnet does, freeze what it made
    (docs/performance.md#garbage-collection)."""
    state.provider_ids = frozenset(provider_ids)
    freeze_startup_heap()


async def _ready(state: _Nodes, bound_s: float) -> dict[str, float]:
    """When each of the worker's nodes first held every provider's offer."""
    nodes = list(state.by_index.values())
    return await note_when(nodes, partial(knows_all, provider_ids=state.provider_ids), bound_s)


async def _lookup(state: _Nodes, entry: str, bound_s: float) -> dict[str, Any]:
    """A fresh node joins through ``entry`` and looks the providers up, cold."""
    joiner = await add_node(state.net, state.nursery, NodeConfig(bootstrap=(entry,)))
    connected = list(joiner.connected_peers())
    start = time.monotonic()
    found: list[str] = []
    with trio.move_on_after(bound_s) as scope:
        found = await joiner.finder.find_providers(SIMNET_MODEL)
    ms = None if scope.cancelled_caught else (time.monotonic() - start) * 1000
    return {"peer_id": joiner.peer_id, "connected": connected, "ms": ms, "found": list(found)}


async def _watch(state: _Nodes, provider_id: str, marker: int, bound_s: float) -> None:
    """Start noting when each of the worker's first nodes (not joiners) sees
    ``provider_id`` at price ``marker``; ``seen`` returns it."""
    others = [n for n in state.by_index.values() if n.peer_id != provider_id]
    send, state.watched = trio.open_memory_channel[dict[str, float]](1)

    async def watching() -> None:
        sees = partial(sees_price, provider_id=provider_id, price=marker)
        send.send_nowait(await note_when(others, sees, bound_s))

    state.nursery.start_soon(watching)


async def _seen(state: _Nodes) -> dict[str, float]:
    assert state.watched is not None, "seen without watch"
    return await state.watched.receive()


async def _reprice(state: _Nodes, index: int, marker: int) -> float:
    provider = state.by_index[index]
    start: float = time.monotonic()
    provider.offering.set_models(
        tuple(replace(m, price_per_s=marker) for m in provider.offering.models)
    )
    return start


async def _tally(state: _Nodes) -> dict[str, Any]:
    nodes = list(state.by_index.values())
    return {
        "protocol_errors": sum(n.reputation.totals[Offence.PROTOCOL] for n in nodes),
        "rejected": {
            v.value: sum(n.offer_book.verdicts[v] for n in nodes)
            for v in offers.Verdict
            if not v.relay
        },
        "links": sum(len(n.connected_peers()) for n in nodes),
        "nodes": len(nodes),
        "providers": sum(n.peer_id in state.provider_ids for n in nodes),
    }


async def _stop_command(state: _Nodes) -> None:
    state.stop.set()


_COMMANDS: dict[str, Any] = {
    "hello": _hello,
    "rss": _rss,
    "start": _start_nodes,
    "freeze": _freeze,
    "ready": _ready,
    "lookup": _lookup,
    "watch": _watch,
    "seen": _seen,
    "reprice": _reprice,
    "tally": _tally,
    "stop": _stop_command,
}


__all__ = ["Cluster", "Worker", "default_workers", "discovery"]
