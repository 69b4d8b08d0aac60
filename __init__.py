"""p2pnode: a pure peer-to-peer network for private, paid LLM inference.

The repository root is the ``p2pnode`` package (ARCHITECTURE §14): ``p2p``,
``protocols``, ``inference``, ``chain``, ``cli`` and ``simnet`` are its
subpackages.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("p2pnode")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
