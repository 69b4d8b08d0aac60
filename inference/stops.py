"""Stop strings found in text that arrives in pieces, from one provider or several.

An engine stops at a request's stop strings itself, but only within the
text it generated: after a failover, a stop string that began in the first
provider's text and ends in the next one's is seen by neither
(docs/protocols.md#stop-strings). Nor can a consumer take a stranger's word
that it stopped where asked. The consumer scans the whole answer as it
streams: text that could be the start of a stop string is held back until
the next piece says whether it is, and the answer ends before the first
stop string to be complete, which is never delivered (OpenAI's behaviour).
"""

from __future__ import annotations

from collections.abc import Sequence


class StopScan:
    """Feed it the answer's text as it comes; it says what may be delivered."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text that may be delivered now; after a stop string, nothing more.

        Sets :attr:`stopped` once a stop string is complete: the text before
        it is returned, it and everything after it is dropped.
        """
        if self.stopped:
            return ""
        pending = self._held + text
        # The stop string that is complete first, as if the text came a
        # character at a time (on a tie, the longer one): how the text was
        # split into chunks must not change where the answer ends.
        found = [(i + len(s), i) for s in self._stops if (i := pending.find(s)) >= 0]
        if found:
            self.stopped = True
            return pending[: min(found)[1]]
        deliver = len(pending) - self._partial(pending)
        self._held = pending[deliver:]
        return pending[:deliver]

    def flush(self) -> str:
        """The text held back, once the answer has ended without a stop string."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held

    def _partial(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string.

        A whole stop string is never at the end (:meth:`feed` found it first):
        only its proper beginnings, up to one character short, can be.
        """
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):  # pragma: no mutate
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
