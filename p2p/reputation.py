"""What a node remembers of each peer's misbehaviour: scores that decay, in a bounded table.

Every peer is a stranger who may lie. Whatever a peer does against us (a
malformed frame, a refusal, a stall, a promise its offer made and it broke,
a paid session it took and did not serve) is an :class:`Offence` with a
weight; a peer's score is the sum of its weights, each halving every
``half_life_s``. Consumers rank providers by it (a provider with a score
is tried after every clean one), and the node turns away every stream of a
peer whose score passed ``ban_score`` until it has decayed below.

The table is keyed by peer ids, which cost nothing to make: it holds at most
``max_peers`` entries, and when full forgets the peers with the lowest scores
(a Sybil flood can only push out the least suspicious, who had little to
remember). Pure: the caller passes ``now`` (seconds, any monotonic clock).
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from dataclasses import dataclass, field


class Offence(enum.Enum):
    """Kinds of misbehaviour, from routine failure to fraud."""

    # Could not be reached, broke a stream, went silent mid-answer.
    FAILED = "failed"
    # Turned a session or a request down (busy, not allowed, price changed).
    REFUSED = "refused"
    # Sent a malformed, oversized or out-of-order frame.
    PROTOCOL = "protocol"
    # Its offer claimed what it then denied: a model it does not serve, a bid
    # the chain contradicts, more tokens (or bytes) than were asked for.
    BROKEN_PROMISE = "broken_promise"
    # A sealed frame failed authentication: tampering, or a replay.
    AUTH = "auth"
    # Took an on-chain session (the consumer's stake) and did not serve it.
    PAID_NO_SERVICE = "paid_no_service"
    # An audit found that it did not run the model it sells as asked
    # (p2p/audit.py): signed evidence, not a suspicion.
    CHEATED = "cheated"


WEIGHTS: dict[Offence, float] = {
    Offence.FAILED: 1.0,
    Offence.REFUSED: 1.0,
    Offence.PROTOCOL: 2.0,
    Offence.BROKEN_PROMISE: 4.0,
    Offence.AUTH: 8.0,
    Offence.PAID_NO_SERVICE: 40.0,
    Offence.CHEATED: 40.0,
}
"""How much each offence adds to a score. A refusal and a failure weigh
the same, so a provider that refuses every request ranks like one that is
down; tampering passes the ban score in three tries, and taking a paid
session without serving it bans at once (for about one half-life)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """How long misbehaviour is remembered, and when it bans."""

    # A single failure fades to a quarter in 10 minutes: an honest provider
    # that restarted is tried again soon, a serial refuser stays behind.
    half_life_s: float = 300.0
    # Streams from a peer above this are reset on arrival: e.g. eleven
    # malformed frames in quick succession, or two paid sessions not served.
    ban_score: float = 20.0
    # Scores below this count as clean (old, nearly forgotten failures).
    clean_below: float = 0.25
    max_peers: int = 10_000


@dataclass
class _Record:
    score: float
    at: float
    counts: Counter[Offence] = field(default_factory=Counter)
    served: int = 0


@dataclass(frozen=True, slots=True)
class Standing:
    """A peer's record as of ``now``: what ``p2pnode offers`` shows."""

    score: float
    banned: bool
    served: int
    offences: dict[str, int]


class Reputation:
    """Per-peer misbehaviour scores with exponential decay, bounded in size."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._peers: dict[str, _Record] = {}
        # Offences of every kind over the node's life, of all peers.
        self.totals: Counter[Offence] = Counter()

    def record(self, peer: str, offence: Offence, now: float) -> float:
        """Count ``offence`` against ``peer``; returns its score afterwards."""
        held = self._get(peer, now)
        held.score += WEIGHTS[offence]
        held.counts[offence] += 1
        self.totals[offence] += 1
        return held.score

    def served(self, peer: str, now: float) -> None:
        """Note a request ``peer`` served in full (shown, never erases offences)."""
        self._get(peer, now).served += 1

    def score(self, peer: str, now: float) -> float:
        """The peer's decayed score (0.0 for clean or unknown peers)."""
        held = self._peers.get(peer)
        if held is None:
            return 0.0
        value = self._decayed(held, now)
        return value if value >= self.cfg.clean_below else 0.0

    def banned(self, peer: str, now: float) -> bool:
        """Whether streams from ``peer`` are to be turned away now."""
        return self.score(peer, now) >= self.cfg.ban_score

    def standing(self, peer: str, now: float) -> Standing | None:
        """The peer's record, or None if it has none."""
        held = self._peers.get(peer)
        if held is None:
            return None
        score = self.score(peer, now)
        offences = {o.value: n for o, n in held.counts.items()}
        return Standing(round(score, 2), score >= self.cfg.ban_score, held.served, offences)

    def misbehaving(self, now: float) -> tuple[int, int]:
        """Peers with a score now, and of those the banned (the book is bounded)."""
        scores = [self.score(peer, now) for peer in self._peers]
        scored = sum(1 for s in scores if s > 0)
        return scored, sum(1 for s in scores if s >= self.cfg.ban_score)

    def __len__(self) -> int:
        return len(self._peers)

    def _decayed(self, held: _Record, now: float) -> float:
        elapsed = max(0.0, now - held.at)
        return held.score * math.pow(0.5, elapsed / self.cfg.half_life_s)

    def _get(self, peer: str, now: float) -> _Record:
        held = self._peers.get(peer)
        if held is None:
            if len(self._peers) >= self.cfg.max_peers:
                self._forget_least(now)
            held = self._peers[peer] = _Record(0.0, now)
        else:
            held.score = self._decayed(held, now)
            held.at = now
        return held

    def _forget_least(self, now: float) -> None:
        # A tenth at a time, so a flood of new ids costs one sort per
        # thousand entries, not one per entry.
        ranked = sorted(self._peers, key=lambda p: self._decayed(self._peers[p], now))
        for peer in ranked[: max(1, len(ranked) // 10)]:
            del self._peers[peer]
