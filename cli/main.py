"""The ``p2pnode`` command: the click app (``cli/app.py``) with every command module on it.

The command modules register their commands on ``app.main`` when imported.
"""

from __future__ import annotations

from p2pnode.cli import chain_cmd, demo, keys_cmd, node_cmd, sim_cmd  # noqa: F401 - they register
from p2pnode.cli.app import main

__all__ = ["main"]
