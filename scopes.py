"""Exception groups at the edge of nurseries that are implementation details.

trio wraps whatever leaves a nursery in an ExceptionGroup, and py-libp2p's
``host.run()`` nests several nurseries. A caller of ``open_node`` never opened
those, so a single error (a ConfigError, a cancellation) should reach it as
itself, not three groups deep. Real concurrent failures stay grouped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


@contextmanager
def single_errors_ungrouped() -> Iterator[None]:
    """Re-raise a group that holds exactly one exception as that exception."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) == 1:
            raise leaves[0]  # noqa: B904 - its own __cause__ and traceback are kept
        raise
