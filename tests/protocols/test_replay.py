"""The per-session replay window: each stream id opens one stream, once."""

from __future__ import annotations

import tracemalloc

from hypothesis import given
from hypothesis import strategies as st

from p2pnode.protocols.infer.replay import DEFAULT_SIZE, ReplayWindow
from p2pnode.protocols.session.crypto import MAX_STREAM_ID


def test_each_id_is_accepted_once() -> None:
    window = ReplayWindow()
    assert [window.accept(i) for i in (1, 2, 3)] == [True, True, True]
    assert [window.accept(i) for i in (1, 2, 3)] == [False, False, False]
    assert window.accept(4)


def test_ids_arriving_out_of_order_within_the_window_are_accepted_once() -> None:
    """Concurrent streams of one session may overtake each other."""
    window = ReplayWindow(size=8)
    assert window.accept(5)
    assert window.accept(3)
    assert window.accept(4)
    assert not window.accept(3)
    assert window.accept(0)  # 5 - 0 < 8: still inside the window
    assert not window.accept(0)


def test_an_id_below_the_window_is_refused() -> None:
    """Too old to tell from a replay: refused, as IPsec does."""
    window = ReplayWindow(size=8)
    assert window.accept(10)
    assert window.accept(3)  # the lowest id the window still sees
    assert not window.accept(2)


def test_a_huge_jump_slides_the_window_without_growing_it() -> None:
    window = ReplayWindow(size=8)
    assert window.accept(1)
    # Not even for a moment: shifting the bitmap by the jump would build a
    # 2**32-bit (512 MiB) integer before the mask cut it back.
    tracemalloc.start()
    try:
        assert window.accept(MAX_STREAM_ID)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert window._seen.bit_length() <= 8  # not a 2**32-bit integer
    assert not window.accept(MAX_STREAM_ID)
    assert not window.accept(1)
    assert window.accept(MAX_STREAM_ID - 1)


def test_ids_outside_the_nonce_range_are_never_accepted() -> None:
    window = ReplayWindow()
    assert not window.accept(-1)
    assert not window.accept(MAX_STREAM_ID + 1)
    assert window.accept(0)


def test_size_zero_means_strictly_increasing() -> None:
    window = ReplayWindow(size=0)
    assert window.accept(2)
    assert not window.accept(2)
    assert not window.accept(1)
    assert window.accept(3)


@given(
    st.integers(min_value=0, max_value=64),
    st.lists(
        st.integers(min_value=0, max_value=200)
        | st.integers(min_value=-5, max_value=MAX_STREAM_ID + 5),
        max_size=200,
    ),
)
def test_the_window_matches_a_set_of_everything_seen(size: int, ids: list[int]) -> None:
    """A model with unbounded memory: new, in range, and above ``top - size``."""
    window = ReplayWindow(size=size)
    seen: set[int] = set()
    for stream_id in ids:
        top = max(seen, default=-1)
        expected = (
            0 <= stream_id <= MAX_STREAM_ID and stream_id not in seen and stream_id > top - size
        )
        assert window.accept(stream_id) is expected
        if expected:
            seen.add(stream_id)
        assert window._seen.bit_length() <= max(size, 1)


def test_the_default_window_is_small() -> None:
    window = ReplayWindow()
    for i in range(0, 10 * DEFAULT_SIZE, 3):
        window.accept(i)
    assert window._seen.bit_length() <= DEFAULT_SIZE
