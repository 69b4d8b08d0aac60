"""Keys for a team: more API keys than the owner's, each with its own limits and usage.

See docs/architecture.md#team-keys. ``p2pnode keys add NAME`` writes a key's
SHA-256 (never the key) with its limits to ``$P2PNODE_HOME/keys.json``;
``keys revoke NAME`` marks it revoked there. The shim reads the file again
whenever it changes (one ``stat`` a request), so a new key works and a revoked
one is refused from the next request on, without a restart.

Each request a key makes is accounted to it: requests, prompt and completion
tokens, and spend, which is its answers' seconds at their providers' prices
per second (a session's own overhead, such as its idle seconds, is the
node's). A key over its spend limit is refused with 429 ``insufficient_quota``,
one over its rate (requests a minute) with 429 ``rate_limit_exceeded``. The
node writes the usage to ``$P2PNODE_HOME/key_usage.json`` after each request,
so limits hold across restarts and ``p2pnode keys list`` reads it without
asking the node.
"""

from __future__ import annotations

import collections
import contextvars
import hashlib
import json
import logging
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from p2pnode.errors import ConfigError

logger = logging.getLogger(__name__)

KEYS_FILE: Final = "keys.json"
USAGE_FILE: Final = "key_usage.json"
# Keys are the operator's to make; the bound keeps the file, the per-key
# metrics and the dashboard's table small all the same.
MAX_KEYS: Final = 100
NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
PREFIX: Final = "sk-p2pnode-"
WINDOW_S: Final = 60.0  # a rate limit counts requests in the last minute


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    sha256: str  # of the key's text: the key itself is shown once and not kept
    spend_limit: int | None = None  # in the token's smallest unit
    rate_limit: int | None = None  # requests a minute
    revoked: bool = False
    created: int = 0  # unix time


@dataclass(slots=True)
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    spent_wei: int = 0  # in the token's smallest unit


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a key may not make a request now (the shim answers it as an API error)."""

    status: int
    code: str
    message: str


def digest(key: str) -> str:
    return hashlib.sha256(key.strip().encode()).hexdigest()


# --- the files, as the CLI writes them ---------------------------------------------


def read_keys(home: Path) -> list[Key]:
    """The keys in ``home``'s keys file (none if there is no file)."""
    path = home / KEYS_FILE
    try:
        data = json.loads(path.read_text())
        return [Key(**entry) for entry in data["keys"]][:MAX_KEYS]
    except FileNotFoundError:
        return []
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{path} is not a keys file p2pnode wrote: {exc}") from exc


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out)
    os.replace(tmp, path)


def add_key(home: Path, name: str, spend_limit: int | None, rate_limit: int | None) -> str:
    """Make a key named ``name``; returns its text (shown once: only its digest is kept)."""
    if not NAME.fullmatch(name):
        raise ConfigError(f"a key's name is 1-32 letters, digits, '.', '_' or '-' (got {name!r})")
    if rate_limit is not None and rate_limit < 1:
        raise ConfigError("--rate-limit is at least 1 request a minute")
    if spend_limit is not None and spend_limit < 0:
        raise ConfigError("--spend-limit cannot be negative")
    keys = read_keys(home)
    if any(k.name == name for k in keys):
        raise ConfigError(f"there is a key named {name!r} already (revoke it, or pick another)")
    if len(keys) >= MAX_KEYS:
        raise ConfigError(f"{MAX_KEYS} keys is the most a node keeps")
    text = PREFIX + secrets.token_urlsafe(32)
    keys.append(Key(name, digest(text), spend_limit, rate_limit, created=int(time.time())))
    _write(home / KEYS_FILE, {"keys": [asdict(k) for k in keys]})
    return text


def revoke_key(home: Path, name: str) -> None:
    keys = read_keys(home)
    if not any(k.name == name for k in keys):
        raise ConfigError(f"no key named {name!r}")
    keys = [Key(**(asdict(k) | {"revoked": True})) if k.name == name else k for k in keys]
    _write(home / KEYS_FILE, {"keys": [asdict(k) for k in keys]})


def read_usage(home: Path) -> dict[str, Usage]:
    """What each key used, as the node last wrote it."""
    try:
        data = json.loads((home / USAGE_FILE).read_text())
        return {name: Usage(**u) for name, u in data.items()}
    except FileNotFoundError:
        return {}
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{home / USAGE_FILE} is not a usage file p2pnode wrote: {exc}") from exc


# --- the shim's side ----------------------------------------------------------------


@dataclass
class KeyRing:
    """The team's keys as the shim checks them, and what each has used.

    ``home`` None: no team keys (only the owner's key opens the shim).
    """

    home: Path | None
    _seen: tuple[int, int, int] | None = None
    _keys: dict[str, Key] = field(default_factory=dict)  # by digest
    usage: dict[str, Usage] = field(default_factory=dict)  # by name
    _recent: dict[str, collections.deque[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.home is not None:
            self.usage = read_usage(self.home)

    def keys(self) -> list[Key]:
        self._refresh()
        return list(self._keys.values())

    def _refresh(self) -> None:
        """Read the keys file again if it changed since the last request."""
        if self.home is None:
            return
        try:
            st = (self.home / KEYS_FILE).stat()
        except FileNotFoundError:
            self._seen, self._keys = None, {}
            return
        seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        if seen == self._seen:
            return
        try:
            self._keys = {k.sha256: k for k in read_keys(self.home)}
        except ConfigError as exc:
            # A file being edited by hand, or broken: no team key is let in
            # until it reads again (the owner's key still works).
            logger.warning("team keys not read: %s", exc)
            self._keys = {}
        self._seen = seen

    def admit(self, token: str, now: float) -> Key | Refusal:
        """The key ``token`` is, if it may make a request now (and counts the request)."""
        self._refresh()
        key = self._keys.get(digest(token))
        if key is None:
            return Refusal(401, "invalid_api_key", "Incorrect API key provided")
        if key.revoked:
            return Refusal(401, "invalid_api_key", f"the key {key.name!r} was revoked")
        used = self.usage.setdefault(key.name, Usage())
        if key.spend_limit is not None and used.spent_wei >= key.spend_limit:
            return Refusal(
                429, "insufficient_quota", f"the key {key.name!r} has reached its spend limit"
            )
        if key.rate_limit is not None:
            recent = self._recent.setdefault(key.name, collections.deque())
            while recent and recent[0] <= now - WINDOW_S:
                recent.popleft()
            if len(recent) >= key.rate_limit:
                return Refusal(
                    429,
                    "rate_limit_exceeded",
                    f"the key {key.name!r} may make {key.rate_limit} requests a minute",
                )
            recent.append(now)
        return key

    def begin(self, name: str) -> Account:
        """A request of the key ``name`` was let in: counted, and its account to charge."""
        self.usage.setdefault(name, Usage()).requests += 1
        self._save()
        return Account(self, name)

    def charge(self, name: str, prompt_tokens: int, completion_tokens: int, spent_wei: int) -> None:
        """What a key's request used, once its answer ended."""
        used = self.usage.setdefault(name, Usage())
        used.prompt_tokens += prompt_tokens
        used.completion_tokens += completion_tokens
        used.spent_wei += spent_wei
        self._save()

    def _save(self) -> None:
        if self.home is None:
            return
        try:
            _write(self.home / USAGE_FILE, {n: asdict(u) for n, u in self.usage.items()})
        except OSError as exc:  # a full disk costs the record, not the request
            logger.warning("key usage not saved: %s", exc)

    def listing(self) -> list[dict[str, Any]]:
        """Every key with its limits and usage (JSON: the dashboard, ``keys list``)."""
        return listing(self.keys(), self.usage)


@dataclass(frozen=True, slots=True)
class Account:
    """Where a request's use is charged: a team key of a ring."""

    ring: KeyRing
    name: str

    def charge(self, prompt_tokens: int, completion_tokens: int, spent_wei: int) -> None:
        self.ring.charge(self.name, prompt_tokens, completion_tokens, spent_wei)


# The account of the request being handled (None: the owner's key or the
# dashboard): set by the shim's guard, charged where the request's answer ends.
CURRENT: contextvars.ContextVar[Account | None] = contextvars.ContextVar("team_key", default=None)


def listing(keys: list[Key], usage: dict[str, Usage]) -> list[dict[str, Any]]:
    return [
        {
            "name": k.name,
            "revoked": k.revoked,
            "spend_limit": k.spend_limit,
            "rate_limit": k.rate_limit,
            "created": k.created,
            **asdict(usage.get(k.name, Usage())),
        }
        for k in keys
    ]
