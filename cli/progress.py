"""Progress for work that takes long: a ``rich`` bar on a terminal, plain lines otherwise.

Model loads, waiting for a transaction's receipt, simnet's start-up and
``devchain``'s start say what they are doing while they do it. On a
terminal (stderr a TTY) that is a live line with a spinner, a bar and the
elapsed time; in a pipe, a log file or CI, one plain line a step, so
nothing is lost and no escape code lands in a file. Work in the background
of a command (a node loading its models) says its lines through the log
(info level) instead, so that a pipe that waits on a command's own lines,
or reads its JSON logs, gets nothing else; with ``--log-format json`` every
progress is log lines, never a bar.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import click

logger = logging.getLogger(__name__)
# Set by ``--log-format json``: stderr is for JSON lines only.
LOGS_ONLY = False


class Steps(Protocol):
    """What a piece of long work reports: each step as it ends."""

    def step(self, note: str = "", by: int = 1) -> None: ...

    def close(self) -> None:
        """Stop showing it (its last step does, when it has a total)."""


class _Lines:
    def __init__(self, what: str, total: int | None, logged: bool) -> None:
        self._what = what
        self._total = total
        self._logged = logged
        self._done = 0
        self._started = time.monotonic()

    def step(self, note: str = "", by: int = 1) -> None:
        self._done += by
        of = f"/{self._total}" if self._total is not None else ""
        elapsed = time.monotonic() - self._started
        tail = f": {note}" if note else ""
        line = f"{self._what} [{self._done}{of}, {elapsed:.1f} s]{tail}"
        if self._logged:
            logger.info("%s", line)
        else:
            click.echo(line, err=True)

    def close(self) -> None:
        pass


class _Bar:
    def __init__(self, what: str, total: int | None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn()]  # fmt: skip
        self._progress = Progress(*columns, console=Console(stderr=True))
        self._task = self._progress.add_task(what, total=total)
        self._left = total
        self._progress.start()

    def step(self, note: str = "", by: int = 1) -> None:
        self._progress.advance(self._task, by)
        if note:
            self._progress.console.print(f"  {note}", highlight=False)
        if self._left is not None:
            self._left -= by
            if self._left <= 0:  # the last step ends the live line
                self.close()

    def close(self) -> None:
        self._progress.stop()


def start(
    what: str, total: int | None = None, *, tty: bool | None = None, background: bool = False
) -> Steps:
    """Report steps of ``what`` on stderr from now on: a bar when stderr is a
    terminal (``tty`` None), lines otherwise (log lines for ``background``
    work). A bar with a ``total`` stops at its last step; :func:`progress`
    stops it at the end of a block."""
    if LOGS_ONLY:
        return _Lines(what, total, logged=True)
    if sys.stderr.isatty() if tty is None else tty:
        return _Bar(what, total)
    return _Lines(what, total, logged=background)


@contextmanager
def progress(
    what: str, total: int | None = None, *, tty: bool | None = None, background: bool = False
) -> Iterator[Steps]:
    """:func:`start`, for the length of a block."""
    steps = start(what, total, tty=tty, background=background)
    try:
        yield steps
    finally:
        steps.close()
