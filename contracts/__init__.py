"""Solidity sources (``src/``) and their committed build (``artifacts/``, ABI + bytecode).

Running p2pnode needs only the artifacts; ``npm run compile --prefix
contracts`` rebuilds them, and ``./dev test`` checks that they match the
sources (``node contracts/compile.js --check``).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def artifact(name: str) -> dict[str, Any]:
    """The compiled contract ``name`` ("Marketplace", "ComputeToken"): abi, bytecode, compiler."""
    text = resources.files(__name__).joinpath("artifacts", f"{name}.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data
