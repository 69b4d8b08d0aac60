"""The token batching policy, with plain clocks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pnode.protocols.infer.batching import Batch, Config, Streams, TokenBatcher
from p2pnode.protocols.infer.messages import Alternative, TokenLogprob


def test_the_first_token_leaves_at_once() -> None:
    batcher = TokenBatcher(Config(window_s=0.02))
    assert batcher.add("Hel", 1, now=10.0) == Batch("Hel", 1)
    assert batcher.deadline() is None


def test_later_tokens_wait_for_the_window() -> None:
    batcher = TokenBatcher(Config(window_s=0.02))
    batcher.add("a", 1, now=10.0)
    assert batcher.add("b", 1, now=10.001) is None
    assert batcher.add("c", 1, now=10.010) is None
    assert batcher.deadline() == pytest.approx(10.021)
    assert batcher.add("d", 1, now=10.0215) == Batch("bcd", 3)


def test_a_slow_engine_is_flushed_at_the_deadline() -> None:
    batcher = TokenBatcher(Config(window_s=0.02))
    batcher.add("a", 1, now=0.0)
    batcher.add("b", 1, now=0.005)
    deadline = batcher.deadline()
    assert deadline == pytest.approx(0.025)
    # The adapter waits until the deadline, then flushes what waits.
    assert batcher.flush() == Batch("b", 1)
    assert batcher.flush() is None


def test_a_fast_engine_is_capped_by_max_tokens() -> None:
    batcher = TokenBatcher(Config(window_s=1.0, max_tokens=4))
    batcher.add("x", 1, now=0.0)
    out = [batcher.add(str(i), 1, now=0.0001 * i) for i in range(8)]
    assert [b for b in out if b] == [Batch("0123", 4), Batch("4567", 4)]


def test_long_pieces_are_capped_by_max_bytes() -> None:
    # A frame's size is bounded however long the pieces or their alternatives.
    batcher = TokenBatcher(Config(window_s=1.0, max_tokens=1024, max_bytes=100))
    batcher.add("x", 1, now=0.0)
    out = [batcher.add("y" * 30, 1, now=0.0001 * i) for i in range(8)]
    assert [b.tokens for b in out if b] == [4, 4]
    top = tuple(Alternative(piece=b"z" * 40, logprob=-1) for _ in range(2))
    entry = TokenLogprob(piece=b"w", logprob=-1, top=top)
    assert batcher.add("w", 1, now=0.01, entries=[entry]) is None
    assert batcher.add("w", 1, now=0.02, entries=[entry]) == Batch("ww", 2, entries=(entry, entry))


@given(st.lists(st.tuples(st.text(max_size=5), st.floats(0, 0.05)), max_size=50))
def test_no_text_is_lost_or_reordered(pieces: list[tuple[str, float]]) -> None:
    batcher = TokenBatcher()
    now, sent = 0.0, []
    for text, gap in pieces:
        now += gap
        if (batch := batcher.add(text, 1, now)) is not None:
            sent.append(batch)
    if (rest := batcher.flush()) is not None:
        sent.append(rest)
    assert "".join(b.text for b in sent) == "".join(t for t, _ in pieces)
    assert sum(b.tokens for b in sent) == len(pieces)


def test_a_batch_carries_the_ids_and_log_probabilities_of_its_tokens_in_order() -> None:
    batcher = TokenBatcher(Config(window_s=0.02))
    assert batcher.add("a", 1, 0.0, (5,), (-100,)) == Batch("a", 1, (5,), (-100,))
    assert batcher.add("b", 1, 0.001, (6,), (-200,)) is None
    assert batcher.add("cd", 2, 0.002, (7, 8), (-300, -400)) is None
    assert batcher.flush() == Batch("bcd", 3, (6, 7, 8), (-200, -300, -400))
    # An engine with no ids (an upstream server) sends text alone.
    assert batcher.add("e", 1, 1.0) is None
    assert batcher.flush() == Batch("e", 1)


def test_the_window_widens_with_the_streams_served_up_to_its_cap() -> None:
    streams = Streams()
    batcher = TokenBatcher(Config(window_s=0.02, max_window_s=0.1), streams)
    widths = []
    for active in (0, 1, 4, 8):
        streams.active = active
        widths.append(batcher.window_s())
    assert widths == pytest.approx([0.02, 0.02, 0.08, 0.1])
    # With four streams a token waits for others up to 80 ms, not 20.
    streams.active = 4
    batcher.add("a", 1, now=0.0)
    assert batcher.add("b", 1, now=0.05) is None
    assert batcher.deadline() == pytest.approx(0.13)
    assert batcher.add("c", 1, now=0.131) == Batch("bc", 2)
