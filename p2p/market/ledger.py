"""``sessions.db``: the paid sessions a node opened or served, kept across restarts."""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from p2pnode.errors import ConfigError

logger = logging.getLogger(__name__)

# The statements that write sessions.db, at module level: mutation testing
# mutates function bodies only, and changing an SQL keyword's case changes
# nothing (tests/mutation.py).
_OPENED = (
    "INSERT OR REPLACE INTO sessions (session_id, role, peer, bid_id, stake, ends_at,"
    " state, served, used_until, usage_signature)"
    " VALUES (?, ?, ?, ?, ?, ?, 'open', 0, 0, x'')"
)
_SERVED = "UPDATE sessions SET served=1 WHERE session_id=?"
_USAGE = "UPDATE sessions SET used_until=?, usage_signature=? WHERE session_id=?"
_CLOSED = "UPDATE sessions SET state='closed', paid=?, refunded=? WHERE session_id=?"
_RECEIPT = (
    "INSERT OR REPLACE INTO receipts (session_id, requests, prompt_tokens,"
    " completion_tokens, provider_signature, consumer_signature, signed)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_EVIDENCE = "INSERT INTO evidence VALUES (?, ?, ?, ?, ?, ?, ?)"
_OPEN_SESSIONS = (
    "SELECT session_id, peer, stake, ends_at, served, used_until, usage_signature"
    " FROM sessions WHERE role=? AND state='open'"
)
_RECENT = (
    "SELECT s.session_id, s.role, s.peer, s.stake, s.state, s.paid, s.refunded,"
    " r.requests, r.prompt_tokens, r.completion_tokens, length(r.provider_signature) > 0"
    " FROM sessions s LEFT JOIN receipts r ON r.session_id = s.session_id"
    " ORDER BY s.rowid DESC LIMIT ?"
)
_VERSION = "PRAGMA user_version"
_SCHEMA = """
    CREATE TABLE IF NOT EXISTS sessions (
        session_id BLOB PRIMARY KEY, role TEXT NOT NULL, peer TEXT NOT NULL,
        bid_id BLOB NOT NULL, stake TEXT NOT NULL, ends_at INTEGER NOT NULL,
        state TEXT NOT NULL, paid TEXT, refunded TEXT);
    CREATE TABLE IF NOT EXISTS receipts (
        session_id BLOB PRIMARY KEY, requests INTEGER, prompt_tokens INTEGER,
        completion_tokens INTEGER, provider_signature BLOB, consumer_signature BLOB);
    CREATE TABLE IF NOT EXISTS evidence (
        peer TEXT NOT NULL, session_id BLOB NOT NULL, at INTEGER NOT NULL,
        finding TEXT NOT NULL, signed_receipt BLOB NOT NULL,
        provider_signature BLOB NOT NULL, measured TEXT NOT NULL);
"""
# Version 2: each receipt's signed bytes.
_RECEIPTS_SIGNED = "ALTER TABLE receipts ADD COLUMN signed BLOB NOT NULL DEFAULT x''"
# Version 1: acknowledgements. Sessions opened under the old rules were closed
# at once, as served ones are now.
_SESSIONS_ACKNOWLEDGED = (
    "ALTER TABLE sessions ADD COLUMN served INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE sessions ADD COLUMN used_until INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE sessions ADD COLUMN usage_signature BLOB NOT NULL DEFAULT x''",
    "UPDATE sessions SET served = 1",
)


@dataclass(frozen=True, slots=True)
class LedgerSession:
    """A session ``sessions.db`` lists as open (not yet seen settled)."""

    session_id: bytes
    peer: str
    stake: int
    ends_at: int
    # Consumer: an answer in it was acknowledged (closing it early pays the seconds used).
    served: bool
    # Provider: the consumer's best acknowledgement (0 and b"": none).
    used_until: int
    usage_signature: bytes


class Ledger:
    """``sessions.db``: the sessions a node holds and the receipts it has (sqlite).

    Versioned with sqlite's ``user_version``: a database an older p2pnode wrote
    (version 0) gains the columns of version 1, and its sessions count as served
    (they were opened under the old rules, which closed every session at once);
    version 2 keeps each receipt's signed bytes (they carry the provider's
    commitment, which the counts alone cannot rebuild) and the evidence of
    failed audits. A database from a newer p2pnode is refused rather than misread.
    """

    VERSION = 2

    def __init__(self, path: Path | None) -> None:
        self._db = sqlite3.connect(":memory:" if path is None else str(path), isolation_level=None)
        version = int(self._db.execute(_VERSION).fetchone()[0])
        if version > self.VERSION:
            self._db.close()
            raise ConfigError(
                f"{path} was written by a newer p2pnode (schema {version}, this one reads "
                f"{self.VERSION})"
            )
        self._db.executescript(_SCHEMA)
        if "signed" not in self._columns("receipts"):  # pragma: no mutate (SQL names: case-free)
            self._db.execute(_RECEIPTS_SIGNED)
        if "served" not in self._columns("sessions"):  # pragma: no mutate (SQL names: case-free)
            with self._db:  # one transaction: a crash leaves the columns out, added again
                self._db.execute("BEGIN")  # pragma: no mutate (SQL's case is free)
                for statement in _SESSIONS_ACKNOWLEDGED:
                    self._db.execute(statement)
        self._db.execute(f"PRAGMA user_version = {self.VERSION}")  # pragma: no mutate

    def _columns(self, table: str) -> set[str]:
        return {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}

    def opened(
        self, role: str, peer: str, session_id: bytes, bid_id: bytes, stake: int, ends_at: int
    ) -> None:
        self._db.execute(
            _OPENED,
            (session_id, role, peer, bid_id, str(stake), ends_at),
        )

    def served(self, session_id: bytes) -> None:
        """The consumer acknowledged an answer in the session."""
        self._db.execute(_SERVED, (session_id,))

    def usage(self, session_id: bytes, used_until: int, signature: bytes) -> None:
        """The provider's best acknowledgement of the session so far (what it claims with)."""
        self._db.execute(
            _USAGE,
            (used_until, signature, session_id),
        )

    def closed(self, session_id: bytes, paid: int, refunded: int) -> None:
        self._db.execute(
            _CLOSED,
            (str(paid), str(refunded), session_id),
        )

    def open_sessions(self, role: str) -> list[LedgerSession]:
        rows = self._db.execute(_OPEN_SESSIONS, (role,))
        return [
            LedgerSession(bytes(r[0]), str(r[1]), int(r[2]), int(r[3]), bool(r[4]), int(r[5]),
                          bytes(r[6]))
            for r in rows
        ]  # fmt: skip

    def recent(self, limit: int) -> list[dict[str, object]]:
        """The ``limit`` sessions opened last, either role, with their latest receipt's
        counts (JSON for the dashboard; wei as decimal strings)."""
        keys = (
            "session_id",
            "role",
            "peer_id",
            "stake",
            "state",
            "paid",
            "refunded",
            "requests",
            "prompt_tokens",
            "completion_tokens",
            "signed",
        )
        rows = self._db.execute(_RECENT, (limit,))
        return [
            dict(zip(keys, (bytes(r[0]).hex(), *r[1:10], bool(r[10])), strict=True))
            for r in rows
        ]  # fmt: skip

    def receipt(
        self,
        session_id: bytes,
        counts: tuple[int, int, int],
        provider_sig: bytes,
        consumer_sig: bytes,
        signed: bytes,
    ) -> None:
        """The session's latest receipt: its counts, both signatures and the bytes
        they sign (``Receipt.signing_bytes``), so that the row alone proves it."""
        self._db.execute(
            _RECEIPT,
            (session_id, *counts, provider_sig, consumer_sig, signed),
        )

    def evidence(
        self,
        peer: str,
        session_id: bytes,
        at: int,
        finding: str,
        signed_receipt: bytes,
        provider_signature: bytes,
        measured: str,
    ) -> None:
        """A failed audit, kept for a dispute: the provider's signed commitment (in
        its receipt) and what the audit measured of it (JSON)."""
        self._db.execute(
            _EVIDENCE,
            (peer, session_id, at, finding, signed_receipt, provider_signature, measured),
        )

    def close(self) -> None:
        self._db.close()
