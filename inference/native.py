"""The one door to llama-cpp-python's native library (docs/architecture.md#inference-engines).

Importing ``llama_cpp`` loads llama.cpp and libgomp (~0.3 s): only code that
runs a model, or builds a grammar for one, goes through :func:`llama_cpp`,
and a consumer that never does pays nothing.
"""

from __future__ import annotations

import os
from types import ModuleType

# llama.cpp's threads meet at OpenMP barriers, where libgomp spins ~300,000
# rounds before it sleeps. When another process or the node's own loop holds
# a core, the spinning thread burns the time slice its partner needs: two
# threads on a busy two-core machine generated 3x slower. A short spin keeps
# an idle machine's speed (docs/architecture.md#inference-engines, measured).
# libgomp reads it once, when llama_cpp first loads it (so here, before any
# import of it); an operator's own value wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def llama_cpp() -> ModuleType:
    """llama-cpp-python's low-level module, loaded on first use."""
    import llama_cpp as module

    return module
