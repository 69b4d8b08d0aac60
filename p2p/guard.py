"""The boundary where a peer's stream of our protocols arrives.

Every handler the node registers is wrapped here: streams beyond the
per-peer or overall budget, and those of a banned peer, are reset before a
byte is read; a protocol violation is counted against the peer; anything
else that escapes a handler is our bug, logged, and ends only that stream
(an exception escaping a py-libp2p handler would end the whole node:
docs/libp2p-traps.md#handler-exceptions-end-the-node).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import INetStream

from p2pnode.errors import BrokenStreamError, NetworkError, RemoteProtocolError
from p2pnode.p2p import reputation as reputationlib
from p2pnode.p2p.host import short
from p2pnode.protocols.stream import reset_quietly

logger = logging.getLogger(__name__)

Serve = Callable[[INetStream], Awaitable[None]]


class StreamGuard:
    """Inbound streams of ours: budgets, bans and failures, per peer."""

    def __init__(
        self, reputation: reputationlib.Reputation, *, max_per_peer: int, max_total: int
    ) -> None:
        self._reputation = reputation
        self._max_per_peer = max_per_peer
        self._max_total = max_total
        # Inbound streams of ours running now, per peer.
        self._streams: collections.Counter[str] = collections.Counter()
        self.refused = 0
        # Protocol violations of peers, by our protocol and the error code
        # (both from fixed sets: a stranger cannot add a label).
        self.violations: collections.Counter[tuple[str, str]] = collections.Counter()

    def running(self, peer: str | None = None) -> int:
        """Streams running now, of ``peer`` or of everyone."""
        return self._streams[peer] if peer is not None else sum(self._streams.values())

    def wrap(self, protocol: str, serve: Serve) -> Serve:
        """``serve`` as a stream handler that no peer can take the node down through."""

        async def handler(stream: INetStream) -> None:
            peer = str(stream.muxed_conn.peer_id)
            over = self._streams[peer] >= self._max_per_peer or self.running() >= self._max_total
            if over or self._reputation.banned(peer, trio.current_time()):
                # Turned away before a byte is read: a banned or greedy peer
                # costs us one reset.
                self.refused += 1
                await reset_quietly(stream)
                return
            self._streams[peer] += 1
            try:
                await serve(stream)
            except RemoteProtocolError as exc:
                self.violations[(protocol, exc.code.name.lower())] += 1
                score = self._reputation.record(
                    peer, reputationlib.Offence.PROTOCOL, trio.current_time()
                )
                logger.info(
                    "%s: %s broke the protocol: %s (score %.1f)", protocol, short(peer), exc, score
                )
            except (BrokenStreamError, NetworkError) as exc:
                logger.debug("%s: stream with %s ended: %s", protocol, short(peer), exc)
            except Exception:
                logger.exception("%s: handler failed for %s (a bug)", protocol, short(peer))
                await reset_quietly(stream)
            finally:
                self._streams[peer] -= 1
                if self._streams[peer] <= 0:
                    del self._streams[peer]

        return handler
