"""Running the p2pnode command in tests: as a process (what a user runs), or in this
process through click's runner (argument and error paths, where a process start
would cost ~1.6 s and prove nothing more).

Imported as ``p2pnode.tests.cli.helpers``: a package path, so it works under any
pytest import mode (no sibling-module imports).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from p2pnode.p2p import identity

P2PNODE = [sys.executable, "-m", "p2pnode.cli"]
BOUND_S = 60  # a cold start imports libp2p (~1 s) and web3; loaded CI is slower
PASSWORD = "correct horse"


def env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without P2PNODE_* settings, with ``home`` and ``extra``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("P2PNODE_")}
    clean["P2PNODE_HOME"] = str(home)
    clean.update(extra)
    return clean


def run(home: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """``p2pnode ARGS`` as a process, to its end."""
    return subprocess.run(
        [*P2PNODE, *args], env=env(home, **extra), capture_output=True, text=True, timeout=BOUND_S
    )


def invoke(home: Path, *args: str, umask: int | None = None, **extra: str) -> Result:
    """``p2pnode ARGS`` in this process (click's runner): exit code, stdout, stderr.

    The command sets up logging for itself (one handler on its stderr) and may
    set the umask: both are given back afterwards, so the tests after it see
    pytest's own handlers and the umask they had.
    """
    from p2pnode.cli.main import main

    settings = {k: None for k in os.environ if k.startswith("P2PNODE_")}
    settings.update(P2PNODE_HOME=str(home), **extra)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    old_umask = os.umask(umask) if umask is not None else None
    try:
        return CliRunner().invoke(main, list(args), env=settings, catch_exceptions=False)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        if old_umask is not None:
            os.umask(old_umask)


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A command that must succeed, with the wallet's passphrase at hand."""
    result = run(home, *args, P2PNODE_WALLET_PASSWORD=PASSWORD)
    assert result.returncode == 0, result.stderr
    return result


def home_with_wallet(tmp_path: Path, name: str) -> tuple[Path, str]:
    """A home with a peer key and a wallet (fast to unlock); (home, wallet address)."""
    home = tmp_path / name
    identity.load_or_create_peer_key(home)
    wallet = identity.create_wallet(home, PASSWORD, kdf_iterations=2)
    return home, wallet.address


class Started:
    """A ``p2pnode start`` process that said it is ready."""

    def __init__(self, proc: subprocess.Popen[str], ready: dict[str, object]) -> None:
        self.proc = proc
        self.peer_id = str(ready["peer_id"])
        addrs = ready["addrs"]
        assert isinstance(addrs, list)
        self.addrs = [str(a) for a in addrs]


def start(home: Path, ready_file: Path, *args: str, serve: bool = False, **extra: str) -> Started:
    """``p2pnode start`` on a port the system chooses (``extra``: more environment);
    returns once it is ready."""
    flags = [] if serve else ["--no-serve"]
    proc = subprocess.Popen(
        [*P2PNODE, "start", "--listen", "/ip4/127.0.0.1/tcp/0", "--ready-file", str(ready_file)]
        + flags
        + list(args),
        env=env(home, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    # The ready line is printed after the ready file is written: wait on it.
    for line in proc.stdout:
        if line.startswith("p2pnode") and "ready" in line:
            break
    else:
        proc.wait(BOUND_S)
        pytest.fail(f"node did not start: {proc.stderr.read() if proc.stderr else ''}")
    return Started(proc, json.loads(ready_file.read_text()))


@dataclass
class Devchain:
    deployment: Path
    lines: list[str]  # what it printed up to its funding lines


@contextmanager
def devchain(tmp_path: Path, *fund: str) -> Iterator[Devchain]:
    """``p2pnode devchain`` on a port anvil chooses, funding ``fund``; stopped at exit."""
    deployment = tmp_path / "deployment.json"
    args = [a for address in fund for a in ("--fund", address)]
    proc = subprocess.Popen(
        [*P2PNODE, "devchain", "--port", "0", "--deployment", str(deployment), *args],
        env=env(tmp_path / "chain"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    # Its funding lines follow the ready line: read until they are all there.
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if lines[-1].startswith("devchain ready") and not fund:
            break
        if sum(x.startswith("funded 0x") for x in lines) == len(fund) > 0:
            break
    else:
        proc.wait(BOUND_S)
        pytest.fail(f"devchain did not start: {proc.stderr.read() if proc.stderr else ''}")
    try:
        yield Devchain(deployment, lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=BOUND_S)
        assert "devchain stopped" in out
