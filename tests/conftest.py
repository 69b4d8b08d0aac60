"""Fixtures every test package may use."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pnode.inference.llamacpp import bundled_model_path
from p2pnode.simnet.cheaters import degraded_copy


@pytest.fixture(scope="session")
def degraded_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled GGUF degraded to Q4_0 weights (a cheaper quant): written once
    per test process (~12 s), for the tests of audits."""
    return degraded_copy(bundled_model_path(), tmp_path_factory.mktemp("cheap") / "q4_0.gguf")
