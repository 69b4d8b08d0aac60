"""Fixtures of the end-to-end tests (the network itself is in ``network.py``)."""

from network import network

__all__ = ["network"]
