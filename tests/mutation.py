"""Mutation testing of the code where a silent bug costs most (``./dev mutation``).

Not part of the test command: it takes minutes per group. mutmut changes the
code one small edit at a time (a ``<`` for a ``<=``, a constant, a dropped
argument) and runs the tests that reach the changed function; a mutant the
tests do not notice "survived". The score per file is the share killed.

mutmut needs the package to import under its own name from the folder it
copies, and this checkout *is* the package (docs/architecture.md#one-package-namespace),
so the run happens in a scratch folder, ``.mutation/GROUPS/``, holding a copy
of the checkout as ``p2pnode/``. A mutant that cannot be told apart from the
original by any user is marked ``# pragma: no mutate`` with the reason.

Usage: ./dev mutation [GROUP ...] [--children N]   (groups: see GROUPS; default all)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / ".mutation"

# group: (files to mutate, the fast tests that guard them)
GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "wire": (("protocols/wire.py",), ("tests/protocols",)),
    "machines": (
        (
            "protocols/session/machine.py",
            "protocols/infer/machine.py",
            "protocols/infer/replay.py",
        ),
        ("tests/protocols",),
    ),
    "crypto": (("protocols/session/crypto.py",), ("tests/protocols",)),
    "offers": (("protocols/offers/book.py",), ("tests/protocols/test_offer_book.py",)),
    "admission": (
        ("protocols/session/admission.py",),
        ("tests/protocols/test_admission.py",),
    ),
    "pricing": (
        ("p2p/pricing.py", "inference/stops.py"),
        (
            "tests/p2p/test_pricing.py",
            "tests/p2p/test_sessions.py",
            "tests/inference/test_stops.py",
        ),
    ),
    "failover": (
        ("p2p/consumer.py",),
        # The fast tests (nodes on the memory transport, trio's clock): the
        # end-to-end ones take minutes a mutant; what only they reach (paid
        # opens, audits with the real model) is reported as "no tests".
        ("tests/p2p",),
    ),
    "market": (
        (
            "p2p/market/stakes.py",
            "p2p/market/billing.py",
            "p2p/market/ledger.py",
            "p2p/market/config.py",
        ),
        # The fast tests alone: the paid flows end to end (tests/e2e/test_paid_*.py)
        # take minutes a mutant, and every decision they reach is tested here.
        ("tests/p2p/test_market.py",),
    ),
}

# mutmut runs a mutant's tests with -x in no particular order: fastest first,
# a mutant is killed by its first failing test without waiting for the slow
# ones (the durations are those mutmut measured in its first, clean run).
_ORDER_PLUGIN = "mutation_order"
_FASTEST_FIRST = """\
import json
from pathlib import Path

_STATS = Path(__file__).resolve().parents[2] / "mutmut-stats.json"


def pytest_collection_modifyitems(session, config, items):
    if not _STATS.exists():
        return
    took = json.loads(_STATS.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: took.get(item.nodeid, 0.0))
"""

_MODULE = re.compile(r"^\s*(?P<module>[\w.]+?)\.x(?:ǁ|_).*: (?P<status>[\w ]+)$")


def _copy_checkout(target: Path) -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        source = ROOT / name.decode()
        if not source.is_file():
            continue  # deleted in the work tree
        dest = target / name.decode()
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)


def _config(files: list[str], tests: list[str]) -> str:
    def toml_list(items: list[str]) -> str:
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    return (
        "[tool.mutmut]\n"
        'source_paths = ["p2pnode"]\n'
        f"only_mutate = {toml_list(['p2pnode/' + f for f in files])}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(['p2pnode/' + t for t in tests])}\n"
        # -n 0: in this process, not xdist's workers (mutmut counts which tests
        # reach which function here).
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-n", "0", '
        f'"-p", "p2pnode.tests.{_ORDER_PLUGIN}"]\n'
        # A mutant mypy refuses (a None where an int must be) is caught as
        # ./dev test would catch it, without running a test: about a third.
        f"type_check_command = {toml_list(_mypy(files))}\n"
    )


def _mypy(files: list[str]) -> list[str]:
    # "-m", "mypy": mutmut reads mypy's JSON only when "mypy" is a word of the
    # command. Its trampolines carry ignores that are unused where nothing was
    # mutated: not an error of any mutant.
    config = str(ROOT / "pyproject.toml")
    flags = ["--config-file", config, "--output", "json", "--no-warn-unused-ignores"]
    return [sys.executable, "-m", "mypy", *flags, *("p2pnode/" + f for f in files)]


def main() -> int:
    parser = argparse.ArgumentParser(prog="./dev mutation")
    parser.add_argument("groups", nargs="*", metavar="GROUP", help=", ".join(GROUPS))
    parser.add_argument("--children", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if unknown := set(args.groups) - set(GROUPS):
        parser.error(
            f"unknown group(s) {', '.join(sorted(unknown))}; choose from {', '.join(GROUPS)}"
        )
    groups = args.groups or list(GROUPS)
    files = sorted({f for g in groups for f in GROUPS[g][0]})
    tests = sorted({t for g in groups for t in GROUPS[g][1]})

    # One scratch folder per run's groups: running the market group does not
    # wipe the failover group's results, and two groups can run side by side.
    scratch = SCRATCH / "+".join(groups)
    shutil.rmtree(scratch, ignore_errors=True)
    _copy_checkout(scratch / "p2pnode")
    (scratch / "p2pnode" / "tests" / f"{_ORDER_PLUGIN}.py").write_text(_FASTEST_FIRST)
    (scratch / "pyproject.toml").write_text(_config(files, tests))
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    log = scratch / "mutmut.log"
    print(f"mutation: {', '.join(groups)}: {len(files)} files; progress in {log}", flush=True)
    with log.open("w") as out:
        subprocess.run(
            [mutmut, "run", "--max-children", str(args.children)],
            cwd=scratch,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    results = subprocess.run(
        [mutmut, "results", "--all", "true"],
        cwd=scratch,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return _report(results, files, scratch)


def _report(results: str, files: list[str], scratch: Path) -> int:
    by_file: dict[str, Counter[str]] = {f: Counter() for f in files}
    survivors: list[str] = []
    for line in results.splitlines():
        match = _MODULE.match(line)
        if match is None:
            continue
        module, status = match["module"], match["status"].strip()
        # mypy refusing a mutant is ./dev test failing on it: as good as a test.
        status = "killed" if status == "caught by type check" else status
        path = module.removeprefix("p2pnode.").replace(".", "/") + ".py"
        by_file.setdefault(path, Counter())[status] += 1
        if status != "killed":
            survivors.append(line.strip())
    print(f"\n{'file':40} {'mutants':>8} {'killed':>7} {'score':>6}  not killed")
    for path, counts in by_file.items():
        total = sum(counts.values())
        killed = counts["killed"]
        rest = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s != "killed")
        score = f"{100 * killed / total:.0f}%" if total else "-"
        print(f"{path:40} {total:>8} {killed:>7} {score:>6}  {rest}")
    listing = scratch / "survivors.txt"
    listing.write_text("\n".join(survivors) + "\n")
    print(f"\nnot killed: {len(survivors)} (listed in {listing}; see one with")
    print(f"  (cd {scratch.relative_to(ROOT)} && {ROOT}/.venv/bin/mutmut show NAME))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
