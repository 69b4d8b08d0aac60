"""p2pnode: a pure peer-to-peer network for private, paid LLM inference.

The repository root is the ``p2pnode`` package: ``p2p``, ``protocols``,
``inference``, ``chain``, ``cli`` and ``simnet`` are its subpackages, so no
top-level name collides with another distribution's
(docs/architecture.md#one-package-namespace).
"""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # ``__version__`` is looked up on first use (PEP 562), not at import:
    # importlib.metadata alone costs ~40 ms, a sixth of the CLI's start-up
    # budget (README, "Benchmarks": bench cli), and most commands never print it.
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("p2pnode")
    except PackageNotFoundError:  # running from a source tree that is not installed
        found = "0.0.0+source"
    globals()["__version__"] = found
    return found
