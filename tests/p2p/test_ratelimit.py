"""Token buckets shared by the services that spend this node's resources for others."""

from __future__ import annotations

from p2pnode.p2p.ratelimit import RateLimiter, TokenBucket


def test_a_bucket_lets_a_burst_through_then_its_rate() -> None:
    bucket = TokenBucket(capacity=3, per_second=1.0)
    assert all(bucket.take(1, 0.0) for _ in range(3))
    assert not bucket.take(1, 0.5)
    assert bucket.take(1, 1.0)
    assert not bucket.take(2, 1.0)  # takes all or nothing
    assert bucket.level(100.0) == 3  # never above capacity


def test_the_limiter_table_is_bounded_without_resetting_anyone() -> None:
    limiter = RateLimiter(per_minute=60, max_keys=2)
    assert limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)
    # Both still hold history: a new key is refused, none forgotten.
    assert not limiter.allow("c", 0.5)
    assert len(limiter) == 2
    # A second later both have refilled: they are forgotten for the newcomer.
    assert limiter.allow("c", 2.0)
    assert len(limiter) == 1
