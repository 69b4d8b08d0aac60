"""Fuzzing an honest node of a running simnet with :func:`fuzz.fuzz`.

:func:`fuzz.campaign` fuzzes fresh nodes of its own, alone; here the target
joins a network that serves honest users (the hostile scenario), and runs in
an OS process of its own, as every real node does: in the simnet's process,
fuzzing one node at full rate starved all the others (and they capped it at
a few frames a second). :func:`fuzz.fuzz` is told to stop attacking in time
to run its checks and report (a round cancelled from outside would lose its
count). A node that dies is replaced by a fresh one until the frames or the
time are spent.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection

import trio

from p2pnode.simnet import fuzz as fuzzlib

# What fuzz() needs after its attack (status, the node's tables, its attackers
# stopping): a round's attack ends this long before the time bound.
CHECKS_S = 15.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """How much fuzzing, and with how many attackers."""

    frames: int
    seconds: float
    attackers: int = 8
    # Worker processes fuzz() runs its attackers in (the node's side stays
    # here): on 2 cores, one moves their work off the core every node shares.
    processes: int = 1
    seed: int = 0


@dataclass
class Fuzzed:
    """What the fuzzing sent, round by round, and what it found."""

    rounds: list[fuzzlib.FuzzReport] = field(default_factory=list)
    crashes: list[fuzzlib.Issue] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    # Rounds the time bound cut short (their frames until then are counted).
    cut_short: int = 0
    # ``protocol/kind`` attacks skipped after they killed a target.
    skip: set[str] = field(default_factory=set)
    # What went wrong with the fuzzed node's process itself (hung, ended early).
    notes: list[str] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return sum(r.total_frames for r in self.rounds)

    @property
    def exits(self) -> int:
        return sum(r.node_exits for r in self.rounds)


# --- an honest node of the network, fuzzed in a process of its own ------------------


async def fuzz_joined(bootstrap: tuple[str, ...], cfg: Config, out: Fuzzed) -> None:
    """Fuzz an honest node that joins the network through ``bootstrap``, in its own process.

    Every node of a simnet shares one event loop: fuzzing one of them at full
    rate starves all the others (and their rate caps the fuzzing's). As any
    real node does, this one runs in an OS process of its own (its attackers
    in another, :func:`fuzz.fuzz`'s ``processes``): it joins the network
    (DHT, gossip, relay service on, free mode: the fuzzer's honest chat needs
    no chain), so what the fuzzer makes it say reaches the honest nodes.
    A node that dies is replaced by a fresh one until the frames or the time
    are spent; the kinds of the frames that came last are in the report.
    """
    deadline = trio.current_time() + cfg.seconds
    while out.frames < cfg.frames:
        left = deadline - trio.current_time() - CHECKS_S
        if left <= 0:
            return
        spec = _Joined(
            bootstrap=bootstrap,
            frames=cfg.frames - out.frames,
            seconds=left,
            attackers=cfg.attackers,
            processes=cfg.processes,
            seed=cfg.seed + len(out.rounds),
            skip=frozenset(out.skip),
        )
        report = await _in_process(spec, left + CHECKS_S * 4, out)
        if report is None:
            out.cut_short += 1
            return
        out.targets.append(f"joined {report.engine}")
        out.cut_short += report.cut_short
        out.rounds.append(report)
        out.crashes.extend(report.issues)  # what fuzz() found: exits, peer deaths, bugs
        if report.node_exits:
            out.skip |= set(report.recent_kinds[:1])  # the likeliest culprit
        elif report.total_frames == 0:
            return


@dataclass(frozen=True, slots=True)
class _Joined:
    bootstrap: tuple[str, ...]
    frames: int
    seconds: float
    attackers: int
    processes: int
    seed: int
    skip: frozenset[str]


async def _in_process(spec: _Joined, bound_s: float, out: Fuzzed) -> fuzzlib.FuzzReport | None:
    """Run :func:`_joined_main` in a spawned process; its report, or None if it never came.

    A process that overruns its time says where it waits (its trio tasks), kept
    in ``out.notes``; one that never reports is killed with its worker
    processes (its process group), so nothing of it competes for the cores
    with the chats that follow.
    """
    ctx = multiprocessing.get_context("spawn")
    results, results_child = ctx.Pipe(duplex=False)
    # Not a daemon: fuzz() in there starts its attackers' worker process.
    process = ctx.Process(target=_joined_process, args=(spec, results_child), name="fuzzed-node")
    process.start()
    results_child.close()
    try:
        deadline = trio.current_time() + bound_s
        while trio.current_time() < deadline:
            if await trio.to_thread.run_sync(results.poll, 0.5):
                kind, body = await trio.to_thread.run_sync(results.recv)
                if kind == "report":
                    report: fuzzlib.FuzzReport = body
                    return report
                out.notes.append(f"the fuzzed node's process overran its time; here:\n{body}")
                continue
            if not process.is_alive():
                out.notes.append(f"the fuzzed node's process ended ({process.exitcode}), no report")
                return None
        out.notes.append(f"the fuzzed node's process sent no report within {bound_s:.0f} s")
        return None
    except (EOFError, OSError):
        return None
    finally:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 30):
            await trio.to_thread.run_sync(process.join, 20)
        if process.is_alive() and process.pid is not None:
            # Its attackers' worker too: they share the group it made at start.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.kill()
        results.close()


def _joined_process(spec: _Joined, results: Connection) -> None:
    os.setpgrp()  # a group of its own, with the workers it starts: killed as one
    # Its import resets its logger: quiet it after (docs/libp2p-traps.md#logger-reset-on-import).
    import libp2p  # noqa: F401

    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    logging.getLogger("p2pnode").setLevel(logging.CRITICAL)
    trio.run(_joined_main, spec, results)


async def _joined_main(spec: _Joined, results: Connection) -> None:
    config = replace(fuzzlib.target_config(), bootstrap=spec.bootstrap)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watchdog, spec.seconds + CHECKS_S * 2, results)
        async with fuzzlib.open_target(config) as target:
            report = await fuzzlib.fuzz(
                target.node,
                attackers=spec.attackers,
                frames=spec.frames,
                seed=spec.seed,
                died=target.exited,
                skip=spec.skip,
                processes=spec.processes,
                seconds=spec.seconds,
            )
            if target.failure:
                report.exit_reasons.append(target.failure)
            # Now, not after the node's shutdown: a shutdown that hangs must
            # not lose the round's counts.
            results.send(("report", report))
        nursery.cancel_scope.cancel()


async def _watchdog(after_s: float, results: Connection) -> None:
    """Past the round's time, tell the parent where this process waits (once)."""
    await trio.sleep(after_s)
    with contextlib.suppress(OSError):
        results.send(("stalled", fuzzlib.task_dump()))
