"""Token buckets: how much of something may happen, overall and per key.

Shared by every service that spends this node's resources for others (the
provider's requests, dial-backs, the relay's bytes). Pure: the caller passes
``now`` (seconds on any monotonic clock; the adapters use trio's).
"""

from __future__ import annotations


class TokenBucket:
    """Up to ``capacity`` units at once, refilled at ``per_second`` units a second.

    A full bucket lets a burst of ``capacity`` through; after that, the long
    run rate is ``per_second``.
    """

    def __init__(self, capacity: float, per_second: float) -> None:
        self.capacity = float(capacity)
        self.per_second = float(per_second)
        self._tokens = self.capacity
        self._since: float | None = None

    def level(self, now: float) -> float:
        """Units available at ``now``."""
        if self._since is not None:
            gained = max(0.0, now - self._since) * self.per_second
            self._tokens = min(self.capacity, self._tokens + gained)
        self._since = now
        return self._tokens

    def take(self, amount: float, now: float) -> bool:
        """Take ``amount`` units if that many are there; otherwise take none."""
        if self.level(now) < amount:
            return False
        self._tokens -= amount
        return True


class RateLimiter:
    """A token bucket per key: ``per_minute`` events, refilled continuously.

    Keys are what peers choose (peer ids cost nothing to make), so the table
    is bounded: at ``max_keys`` it forgets the buckets that have refilled
    (they hold nothing a fresh one would not), and while every bucket is
    still in use a new key is refused rather than any other key's history
    being dropped (a flood of new identities cannot reset a peer's limit).
    """

    def __init__(self, per_minute: int, max_keys: int = 10_000) -> None:
        self.per_minute = per_minute
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}
        self._pruned_at: float | None = None

    def allow(self, key: str, now: float) -> bool:
        """Take one token for ``key`` if there is one."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys and not self._prune(now):
                return False
            bucket = self._buckets[key] = TokenBucket(self.per_minute, self.per_minute / 60.0)
        return bucket.take(1.0, now)

    def _prune(self, now: float) -> bool:
        """Forget full buckets; whether there is room for a new key afterwards.

        At most once a second: with a table full of busy keys, every new key
        would otherwise cost a pass over all of them.
        """
        if self._pruned_at is None or now - self._pruned_at >= 1.0:
            self._pruned_at = now
            self._buckets = {k: b for k, b in self._buckets.items() if b.level(now) < b.capacity}
        return len(self._buckets) < self.max_keys

    def __len__(self) -> int:
        return len(self._buckets)
