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
import contextlib
import contextvars
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from p2pnode.errors import ConfigError, SpendLimitError

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
    """The keys in ``home``'s keys file (none if there is no file). Raises
    ConfigError for a file that is not one p2pnode wrote (hand-edited, cut short)."""
    path = home / KEYS_FILE
    try:
        data = json.loads(path.read_text())
        keys = [_key(entry) for entry in data["keys"]]
    except FileNotFoundError:
        return []
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a keys file p2pnode wrote: {exc}") from exc
    return keys[:MAX_KEYS]


def _key(entry: dict[str, Any]) -> Key:
    key = Key(**entry)
    limits_ok = all(
        v is None or (type(v) is int and v >= 0) for v in (key.spend_limit, key.rate_limit)
    )
    if not (
        isinstance(key.name, str)
        and NAME.fullmatch(key.name)
        and isinstance(key.sha256, str)
        and re.fullmatch(r"[0-9a-f]{64}", key.sha256)
        and limits_ok
        and type(key.revoked) is bool
        and type(key.created) is int
    ):
        raise ValueError(f"a malformed key entry {entry!r}")
    return key


def _write(path: Path, data: dict[str, Any], *, durable: bool = True) -> None:
    """``data`` as JSON at ``path`` (mode 0600), whole or not at all: a crash leaves
    the old file or the new one (``durable``: the new one on disk before it
    replaces the old, which costs an fsync)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")  # 0600, a new name
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One ``keys`` command at a time changes the keys file (two adds at once
    would each write the list they read, and lose the other's key)."""
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / (KEYS_FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_key(home: Path, name: str, spend_limit: int | None, rate_limit: int | None) -> str:
    """Make a key named ``name``; returns its text (shown once: only its digest is kept)."""
    if not NAME.fullmatch(name):
        raise ConfigError(f"a key's name is 1-32 letters, digits, '.', '_' or '-' (got {name!r})")
    if rate_limit is not None and rate_limit < 1:
        raise ConfigError("--rate-limit is at least 1 request a minute")
    if spend_limit is not None and spend_limit < 0:
        raise ConfigError("--spend-limit cannot be negative")
    with _locked(home):
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
    with _locked(home):
        keys = read_keys(home)
        if not any(k.name == name for k in keys):
            raise ConfigError(f"no key named {name!r}")
        keys = [Key(**(asdict(k) | {"revoked": True})) if k.name == name else k for k in keys]
        _write(home / KEYS_FILE, {"keys": [asdict(k) for k in keys]})


def read_usage(home: Path) -> dict[str, Usage]:
    """What each key used, as the node last wrote it. Raises ConfigError for a file
    that is not one p2pnode wrote."""
    path = home / USAGE_FILE
    try:
        data = json.loads(path.read_text())
        usage = {name: Usage(**u) for name, u in data.items()}
    except FileNotFoundError:
        return {}
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a usage file p2pnode wrote: {exc}") from exc
    for name, used in usage.items():
        counts = (used.requests, used.prompt_tokens, used.completion_tokens, used.spent_wei)
        if not all(type(n) is int and n >= 0 for n in counts):
            raise ConfigError(f"{path} is not a usage file p2pnode wrote: {name!r} {used}")
    return usage


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
    # What the key's answers streaming now have cost so far (estimated), by name.
    _held: collections.Counter[str] = field(default_factory=collections.Counter)

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
        if self.over_limit(key):
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
        return key

    def over_limit(self, key: Key) -> bool:
        """Whether the key has spent its limit, counting its answers streaming now."""
        spent = self.usage.get(key.name, Usage()).spent_wei + self._held[key.name]
        return key.spend_limit is not None and spent >= key.spend_limit

    def begin(self, key: Key, now: float) -> Account:
        """A request of ``key`` was let in (it holds a slot): counted, in its rate
        window, and its account to charge."""
        if key.rate_limit is not None:
            self._recent.setdefault(key.name, collections.deque()).append(now)
        # Written with its charge, when the answer ends: one write a request.
        self.usage.setdefault(key.name, Usage()).requests += 1
        return Account(self, key)

    def hold(self, name: str, wei: int) -> None:
        """``wei`` more (or less) spent by a key's answer still streaming."""
        self._held[name] += wei
        if self._held[name] <= 0:
            del self._held[name]

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
            # No fsync: this runs on the shim's request path, and a power cut
            # that loses the last answers' usage leaves a whole file all the same.
            _write(
                self.home / USAGE_FILE,
                {n: asdict(u) for n, u in self.usage.items()},
                durable=False,
            )
        except OSError as exc:  # a full disk costs the record, not the request
            logger.warning("key usage not saved: %s", exc)

    def listing(self) -> list[dict[str, Any]]:
        """Every key with its limits and usage (JSON: the dashboard, ``keys list``)."""
        return listing(self.keys(), self.usage)


@dataclass(frozen=True, slots=True)
class Account:
    """Where a request's use is charged: a team key of a ring."""

    ring: KeyRing
    key: Key

    def streaming(self, held: int, now_wei: int) -> int:
        """An answer that had cost ``held`` so far now costs ``now_wei``: held against
        the key's limit while it streams. Raises SpendLimitError once the key has
        spent its limit. Returns what is held now."""
        self.ring.hold(self.key.name, now_wei - held)
        if self.ring.over_limit(self.key):
            raise SpendLimitError(f"the key {self.key.name!r} has reached its spend limit")
        return now_wei

    def charge(self, held: int, prompt_tokens: int, completion_tokens: int, spent_wei: int) -> None:
        """An answer ended (or was cut short): what it used, instead of what it held."""
        self.ring.hold(self.key.name, -held)
        self.ring.charge(self.key.name, prompt_tokens, completion_tokens, spent_wei)


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
