"""p2pnode's wire protocols.

Each protocol has the same four parts (docs/architecture.md#protocols):
``messages`` (frozen dataclasses), ``machine`` (a pure state machine: bytes
in, events out, no I/O or clock), ``service`` (a small trio adapter over a
libp2p stream) and the package ``__init__`` with ``PROTOCOL_ID`` and
``Config``. Two differ: ``dialback``'s adapter is in ``p2p/nat.py``, and
``offers`` (an OfferBook, no machine) travels on gossip. ``wire`` holds the
framing shared by all of them; this package depends on no other p2pnode
package.
"""
