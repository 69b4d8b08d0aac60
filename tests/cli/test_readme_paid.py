"""The README's paid network, followed as written: each "Terminal" block in a shell of
its own, the long-running ones left running until what they say to wait for appears."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[2] / "README.md"
BOUND_S = 120  # the slowest step: the consumer's first chat opens a session on chain
WAIT = re.compile(r"^# runs until Ctrl-C; go on once it prints: (.+)$", re.MULTILINE)


def paid_blocks(readme: str) -> list[str]:
    """The shell blocks of the README's paid-network section that start with "# Terminal"."""
    section = readme.split("\n## A paid network", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    return [b for b in blocks if b.startswith("# Terminal")]


@dataclass
class Terminal:
    """A shell running one block; its output collected as it comes."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, text: str) -> None:
        def seen() -> bool:
            return any(text in line for line in self.lines) or not self._reading()

        with self._changed:
            self._changed.wait_for(seen, timeout=BOUND_S)
        if not any(text in line for line in self.lines):
            pytest.fail(f"never printed {text!r}:\n{self.output()}")

    def finish(self) -> int:
        """Wait for the block to end and its output to be read; its exit code."""
        code = self.proc.wait(BOUND_S)
        assert self._reader is not None
        self._reader.join(BOUND_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def _reading(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def output(self) -> str:
        return "".join(self.lines)


def _free_port() -> int:
    """A port nobody listens on now. The README's blocks name fixed ports and later
    blocks dial them, so each is replaced by one of these: the only place the
    tests guess a free port instead of binding port 0 (a short window remains
    in which another process could take it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_readme_paid_network_works_as_written(tmp_path: Path) -> None:
    blocks = paid_blocks(README.read_text())
    assert [b.splitlines()[0].split(":")[0] for b in blocks] == [
        "# Terminal 1", "# Terminal 2", "# Terminal 3", "# Terminal 4",
    ]  # fmt: skip
    # As written, but in this test's own directory and on free ports (a machine
    # running tests may use 8080); `p2pnode` is this interpreter's.
    ports = {port: str(_free_port()) for port in ("8545", "4001", "4011", "8080")}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "p2pnode"
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} -m p2pnode.cli "$@"\n')
    launcher.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PNODE_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"

    def localised(block: str) -> str:
        block = block.replace("/tmp/p2pnode-", f"{tmp_path}/")
        for port, free in ports.items():
            block = re.sub(rf"\b{port}\b", free, block)
        return block

    running: list[Terminal] = []
    try:
        for block in blocks:
            script = localised(block)
            wait = WAIT.search(script)
            proc = subprocess.Popen(
                ["bash", "-e", "-c", script],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # Ctrl-C reaches the whole terminal
            )
            terminal = Terminal(proc)
            if wait is not None:
                running.append(terminal)
                terminal.wait_for(wait.group(1))
                continue
            assert terminal.finish() == 0, terminal.output()
            answer = json.loads(terminal.output().strip().splitlines()[-1])
            assert answer["choices"][0]["message"]["content"], answer
            assert answer["usage"]["completion_tokens"] > 0
        consumer = running[2]
        # The consumer's close pays the whole seconds since the open's block:
        # a chat answered and stopped within that second pays 0 (seen once in
        # a full run). Let the chain's clock pass a second, as a user's would.
        time.sleep(2)  # noqa: TID251 - a synchronous test of processes: no event loop here
    finally:
        # Ctrl-C in each terminal, the last started first.
        for terminal in reversed(running):
            if terminal.proc.poll() is None:
                os.killpg(terminal.proc.pid, signal.SIGINT)
                try:
                    terminal.finish()
                except subprocess.TimeoutExpired:
                    os.killpg(terminal.proc.pid, signal.SIGKILL)
    # The consumer says what the session cost it as it stops.
    said = consumer.output()
    assert "p2pnode stopped" in said, said
    # 600 s (the default --session-seconds) at 0.001 tokens/s.
    summary = re.search(
        r"settled on chain: 0\.6 tokens escrowed, ([\d.]+) tokens? paid to providers, "
        r"([\d.]+) tokens? refunded",
        said,
    )
    assert summary is not None, said
    paid, refunded = (Decimal(x) for x in summary.groups())
    assert paid > 0
    assert paid + refunded == Decimal("0.6")
    assert "(1 session opened, 1 closed in this run)" in said, said
