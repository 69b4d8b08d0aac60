"""Which stream ids a session has used: each may open one stream, once.

A session's key seals every stream of the session, with the stream id in
the nonce (``session.crypto``). If a provider accepted one stream id twice it
would seal a second answer under nonces it already used (ChaCha20 keystream
reuse), and a recorded InferOpen and Request, sent again, would be generated
and billed again. So the provider keeps one :class:`ReplayWindow` per session
and refuses a stream whose id it has seen.

Theory of operation: the anti-replay window of IPsec (RFC 4303 §3.4.3) and
WireGuard. Consumers number streams upwards, and concurrent streams may
arrive a little out of order. The window holds the highest id accepted and a
bitmap of the ``size`` ids below and at it. An id above the highest is new
(the bitmap slides up); one inside the window is new if its bit is clear;
one below the window cannot be told apart from a replay and is refused.
Memory is ``size`` bits whatever ids a peer sends.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import Final

from p2pnode.protocols.session.crypto import MAX_STREAM_ID

DEFAULT_SIZE: Final = 1024
"""Ids a stream may lag behind the newest and still be accepted: far more
streams than a consumer keeps in flight on one session, for 128 bytes."""


class ReplayWindow:
    """The stream ids one session has accepted, in bounded memory."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        # size 0: ids must strictly increase (nothing may arrive late).
        self.size = size
        self._mask = (1 << size) - 1
        self._top = -1  # highest id accepted; -1 before the first
        self._seen = 0  # bit i: id ``_top - i`` was accepted

    def accept(self, stream_id: int) -> bool:
        """Record ``stream_id`` and return True if it is new; False if seen or too old.

        An id outside ``0..MAX_STREAM_ID`` is never accepted (the machine
        refuses such ids before they get here).
        """
        if not 0 <= stream_id <= MAX_STREAM_ID:
            return False
        if stream_id > self._top:
            shift = stream_id - self._top
            # A jump past the window clears it; shifting by the jump itself
            # would build an integer of up to 2**32 bits.
            self._seen = 1 if shift >= self.size else ((self._seen << shift) | 1) & self._mask
            self._top = stream_id
            return True
        offset = self._top - stream_id
        if offset >= self.size:
            return False
        bit = 1 << offset
        if self._seen & bit:
            return False
        self._seen |= bit
        return True


__all__ = ["DEFAULT_SIZE", "ReplayWindow"]
