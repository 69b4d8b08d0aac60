"""p2pnode's wire protocols.

Each protocol has the same four parts (docs/architecture.md#protocols):
``messages`` (frozen dataclasses), ``machine`` (a pure state machine: bytes
in, events out, no I/O or clock), ``service`` (a small trio adapter over a
libp2p stream) and the package ``__init__`` with ``PROTOCOL_ID`` and
``Config``. One differs: ``offers`` (an OfferBook, no machine) travels on
gossip. ``wire`` holds the framing shared by all of them, ``refusal`` a
provider's "no" as a value; this package depends on no other p2pnode
package.
"""
