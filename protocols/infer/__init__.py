"""``/p2pnode/infer/1.0.0``: one request per stream, tokens streamed back sealed.

The consumer opens a stream with a clear ``InferOpen`` (which session, which
stream id) and the sealed Request; the provider answers sealed Chunks (batched
by ``batching``), then Done with the session's provider-signed cumulative
``Receipt``; the consumer answers Ack, its own signature over the receipt.
Closing the stream early cancels generation. ``messages`` and ``machine`` are
the pure protocol, ``service`` the trio adapter (docs/protocols.md#inference-stream).
"""

from __future__ import annotations

from typing import Final

PROTOCOL_ID: Final = "/p2pnode/infer/1.0.0"

__all__ = ["PROTOCOL_ID"]
