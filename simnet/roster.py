"""The nodes of a simnet run, each in a task that records how it ended.

``harness.add_node`` runs a node in the nursery it is given, and a node whose
task fails takes that nursery down with it. :class:`Roster` gives every node
a nursery of its own instead, so that a node that dies is recorded (its
``failure``, its ``died`` event) while the rest of the run goes on: how a
scenario counts the honest nodes an attack killed.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import trio

from p2pnode.inference.engine import Engine
from p2pnode.p2p.host import short
from p2pnode.p2p.market import Wallet
from p2pnode.p2p.node import Node, NodeConfig
from p2pnode.simnet.harness import Simnet, TaskStatus, Topology, add_node

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Member:
    """One node of the run: its part in it, and how it ended."""

    node: Node
    role: str
    honest: bool
    scope: trio.CancelScope
    index: int | None = None  # in the honest topology
    ended: trio.Event = field(default_factory=trio.Event)
    died: trio.Event = field(default_factory=trio.Event)  # set only if the node's task failed
    failure: str | None = None


class Roster:
    """Every node of the run, each in a task that records its death instead of raising it."""

    def __init__(self, topology: Topology, nursery: trio.Nursery) -> None:
        self.net = Simnet(topology)
        self.members: list[Member] = []
        self._nursery = nursery
        # The longest stop of a node of each role (seconds).
        self.stop_s: dict[str, float] = {}

    async def start(
        self,
        role: str,
        config: NodeConfig,
        engines: Sequence[Engine] = (),
        *,
        honest: bool,
        index: int | None = None,
        wallet: Wallet | None = None,
    ) -> Member:
        """Start a node on loopback (paid with ``wallet``); a failure to start raises,
        a later death is recorded."""
        run = partial(self._run, role, config, engines, honest, wallet)
        member: Member = await self._nursery.start(run)
        member.index = index
        return member

    async def _run(
        self,
        role: str,
        config: NodeConfig,
        engines: Sequence[Engine],
        honest: bool,
        wallet: Wallet | None,
        *,
        task_status: TaskStatus = trio.TASK_STATUS_IGNORED,
    ) -> None:
        scope = trio.CancelScope()
        member: Member | None = None
        try:
            with scope:
                async with trio.open_nursery() as own:
                    node = await add_node(self.net, own, config, engines, wallet=wallet)
                    member = Member(node, role, honest, scope)
                    self.members.append(member)
                    task_status.started(member)
        except Exception as exc:
            if member is None:
                raise
            # The measurement itself: this node died, and the run goes on.
            member.failure = describe(exc)
            member.died.set()
            logger.error("%s %s died: %s", role, short(member.node.peer_id), member.failure)
        finally:
            if member is not None:
                member.ended.set()

    def honest(self) -> list[Member]:
        return [m for m in self.members if m.honest]

    def of(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]

    async def stop_all(self) -> None:
        """Stop every node: the attackers' at once, then the honest ones newest first
        (py-libp2p leaks sockets when both ends of a connection close at once)."""

        async def stop(member: Member) -> None:
            started = trio.current_time()
            member.scope.cancel()
            with trio.move_on_after(5):
                await member.ended.wait()
            self.stop_s[member.role] = max(
                self.stop_s.get(member.role, 0.0), trio.current_time() - started
            )

        async with trio.open_nursery() as nursery:
            for member in self.members:
                if not member.honest:
                    nursery.start_soon(stop, member)
        for member in reversed(self.honest()):
            await stop(member)


def describe(exc: BaseException) -> str:
    """The innermost error of an exception (group): where it was raised, and what it said."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    frames = traceback.extract_tb(exc.__traceback__)
    where = (
        f" at {frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno}"
        if frames
        else ""
    )
    return f"{type(exc).__name__}: {str(exc)[:200]}{where}"
