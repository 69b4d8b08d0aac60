"""Pure modules stay pure, every package stays on its side of the layering, and the docs
cite only what exists."""

from __future__ import annotations

import ast
import os
import re
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
    ROOT / "protocols" / "session" / "admission.py",
    ROOT / "protocols" / "refusal.py",
    ROOT / "p2p" / "pricing.py",
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


# --- no cycles, no reaching into another module's privates -----------------------

CODE_DIRS = ("p2p", "protocols", "inference", "chain", "cli", "simnet")


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("p2pnode", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def _code_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py"))


def test_no_import_cycle() -> None:
    """Every import counts, ``TYPE_CHECKING`` ones too: a cycle hidden there is a cycle."""
    modules = {_module_of(p): p for p in _code_files()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    # Packages' __init__ import their own modules; only module-to-module edges count.
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def _defined_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def test_no_module_calls_another_modules_underscore_names() -> None:
    """A ``_name`` is its file's business: no other file of ours (tests included)
    calls it. Library internals we override keep the library's names."""
    files = [*_code_files(), *sorted((ROOT / "tests").rglob("*.py"))]
    trees = {p: ast.parse(p.read_text(), str(p)) for p in files}
    ours: dict[str, set[Path]] = {}
    for path, tree in trees.items():
        for name in _defined_names(tree):
            if name.startswith("_") and not name.startswith("__"):
                ours.setdefault(name, set()).add(path)
    bad = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name, owner = node.func.attr, node.func.value
            if not name.startswith("_") or name.startswith("__"):
                continue
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and ast.unparse(owner.func) == "super":
                continue
            homes = ours.get(name, set())
            if homes and path not in homes:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node.func)}")
    assert not bad, "\n".join(bad)


# --- the project's own docs ----------------------------------------------------

SKIP_DIRS = {
    ".git",
    ".mutation",  # ./dev mutation's scratch copy of the checkout
    ".venv",
    "node_modules",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".hypothesis",
    "build",
    "dist",
}
# Design notes that lived beside the repository once. What the code relies on
# is in docs/ now; a citation of those notes points at nothing a reader has.
# Split so that this pattern is not itself a citation (docs/ holds what it did).
OUTSIDE_NOTES = re.compile(r"ARCHITECTURE|LIBP2P" r"_NOTES|shared/|\bSTYLE\b")
# "trap 5" alone names a numbered list nobody here has: a trap is cited by its
# heading in docs/libp2p-traps.md.
TRAP_NUMBER = re.compile(r"\btraps? \d", re.IGNORECASE)
DOCS_LINK = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")
# Links between the docs themselves: ``(protocols.md#framing)`` or ``(#framing)``.
RELATIVE_LINK = re.compile(r"\]\(([\w-]+\.md)?#([\w-]+)\)")
# Our code as the docs name it: `p2p/consumer.py`, `p2p/consumer.py:Consumer._open`.
CODE_NAME = re.compile(
    r"`((?:p2p|protocols|inference|chain|cli|simnet|contracts|tests|docs)/[\w./-]+"
    r"|errors\.py|scopes\.py|pyproject\.toml|README\.md|dev)(?::([\w.]+))?`"
)


def _project_files() -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        found += [Path(folder) / name for name in sorted(files)]
    return found


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        return None


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    anchors: set[str] = set()
    fenced = False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = re.match(r"#{1,6} (.+)", line)
        if heading and not fenced:
            slug = base = _slug(heading.group(1))
            n = 0
            while slug in anchors:  # GitHub numbers repeated headings
                n += 1
                slug = f"{base}-{n}"
            anchors.add(slug)
    return anchors


def _doc_links() -> list[tuple[str, str, str | None]]:
    """(where, docs file, anchor or None) for every link into docs/ in the tree."""
    links = []
    for path in _project_files():
        text = _text(path)
        if text is None:
            continue
        where = str(path.relative_to(ROOT))
        links += [(where, m.group(1), m.group(2)) for m in DOCS_LINK.finditer(text)]
        if path.parent == ROOT / "docs":
            for m in RELATIVE_LINK.finditer(text):
                links.append((where, m.group(1) or path.name, m.group(2)))
    return links


def test_no_file_cites_notes_outside_the_repository() -> None:
    bad = []
    for path in _project_files():
        text = _text(path)
        if text is None or path == Path(__file__).resolve():  # this file names the patterns
            continue
        for number, line in enumerate(text.splitlines(), 1):
            unlinked_trap = TRAP_NUMBER.search(line) and "docs/libp2p-traps.md#" not in line
            if OUTSIDE_NOTES.search(line) or unlinked_trap:
                bad.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bad, "cite docs/ instead:\n" + "\n".join(bad)


def test_every_docs_link_points_at_a_heading() -> None:
    links = _doc_links()
    assert len(links) >= 20  # the code and the README cite the docs
    bad = []
    for where, name, anchor in links:
        doc = ROOT / "docs" / name
        if not doc.is_file():
            bad.append(f"{where}: docs/{name} does not exist")
        elif anchor is not None and anchor not in _anchors(doc):
            bad.append(f"{where}: docs/{name} has no heading #{anchor}")
    assert not bad, "\n".join(bad)


def _defines(path: Path, qualname: str) -> bool:
    """Whether ``path`` defines ``qualname`` (``Class.method``, ``function``, ``CONSTANT``)."""
    if path.suffix != ".py":
        return qualname.split(".")[-1] in path.read_text()
    scope: list[ast.stmt] = ast.parse(path.read_text(), str(path)).body
    owner: ast.AST | None = None
    for name in qualname.split("."):
        found: ast.AST | None = None
        for node in scope:
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                if node.name == name:
                    found = node
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    found = node
        if found is None and isinstance(owner, ast.ClassDef):
            # An attribute its methods set: ``self.name = ...``.
            found = next(
                (
                    n
                    for n in ast.walk(owner)
                    if isinstance(n, ast.Attribute)
                    and isinstance(n.ctx, ast.Store)
                    and isinstance(n.value, ast.Name)
                    and n.value.id == "self"
                    and n.attr == name
                ),
                None,
            )
        if found is None:
            return False
        owner = found
        scope = getattr(found, "body", [])
    return True


def test_every_code_name_in_docs_exists() -> None:
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert docs
    bad = []
    for doc in docs:
        for m in CODE_NAME.finditer(doc.read_text()):
            path, name = ROOT / m.group(1), m.group(2)
            if not path.exists():
                bad.append(f"{doc.name}: {m.group(1)} does not exist")
            elif name is not None and not _defines(path, name):
                bad.append(f"{doc.name}: {m.group(1)} defines no {name}")
    assert not bad, "\n".join(bad)


# The claims table: ``tests/p2p/test_failover.py::test_x; ::test_y`` (a later ``::name``
# in the same cell names another test of the file before it).
CLAIM_CELL = re.compile(r"\| ([^|]*tests/[^|]*) \|$", re.MULTILINE)
TEST_REF = re.compile(r"(tests/[\w/]+\.py)?::(\w+)|(tests/[\w/]+(?:\.py)?)")


def test_every_test_the_claims_table_names_exists() -> None:
    table = (ROOT / "docs" / "claims.md").read_text()
    cells = CLAIM_CELL.findall(table)
    assert len(cells) >= 70
    bad, named = [], 0
    for cell in cells:
        current: str | None = None
        for m in TEST_REF.finditer(cell):
            file, test, alone = m.group(1), m.group(2), m.group(3)
            if alone is not None:  # a whole file or folder
                current = alone if alone.endswith(".py") else None
                if not (ROOT / alone).exists():
                    bad.append(f"{alone} does not exist")
                continue
            current = file or current
            if current is None:
                bad.append(f"::{test} names no file")
                continue
            named += 1
            source = (ROOT / current).read_text() if (ROOT / current).exists() else ""
            if not re.search(rf"^(?:async )?def {test}\(|^{test} = ", source, re.MULTILINE):
                bad.append(f"{current}::{test} does not exist")
    assert named >= 100
    assert not bad, "\n".join(bad)
