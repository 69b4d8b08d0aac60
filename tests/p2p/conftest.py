"""Fixtures of the p2p tests."""

from __future__ import annotations

import pytest

from p2pnode.p2p.memory import MemoryNetwork


@pytest.fixture
def memory() -> MemoryNetwork:
    """An in-process network for the nodes of one test (``p2p/memory.py``)."""
    return MemoryNetwork()
