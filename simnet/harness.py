"""Many real nodes in one trio run, built with the very ``open_node`` that ``p2pnode start`` uses.

Every node listens on 127.0.0.1 with port 0 and bootstraps to ``fanout`` earlier
nodes picked at random (seeded), so the network is connected but sparse, as a
real one is. Scenarios drive nodes only through their public interface.
"""

from __future__ import annotations

import contextvars
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair

from p2pnode.errors import P2PNodeError
from p2pnode.inference.engine import Engine
from p2pnode.p2p import host as hostlib
from p2pnode.p2p.market import Wallet
from p2pnode.p2p.memory import MemoryNetwork
from p2pnode.p2p.node import Node, NodeConfig, open_node, startup_heap_frozen
from p2pnode.protocols import offers

# trio.TaskStatus exists, but the trio-stubs that py-libp2p pulls in (trio-typing)
# predate it and shadow trio's own types for mypy.
TaskStatus = Any


SIMNET_MODEL = "simnet/announced-model"
"""Model id providers announce when a scenario gives them no engine."""


def rss_mb() -> float:
    """This process's resident memory now, in MB (Linux /proc; else the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    """The shape of a simulated network."""

    peers: int
    providers: int
    # Each new node dials this many earlier nodes: a connected graph with
    # redundancy (every node ends with ~4 links), sparse as a real network.
    # Each link costs both ends handshakes, identify and pubsub set-up: on
    # one core, 3 instead of 2 adds ~50% of start-up work for no gain.
    fanout: int = 2
    seed: int = 0
    # Nodes started at once (at most as many as are already running):
    # starting is mostly waiting on handshakes, so waves overlap it.
    wave: int = 25

    def provider_indices(self) -> list[int]:
        """Providers are spread evenly over the start order, none first."""
        if self.providers <= 0:
            return []
        step = self.peers / self.providers
        return [int(step * i + step / 2) for i in range(self.providers)]


@dataclass
class Simnet:
    """The running nodes of a simnet."""

    topology: Topology
    nodes: list[Node] = field(default_factory=list)
    provider_ids: set[str] = field(default_factory=set)
    # Set: the nodes reach each other over this in-process network instead
    # of TCP on loopback.
    memory: MemoryNetwork | None = None
    _running: list[Running] = field(default_factory=list)

    @property
    def providers(self) -> list[Node]:
        return [n for n in self.nodes if n.peer_id in self.provider_ids]

    @property
    def consumers(self) -> list[Node]:
        return [n for n in self.nodes if n.peer_id not in self.provider_ids]

    def kill(self, node: Node) -> None:
        """Stop ``node`` at once, as if its process died; it leaves the net's lists.

        Its identity stays a provider's: a node started again with its key
        (:func:`add_node`) is the same provider back.
        """
        running = next(r for r in self._running if r.node is node)
        running.kill()
        self._running.remove(running)
        self.nodes.remove(node)


ConfigFor = Callable[[int, bool], NodeConfig]
"""``config_for(index, is_provider)``: the NodeConfig of one simnet node."""


def default_config(index: int, is_provider: bool) -> NodeConfig:
    models = (offers.ModelOffer(model_id=SIMNET_MODEL, context_length=2048),) if is_provider else ()
    return NodeConfig(models=models)


@dataclass
class Running:
    """A node running in a task of its own (:func:`start_node`)."""

    node: Node
    scope: trio.CancelScope
    stopped: trio.Event

    def kill(self) -> None:
        """Stop it at once, as if its process died (its exit still runs)."""
        self.scope.cancel()

    async def stop(self) -> None:
        """Stop it and wait until it has."""
        self.scope.cancel()
        await self.stopped.wait()


async def start_node(
    nursery: trio.Nursery,
    config: NodeConfig,
    engines: Sequence[Engine] = (),
    *,
    key_pair: KeyPair | None = None,
    memory: MemoryNetwork | None = None,
    wallet: Wallet | None = None,
) -> Running:
    """Start a node in a task of ``nursery``; returns once it runs.

    Each node lives in its own task: open_node's nurseries must be entered
    and left by one task, and this lets many nodes start at once. Used by
    simnet and by the tests that start and kill nodes. With ``memory`` the
    node's only transport is that in-process network (``p2p/memory.py``).
    """
    scope, stopped = trio.CancelScope(), trio.Event()
    if memory is not None:
        config = _on_memory(config)

    async def run(*, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                keys = key_pair or create_new_key_pair()
                host = memory_host(memory, keys, config) if memory is not None else None
                async with open_node(
                    config, key_pair=keys, engines=engines, host=host, wallet=wallet
                ) as node:
                    task_status.started(node)
                    await trio.sleep_forever()
        finally:
            stopped.set()

    node: Node = await nursery.start(run)
    return Running(node, scope, stopped)


def _on_memory(config: NodeConfig) -> NodeConfig:
    # A node restarted at its old memory address keeps it; any other listens anew.
    if config.host.listen and all(a.startswith("/memory/") for a in config.host.listen):
        return config
    return replace(config, host=replace(config.host, listen=("/memory/0",)))


def memory_host(memory: MemoryNetwork, key_pair: KeyPair, config: NodeConfig) -> IHost:
    """A host for ``config`` whose only transport is the in-process ``memory`` network."""
    return hostlib.build(key_pair, config.host, transports=[memory.transport()])


@asynccontextmanager
async def open_memory_node(
    memory: MemoryNetwork,
    config: NodeConfig,
    *,
    key_pair: KeyPair | None = None,
    engines: Sequence[Engine] = (),
    wallet: Wallet | None = None,
) -> AsyncIterator[Node]:
    """``open_node`` on the in-process ``memory`` network (listening on ``/memory/0``).

    The real node and stack; only the bytes move through memory. Tests run
    it under trio's MockClock, so their timeouts cost no wall time
    (docs/architecture.md#testing-on-the-memory-transport).
    """
    keys = key_pair or create_new_key_pair()
    cfg = _on_memory(config)
    host = memory_host(memory, keys, cfg)
    async with open_node(cfg, key_pair=keys, engines=engines, host=host, wallet=wallet) as node:
        yield node


@asynccontextmanager
async def open_bundled(slots: int) -> AsyncIterator[Engine]:
    """The bundled model, ``slots`` requests at once (one thread each), shared by
    every provider a scenario starts with it."""
    from p2pnode.inference import llamacpp

    cfg = llamacpp.Config(
        model_path=llamacpp.bundled_model_path(),
        model_id=llamacpp.BUNDLED_MODEL_ID,
        slots=slots,
        n_threads=1,
        queue_limit=64,
    )
    async with llamacpp.open_llamacpp(cfg) as engine:
        yield engine


def node_env(home: str) -> dict[str, str]:
    """The environment of a p2pnode command with ``home`` as its home: no
    P2PNODE_ settings of this process leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PNODE_")}
    env["P2PNODE_HOME"] = home
    return env


def node_command(home: str, ready: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """Argv and environment of ``p2pnode start --no-serve`` on a free loopback port,
    with ``home`` as its home and its ready file at ``ready``; ``args`` are more options."""
    env = node_env(home)
    argv = [sys.executable, "-m", "p2pnode.cli", "start", "--no-serve",
            "--listen", "/ip4/127.0.0.1/tcp/0", "--ready-file", ready, *args]  # fmt: skip
    return argv, env


@asynccontextmanager
async def node_process(*args: str, bound_s: float = 60.0) -> AsyncIterator[dict[str, Any]]:
    """``p2pnode start --no-serve ARGS`` in an OS process of its own, on loopback,
    with a fresh home; yields its ready file (``peer_id``, ``addrs``) once it runs.

    A node outside the simnet that must not share its core (the relay
    scenario's relay, as a real relay runs on its own machine). Stopped with
    SIGTERM on leaving, killed if that takes over ``bound_s``.
    """
    with tempfile.TemporaryDirectory(prefix="p2pnode-simnet-node-") as home:
        ready = os.path.join(home, "ready.json")
        argv, env = node_command(home, ready, *args)
        log = trio.Path(home, "stderr.log")
        stderr = os.open(log, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            process = await trio.lowlevel.open_process(
                argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr
            )
        finally:
            os.close(stderr)
        try:
            with trio.fail_after(bound_s):
                while not await trio.Path(ready).exists():  # noqa: ASYNC110 - a file: no event
                    if process.poll() is not None:
                        said = (await log.read_text(errors="replace"))[-500:]
                        raise P2PNodeError(f"the node process exited {process.returncode}: {said}")
                    await trio.sleep(0.05)
            yield json.loads(await trio.Path(ready).read_text())
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            with trio.CancelScope(shield=True, deadline=trio.current_time() + bound_s) as scope:
                await process.wait()
            if scope.cancelled_caught:
                process.kill()


async def hold_offers(
    me: Node,
    nodes: Sequence[Node],
    held: Callable[[Node, Node], bool] | None = None,
    *,
    bound_s: float = 300.0,
) -> None:
    """Ask each of ``nodes`` for its offer until ``me`` holds it (as ``held`` wants it;
    by default any offer); ``trio.TooSlowError`` after ``bound_s``.

    Gossip brings offers in its own time: a test that needs them now asks.
    """

    def any_offer(me: Node, node: Node) -> bool:
        return me.offer_book.get(node.peer_id) is not None

    with trio.fail_after(bound_s):
        for node in nodes:
            while not (held or any_offer)(me, node):
                await me.finder.refresh_offer(node.peer_id)
                await trio.sleep(0.05)


async def until(predicate: Callable[[], object], bound_s: float, *, poll_s: float = 0.05) -> None:
    """Return once ``predicate()`` holds; ``trio.TooSlowError`` after ``bound_s``.

    For conditions no component signals (a peer's offer arrived, a
    reservation was granted): under a MockClock the polls cost no wall time.
    """
    with trio.fail_after(bound_s):
        while not predicate():  # noqa: ASYNC110 - what it waits for has no event to wait on
            await trio.sleep(poll_s)


async def add_node(
    net: Simnet,
    nursery: trio.Nursery,
    config: NodeConfig,
    engines: Sequence[Engine] = (),
    *,
    wallet: Wallet | None = None,
    key_pair: KeyPair | None = None,
) -> Node:
    """Start one more node on loopback (or ``net.memory``) in ``nursery``; it stops with the simnet.

    With ``key_pair`` it is that identity (a node back after :meth:`Simnet.kill`).

    Every simnet node listens on loopback, where every peer can dial it: no
    dial-back checks (each costs the helper a throwaway host and a handshake).
    """
    reachability = "public" if config.reachability == "auto" else config.reachability
    # On memory, start_node listens there instead.
    listen = ("/ip4/127.0.0.1/tcp/0",)
    cfg = replace(config, host=hostlib.Config(listen=listen), reachability=reachability)
    running = await start_node(
        nursery, cfg, engines, memory=net.memory, wallet=wallet, key_pair=key_pair
    )
    net.nodes.append(running.node)
    net._running.append(running)
    if config.models or engines:
        net.provider_ids.add(running.node.peer_id)
    return running.node


async def stop_all(net: Simnet) -> None:
    """Stop every node of ``net``, one at a time (what leaving open_simnet does)."""
    # One at a time, newest first: py-libp2p 0.8.1 leaks sockets when both
    # ends of a connection are torn down in the same instant.
    for running in reversed(net._running):
        await running.stop()


# Told (nodes started, nodes to start) after each wave of a simnet's start-up:
# set by the CLI for its progress line, unset in tests.
STARTED: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "simnet_started", default=None
)


@asynccontextmanager
async def open_simnet(
    topology: Topology,
    config_for: ConfigFor = default_config,
    engines: Sequence[Engine] = (),
    *,
    memory: MemoryNetwork | None = None,
    wallet_for: Callable[[int], Wallet | None] = lambda _index: None,
) -> AsyncIterator[tuple[Simnet, trio.Nursery]]:
    """Start ``topology.peers`` nodes; yield the net and the nursery they run in.

    Nodes start in waves of ``topology.wave`` at once, each dialing
    ``fanout`` nodes of earlier waves (starting is mostly waiting on
    handshakes, so waves overlap that). Providers serve ``engines`` (shared:
    one loaded model per file, each provider keeps its own sessions and
    meters). With ``memory`` the nodes talk over that in-process network
    instead of loopback TCP; a node whose config is paid pays with
    ``wallet_for(index)``. Leaving the block stops every node together,
    and so does cancelling the nursery.
    """
    rng = random.Random(topology.seed)  # noqa: S311 - topology, not cryptography
    provider_at = set(topology.provider_indices())
    net = Simnet(topology, memory=memory)
    async with trio.open_nursery() as nursery:
        first = 0
        while first < topology.peers:
            # The first node stands alone; waves then grow as the net does.
            size = 1 if first == 0 else min(topology.wave, len(net.nodes), topology.peers - first)
            # A bootstrap list names public nodes: nobody can dial a private one.
            earlier = [n for n in net.nodes if n.config.reachability != "private"] or net.nodes
            configs = [
                (
                    i,
                    i in provider_at,
                    replace(
                        config_for(i, i in provider_at),
                        bootstrap=tuple(
                            p.addrs[0]
                            for p in rng.sample(earlier, min(topology.fanout, len(earlier)))
                        ),
                    ),
                )
                for i in range(first, first + size)
            ]
            async with trio.open_nursery() as wave:
                for i, is_provider, config in configs:
                    served = engines if is_provider else ()
                    wave.start_soon(
                        partial(add_node, net, nursery, config, served, wallet=wallet_for(i))
                    )
            first += size
            if (told := STARTED.get()) is not None:
                told(len(net.nodes), topology.peers)
        # Every node's start-up objects live as long as the simnet does; a
        # full collection walked all of them again, pausing every node at
        # once for 40-180 ms at 50 peers (the long tail of lookups). Frozen,
        # collections only walk what came after (docs/performance.md#garbage-collection).
        try:
            with startup_heap_frozen():
                yield net, nursery
        finally:
            with trio.CancelScope(shield=True):
                await stop_all(net)
            nursery.cancel_scope.cancel()
