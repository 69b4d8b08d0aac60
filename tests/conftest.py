"""Fixtures every test package may use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from p2pnode.inference.llamacpp import bundled_model_path
from p2pnode.simnet.cheaters import degraded_copy

if TYPE_CHECKING:
    from p2pnode.chain.embedded import Embedded


@pytest.fixture(scope="session")
def degraded_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled GGUF degraded to Q4_0 weights (a cheaper quant): written once
    per test process (~12 s), for the tests of audits."""
    return degraded_copy(bundled_model_path(), tmp_path_factory.mktemp("cheap") / "q4_0.gguf")


@pytest.fixture(scope="module")
def embedded() -> Embedded:
    """An in-process chain with the contracts deployed, one per test module."""
    from p2pnode.chain.embedded import open_embedded  # web3: only the tests that use it

    return open_embedded()


@pytest.fixture
def net(embedded: Embedded) -> Iterator[Embedded]:
    """The module's chain as each test finds it: what a test did is undone after it."""
    snapshot = embedded.tester.take_snapshot()
    yield embedded
    embedded.tester.revert_to_snapshot(snapshot)
