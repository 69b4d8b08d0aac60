"""``p2pnode bench cli``: how long everyday commands take to start, as a person runs them.

Each command is a fresh process (``python -m p2pnode.cli ...``), run ``rounds``
times, interleaved with the baseline, the bare interpreter (``python -c
pass``), so that machine noise hits both alike; the report gives medians and
each command's ratio to the baseline's median. ``status`` and ``offers`` ask
a real node started for the run (free mode, no model, its own home); ``id``
reads that home, which holds a wallet. The goal (README, "Benchmarks") is a
median under 0.3 s for every command; as every benchmark here, it prints and
never asserts (docs/architecture.md#conventions: benchmarks never assert on wall time).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from p2pnode.errors import P2PNodeError
from p2pnode.simnet.bench import summarize
from p2pnode.simnet.harness import node_command, node_env

P2PNODE = (sys.executable, "-m", "p2pnode.cli")
BASELINE = (sys.executable, "-c", "pass")
COMMANDS: tuple[tuple[str, ...], ...] = (
    ("--help",),
    ("--version",),
    ("id",),
    ("status",),
    ("offers",),
)
GOAL_S = 0.3
# A node starts in ~3 s on an idle 2-core machine (libp2p's import is most of it).
NODE_START_BOUND_S = 60.0


def bench_cli(rounds: int = 7, commands: Sequence[tuple[str, ...]] = COMMANDS) -> dict[str, Any]:
    """Time ``commands`` (arguments of ``p2pnode``) and the baseline, ``rounds`` times each.

    Blocking; starts and stops one node. Raises :class:`P2PNodeError` if the
    node does not start or a command exits with an error (a failing command's
    time would mean nothing).
    """
    with tempfile.TemporaryDirectory(prefix="p2pnode-bench-cli-") as tmp:
        home = Path(tmp) / "home"
        env = node_env(str(home))
        _make_wallet(home)
        samples: dict[str, list[float]] = {" ".join(c): [] for c in commands}
        baseline: list[float] = []
        with _running_node(home):
            for _ in range(rounds):
                baseline.append(_timed_ms(BASELINE, env))
                for command in commands:
                    samples[" ".join(command)].append(_timed_ms((*P2PNODE, *command), env))
    base = summarize(baseline)
    report: dict[str, Any] = {"rounds": rounds, "baseline_ms": base, "commands": {}}
    for name, ms in samples.items():
        stats = summarize(ms)
        report["commands"][name] = {
            "ms": stats,
            "ratio_to_baseline": round(stats["median"] / base["median"], 2),
        }
    slowest = max(c["ms"]["median"] for c in report["commands"].values())
    report["goal_s"] = GOAL_S
    report["goal_met"] = slowest < GOAL_S * 1000
    return report


def _make_wallet(home: Path) -> None:
    from p2pnode.p2p import identity

    # A cheap scrypt: the passphrase is never used, only the address is read.
    identity.create_wallet(home, "bench cli", kdf_iterations=2)


def _timed_ms(argv: Sequence[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(list(argv), env=env, capture_output=True, text=True, check=False)  # noqa: S603 - our own interpreter and arguments
    elapsed = (time.perf_counter() - start) * 1000
    if done.returncode != 0:
        raise P2PNodeError(
            f"bench cli: {' '.join(argv[2:])} exited {done.returncode}: {done.stderr.strip()[:300]}"
        )
    return elapsed


@contextmanager
def _running_node(home: Path) -> Iterator[None]:
    """A free-mode node serving nothing on a free port, until the block ends."""
    argv, env = node_command(str(home), str(home / "ready.json"), "--reachability", "public")
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        # The ready line comes after the ready file and the control socket: wait on it.
        for line in proc.stdout:
            if line.startswith("p2pnode") and "ready" in line:
                break
        else:
            _, err = proc.communicate(timeout=NODE_START_BOUND_S)
            raise P2PNodeError(f"bench cli: the node did not start: {err.strip()[:300]}")
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=NODE_START_BOUND_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


__all__ = ["COMMANDS", "GOAL_S", "bench_cli"]
