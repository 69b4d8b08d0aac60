"""A lock per key, for work that must happen once per peer at a time.

A node dials one relay circuit per peer and opens one session per provider
and model at a time; the tasks that want the same one wait for the first.
The table holds a key only while someone holds or waits for its lock, so it
cannot grow with every peer ever reached.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)


class KeyedLocks(Generic[K]):
    """``async with locks.hold(key):`` one task at a time per key."""

    def __init__(self) -> None:
        self._locks: dict[K, trio.Lock] = {}

    def __len__(self) -> int:
        """Keys held or waited for now."""
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, key: K) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(key, None)
