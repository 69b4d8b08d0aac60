"""Where options come from: flag > ``P2PNODE_*`` environment > config.toml > default.

click already resolves a parameter from the command line, then its envvar, then
``ctx.default_map``, then its default: exactly our precedence. This module
fills ``default_map`` from ``$P2PNODE_HOME/config.toml`` and gives every option
its ``P2PNODE_<NAME>`` variable. It is the only place that reads TOML or the
environment (STYLE: nothing else does).
"""

from __future__ import annotations

import os
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


def default_home() -> Path:
    return Path.home() / ".p2pnode"


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
    terminal is attached).
    """
    if password_file is not None:
        try:
            return password_file.read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read {password_file}: {exc.strerror}") from exc
    from_env = os.environ.get(ENV_PREFIX + "WALLET_PASSWORD")
    if from_env:
        return from_env
    if interactive and sys.stdin.isatty():
        text: str = click.prompt("Wallet passphrase", hide_input=True, confirmation_prompt=confirm)
        return text
    return None
