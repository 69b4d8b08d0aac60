"""Where options come from: flag > ``P2PNODE_*`` environment > config.toml > default.

click already resolves a parameter from the command line, then its envvar, then
``ctx.default_map``, then its default: exactly our precedence. This module
fills ``default_map`` from ``$P2PNODE_HOME/config.toml`` and gives every option
its ``P2PNODE_<NAME>`` variable. It is the only place that reads TOML or the
environment (nothing else does: docs/architecture.md#conventions).

It also checks, as ssh does with its own files, that nobody else can change
what the node reads (the home directory, config.toml) or read its secrets
(keys, the wallet, password files): see :func:`check_home` and
:func:`read_secret_file`.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from p2pnode.errors import ConfigError

ENV_PREFIX = "P2PNODE_"
CONFIG_FILE = "config.toml"

CONFIG_TEMPLATE = """\
# p2pnode configuration. Every key is also a command-line flag (--key-name) and
# an environment variable (P2PNODE_KEY_NAME); flags win over variables, and
# variables over this file.

# Where to listen (multiaddrs). Port 0 picks a free port.
# listen = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/tcp/4002/ws"]

# Peers to join the network through (full multiaddrs with /p2p/<peer id>).
# bootstrap = []
"""


# The files in the home directory that only their owner may read (the names
# p2p/identity.py gives them).
HOME_SECRETS = ("peer.key", "wallet.json", "api_key")


def default_home() -> Path:
    return Path.home() / ".p2pnode"


def check_home(home: Path) -> None:
    """Refuse a home that another user could change, or whose secrets they could read.

    The home directory and config.toml must be ours (or root's) and not
    writable by group or others; the key, wallet and API key files must be
    ours and accessible to nobody else. A missing home or file is fine (it
    is created safely later). Raises ConfigError naming the file and the
    command that fixes it.
    """
    try:
        info = home.stat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot read {home}: {exc.strerror}") from exc
    _check_mode(home, info, private=False)
    for name, private in ((CONFIG_FILE, False), *((n, True) for n in HOME_SECRETS)):
        path = home / name
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        _check_mode(path, info, private=private)


def read_secret_file(path: Path) -> str:
    """The text of a file holding a secret (a passphrase, an API key).

    Refused, with the command that fixes it, if the file is not ours (or
    root's) or if group or others may access it. The check is made on the
    opened file, so the file cannot be swapped between check and read.
    """
    try:
        with path.open("rb") as f:
            _check_mode(path, os.fstat(f.fileno()), private=True)
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return data.decode(errors="replace")


def write_config_template(home: Path) -> None:
    """Create ``home/config.toml`` from the template (mode 0600) unless it exists."""
    path = home / CONFIG_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w") as f:
        f.write(CONFIG_TEMPLATE)


def _check_mode(path: Path, info: os.stat_result, *, private: bool) -> None:
    """Raise ConfigError if ``path`` (whose stat is ``info``) is unsafe (ssh's StrictModes)."""
    me = os.geteuid()
    quoted = shlex.quote(str(path))
    if info.st_uid not in (me, 0):
        raise ConfigError(
            f"{path} is owned by another user (uid {info.st_uid}); "
            f"run: chown {me} {quoted}, or use a home of your own"
        )
    mode = info.st_mode
    if private and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path} is accessible by other users (mode {stat.filemode(mode)}); "
            f"run: chmod 600 {quoted}"
        )
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{path} is writable by other users (mode {stat.filemode(mode)}); "
            f"run: chmod go-w {quoted}"
        )


def option(*decls: str, **kwargs: Any) -> Callable[[Any], Any]:
    """A click option that can also come from ``P2PNODE_<NAME>`` and config.toml."""
    name = next(d for d in decls if d.startswith("--")).removeprefix("--")
    kwargs.setdefault("envvar", ENV_PREFIX + name.replace("-", "_").upper())
    kwargs.setdefault("show_envvar", True)
    return click.option(*decls, **kwargs)


def load_config(home: Path) -> dict[str, Any]:
    """The flat key/value table of ``home/config.toml`` ({} if there is none)."""
    path = home / CONFIG_FILE
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return {key.replace("-", "_"): value for key, value in data.items()}


def default_map_for(group: click.Group, config: dict[str, Any], path: Path) -> dict[str, Any]:
    """click's nested ``default_map``: each command gets the keys it has options for.

    A key that no command knows is an error, so a typo in config.toml is not
    silently ignored.
    """
    known: set[str] = set()

    def walk(cmd: click.Command) -> dict[str, Any]:
        if isinstance(cmd, click.Group):
            return {name: walk(sub) for name, sub in cmd.commands.items()}
        names = {p.name for p in cmd.params if isinstance(p, click.Option) and p.name}
        known.update(names)
        return {k: v for k, v in config.items() if k in names}

    result = walk(group)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s): {', '.join(unknown)}")
    return result


def wallet_password(password_file: Path | None, *, confirm: bool, interactive: bool) -> str | None:
    """The wallet passphrase from a file, ``P2PNODE_WALLET_PASSWORD`` or a prompt.

    Returns None when there is no source and prompting is not allowed (or no
    terminal is attached). Raises ConfigError for a file another user owns or
    may read (see :func:`read_secret_file`).
    """
    if password_file is not None:
        return read_secret_file(password_file).rstrip("\r\n")
    from_env = os.environ.get(ENV_PREFIX + "WALLET_PASSWORD")
    if from_env:
        return from_env
    if interactive and sys.stdin.isatty():
        text: str = click.prompt("Wallet passphrase", hide_input=True, confirmation_prompt=confirm)
        return text
    return None
