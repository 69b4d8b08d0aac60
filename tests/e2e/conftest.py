"""Fixtures of the end-to-end tests (the network itself is in ``network.py``)."""

from p2pnode.tests.e2e.network import network

__all__ = ["network"]
