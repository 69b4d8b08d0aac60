"""Messages of the session handshake (docs/protocols.md#handshake-messages)."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import ClassVar

from p2pnode.protocols.wire import Codec, Error, Message, signing_payload

# What a consumer's wallet signs a Hello under (see Hello.signing_bytes).
HELLO_DOMAIN = b"p2pnode/hello/1:"


class RejectCode(enum.IntEnum):
    """Why a provider turned a session down. Never renumber."""

    UNKNOWN_MODEL = 1
    BUSY = 2
    RATE_LIMITED = 3
    PRICE_CHANGED = 4
    NOT_ALLOWED = 5  # not on the provider's allowlist
    BAD_SESSION = 6  # the session the consumer says it opened does not check out
    STALE_HELLO = 7  # the Hello's timestamp is too old or too far ahead
    PAYMENT_REQUIRED = 8  # the provider serves paid sessions only (a chain is in use)
    CHAIN_UNAVAILABLE = 9  # the provider could not read the chain to check the session


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Message):
    """C→P: the session the consumer asks for, and its half of the key exchange."""

    TYPE: ClassVar[str] = "session.hello"
    model_id: str
    ephemeral: bytes  # X25519 public key, 32 bytes
    nonce: bytes  # 16 random bytes
    timestamp: float  # consumer's wall clock, seconds
    duration_s: int = 0  # requested length (chain mode: the stake buys it)
    bid_id: str | None = None  # chain mode
    consumer_wallet: str | None = None  # chain mode
    # Chain mode: the peer ID of the provider the consumer means to pay, under
    # the wallet's signature: a peer that relays this Hello to another
    # provider cannot make that provider approve (and be paid for) it.
    provider: str = ""
    signature: bytes = b""  # chain mode: the consumer wallet's signature

    def signing_bytes(self) -> bytes:
        """What the consumer's wallet signs (EIP-191): every field but the signature."""
        return signing_payload(self, HELLO_DOMAIN)


def approval_nonce(hello_nonce: bytes, approve_nonce: bytes) -> bytes:
    """The 32-byte nonce of the on-chain approval: both handshake nonces, hashed.

    Both sides know it (and so the on-chain session id) without another message.
    """
    return hashlib.sha256(b"p2pnode/approval/1:" + hello_nonce + approve_nonce).digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Approve(Message):
    """P→C: the provider agrees, with its half of the key exchange."""

    TYPE: ClassVar[str] = "session.approve"
    ephemeral: bytes
    nonce: bytes
    approval: bytes = b""  # chain mode: EIP-712 approval the contract checks
    expiry: int = 0  # chain mode: when the approval lapses (unix seconds)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reject(Message):
    """P→C: no session, and why (a RejectCode)."""

    TYPE: ClassVar[str] = "session.reject"
    code: int
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Opened(Message):
    """C→P: the session id (free mode: the transcript hash; chain mode: the on-chain id)."""

    TYPE: ClassVar[str] = "session.opened"
    session_id: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready(Message):
    """P→C: the provider checked the session; requests may flow."""

    TYPE: ClassVar[str] = "session.ready"
    session_id: bytes


CODEC = Codec([Hello, Approve, Reject, Opened, Ready, Error])
