"""Pure modules stay pure, and every package stays on its side of the layering."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_PURE = {"trio", "libp2p", "web3", "llama_cpp", "socket", "time", "asyncio"}
PURE = [
    ROOT / "protocols" / "wire.py",
    ROOT / "protocols" / "unary.py",
    ROOT / "protocols" / "framed.py",
    *sorted(ROOT.glob("protocols/offers/*.py")),
    ROOT / "protocols" / "session" / "crypto.py",
    ROOT / "protocols" / "infer" / "batching.py",
    *sorted(ROOT.glob("protocols/*/messages.py")),
    *sorted(ROOT.glob("protocols/*/machine.py")),
]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_modules_import_no_io(path: Path) -> None:
    bad = {n for n in _imports(path) if n.split(".")[0] in FORBIDDEN_IN_PURE}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_there_are_pure_modules_to_check() -> None:
    assert len(PURE) >= 9


@pytest.mark.parametrize(
    "package", ["protocols", "inference", "chain"], ids=lambda p: f"{p}-is-below-p2p"
)
def test_lower_packages_do_not_import_upper_ones(package: str) -> None:
    upper = {"p2pnode.p2p", "p2pnode.cli", "p2pnode.simnet"}
    for path in (ROOT / package).rglob("*.py"):
        bad = {n for n in _imports(path) if any(n.startswith(u) for u in upper)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
