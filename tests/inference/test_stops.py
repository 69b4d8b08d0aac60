"""The consumer's stop-string scan, fed text split every way it can arrive."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.inference.stops import StopScan


def _run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    scan = StopScan(stops)
    out = "".join(scan.feed(p) for p in pieces)
    return out + scan.flush(), scan.stopped


def test_text_ends_before_the_first_stop_string_and_it_is_not_delivered() -> None:
    assert _run(["END"], ["Hello ", "wor", "ld END and more"]) == ("Hello world ", True)
    # The first stop string to be complete wins, whichever is listed first.
    assert _run(["b", "a"], ["xxaxb"]) == ("xx", True)
    assert _run(["b", "aba"], ["aba"]) == ("a", True)  # "b" is complete before "aba"
    assert _run(["b", "aba"], ["ab", "a"]) == ("a", True)


def test_a_stop_string_split_across_pieces_is_found() -> None:
    assert _run(["world"], ["Hello wo", "r", "ld!"]) == ("Hello ", True)


def test_text_that_only_began_like_a_stop_string_is_delivered_later() -> None:
    scan = StopScan(["world"])
    assert scan.feed("Hello wor") == "Hello "  # "wor" may be the start of "world"
    assert scan.feed("k") == "work"
    assert scan.feed(" wo") == " "
    assert scan.flush() == "wo"  # the answer ended: held text is the user's
    assert not scan.stopped


def test_nothing_after_a_stop_and_no_stops_means_no_holding_back() -> None:
    scan = StopScan(["x"])
    assert scan.feed("ax") == "a"
    assert scan.feed("more") == ""
    assert scan.flush() == ""
    free = StopScan([])
    assert free.feed("any text") == "any text"
    assert StopScan([""]).feed("empty stops are ignored") == "empty stops are ignored"


def test_the_longest_possible_start_is_held() -> None:
    # "aab": "aa" could start it; so could "a". All of "aa" waits.
    scan = StopScan(["aab"])
    assert scan.feed("caa") == "c"
    assert scan.feed("c") == "aac"
    scan = StopScan(["abcd", "cx"])
    assert scan.feed("zabc") == "z"  # "abc" may start "abcd" (and "c" may start "cx")
    assert scan.feed("x") == "ab"  # it was "cx"
    assert scan.stopped


@settings(max_examples=1000)  # pure and fast: many splits, every run
@given(
    text=st.text(alphabet="abc ", max_size=40),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_any_split_gives_what_the_whole_text_gives(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    # The oracle: the text a character at a time; the answer ends before the
    # first stop string to be complete (the longest, if several end there).
    expected = (text, False)
    for end in range(1, len(text) + 1):
        complete = [s for s in stops if text[:end].endswith(s)]
        if complete:
            expected = (text[: end - max(map(len, complete))], True)
            break
    assert _run(stops, pieces) == expected
    assert _run(stops, [text]) == expected  # whole, or in pieces: the same


def test_text_held_when_a_stop_string_completes_is_never_delivered_twice() -> None:
    scan = StopScan(["abc", "x"])
    assert scan.feed("ab") == ""  # may be "abc"
    assert scan.feed("x") == "ab"  # it was "x": what came before it is delivered once
    assert scan.stopped
    assert scan.flush() == ""
    assert scan.feed("more") == ""


def test_the_first_of_two_occurrences_ends_the_text_and_a_flush_leaves_nothing_behind() -> None:
    assert _run(["x"], ["axbxc"]) == ("a", True)
    scan = StopScan(["abc"])
    assert scan.feed("zab") == "z"
    assert scan.flush() == "ab"
    assert scan.feed("y") == "y"  # nothing held from before the flush


@pytest.mark.parametrize("pieces", [["aba"], ["ab", "a"], ["a", "b", "a"]])
def test_where_the_answer_ends_does_not_depend_on_the_chunks(pieces: list[str]) -> None:
    # Found by the property test: "aba" begins first but "b" is complete first.
    assert _run(["b", "aba"], pieces) == ("a", True)
