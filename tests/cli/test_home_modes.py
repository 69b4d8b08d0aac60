"""The home directory and secret files: refused when another user could change or read them.

As ssh does with ~/.ssh: one line naming the file and the command that fixes
it, exit status 2, and nothing read from the file. The command runs in this
process (click's runner), its umask set as a user's shell would.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import Result

from p2pnode.cli import settings
from p2pnode.p2p import identity
from p2pnode.tests.cli.helpers import invoke

NOBODY = 65534  # another user's uid; only root can give a file to it

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")


def _run(home: Path, *args: str, umask: int = 0o022, **extra: str) -> Result:
    return invoke(home, *args, umask=umask, **extra)


def _refused(result: Result, line: str) -> None:
    assert result.exit_code == 2, result.stderr
    assert result.stderr.splitlines() == [f"p2pnode: error: {line}"]


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    return home


def test_a_home_others_can_write_is_refused(tmp_path: Path) -> None:
    home = _home(tmp_path)
    home.chmod(0o777)
    _refused(
        _run(home, "id"),
        f"{home} is writable by other users (mode drwxrwxrwx); run: chmod go-w {home}",
    )


def test_a_config_file_others_can_write_is_refused_before_it_is_read(tmp_path: Path) -> None:
    home = _home(tmp_path)
    config = home / "config.toml"
    config.write_text('listen = ["/ip4/0.0.0.0/tcp/4001"]\n')
    config.chmod(0o666)
    _refused(
        _run(home, "id"),
        f"{config} is writable by other users (mode -rw-rw-rw-); run: chmod go-w {config}",
    )
    config.chmod(0o644)  # readable by others is fine: it holds no secret
    assert "no identity" in _run(home, "id").stderr


def test_a_password_file_others_can_read_is_refused(tmp_path: Path) -> None:
    home = _home(tmp_path)
    password = tmp_path / "password"
    password.write_text("pass phrase\n")
    password.chmod(0o644)
    result = _run(home, "init", "--wallet-password-file", str(password))
    _refused(
        result,
        f"{password} is accessible by other users (mode -rw-r--r--); run: chmod 600 {password}",
    )
    assert not (home / identity.WALLET_FILE).exists()


def test_an_upstream_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "upstream.key"
    key.write_text("sk-upstream\n")
    key.chmod(0o640)
    result = _run(
        _home(tmp_path),
        "generate",
        "--prompt",
        "x",
        "--upstream-url",
        "http://127.0.0.1:9/v1",
        "--upstream-model",
        "m",
        "--upstream-key-file",
        str(key),
    )
    _refused(result, f"{key} is accessible by other users (mode -rw-r-----); run: chmod 600 {key}")


@as_root
def test_a_peer_key_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    home = _home(tmp_path)
    identity.load_or_create_peer_key(home)
    key = home / identity.PEER_KEY_FILE
    os.chown(key, NOBODY, NOBODY)
    _refused(
        _run(home, "id"),
        f"{key} is owned by another user (uid {NOBODY}); "
        f"run: chown {os.geteuid()} {key}, or use a home of your own",
    )


@as_root
def test_a_home_or_password_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    home = _home(tmp_path)
    password = tmp_path / "password"
    password.write_text("pass phrase\n")
    password.chmod(0o600)
    os.chown(password, NOBODY, NOBODY)
    result = _run(home, "init", "--wallet-password-file", str(password))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"p2pnode: error: {password} is owned by another user")
    os.chown(home, NOBODY, NOBODY)
    result = _run(home, "id")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"p2pnode: error: {home} is owned by another user")


def test_files_init_creates_are_safe_whatever_the_umask(tmp_path: Path) -> None:
    home = tmp_path / "fresh"
    result = _run(home, "init", umask=0, P2PNODE_WALLET_PASSWORD="pass phrase")
    assert result.exit_code == 0, result.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in [home, *home.iterdir()]}
    assert modes == {
        "fresh": 0o700,
        "config.toml": 0o600,
        identity.PEER_KEY_FILE: 0o600,
        identity.WALLET_FILE: 0o600,
    }
    assert _run(home, "id").exit_code == 0


def test_the_home_secrets_are_the_files_identity_writes() -> None:
    assert settings.HOME_SECRETS == (
        identity.PEER_KEY_FILE,
        identity.WALLET_FILE,
        identity.API_KEY_FILE,
    )
