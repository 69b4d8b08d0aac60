"""p2pnode's wire protocols.

Each protocol has the same four parts (STYLE.md): ``messages`` (frozen
dataclasses), ``machine`` (a pure state machine: bytes in, events out, no I/O or
clock), ``service`` (a small trio adapter over a libp2p stream) and the package
``__init__`` with ``PROTOCOL_ID`` and ``Config``. ``wire`` holds the framing
shared by all of them; this package depends on no other p2pnode package.
"""
