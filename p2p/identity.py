"""A node's two identities, kept in its home directory (docs/architecture.md#identities).

- ``peer.key``: the libp2p Ed25519 key (its protobuf serialization, the same
  bytes go-libp2p and js-libp2p use), mode 0600. It is the node's network
  identity and is created on first start.
- ``wallet.json``: the Ethereum account that pays and gets paid, as an
  encrypted keystore (eth-account, scrypt). Its address is readable without
  the passphrase; the key only with it. Free mode needs no wallet.

libp2p and eth-account are imported by the functions that use them, not
here: ``p2pnode id`` reads both identities and must start in well under a
second (README, "Benchmarks": bench cli), so :func:`read_peer_id` and
:func:`load_wallet` need neither.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from p2pnode.errors import ConfigError

if TYPE_CHECKING:
    from libp2p.crypto.keys import KeyPair
    from libp2p.peer.id import ID

logger = logging.getLogger(__name__)

PEER_KEY_FILE = "peer.key"
WALLET_FILE = "wallet.json"
API_KEY_FILE = "api_key"


def write_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and ``data``; never overwrite.

    The mode is set at creation (O_CREAT|O_EXCL), so the secret is never
    readable by others, not even for a moment.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"{path} already exists; refusing to overwrite it") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def read_private_file(path: Path) -> bytes:
    """Read a secret file, refusing one that others may read (as ssh does)."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{path} is accessible by other users (mode {stat.filemode(mode)}); "
                f"run: chmod 600 {path}"
            )
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


def load_or_create_peer_key(home: Path) -> KeyPair:
    """The node's libp2p key pair, created on first use."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.keys import KeyPair
    from libp2p.crypto.serialization import deserialize_private_key

    path = home / PEER_KEY_FILE
    if not path.exists():
        key_pair = create_new_key_pair()
        write_private_file(path, key_pair.private_key.serialize())
        logger.info("created peer key %s", path)
        return key_pair
    data = read_private_file(path)
    try:
        private = deserialize_private_key(data)
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError, ValueError, MissingDeserializerError
        raise ConfigError(f"{path} is not a libp2p private key ({exc})") from exc
    return KeyPair(private, private.get_public_key())


def load_or_create_api_key(home: Path) -> str:
    """The local OpenAI shim's bearer key, created on first use (``sk-p2p-`` + 32 random bytes)."""
    path = home / API_KEY_FILE
    if not path.exists():
        write_private_file(path, f"sk-p2p-{secrets.token_urlsafe(32)}\n".encode())
        logger.info("created API key %s", path)
    key = read_private_file(path).decode(errors="replace").strip()
    if not key:
        raise ConfigError(f"{path} is empty; delete it to get a new key")
    return key


def peer_id_of(key_pair: KeyPair) -> ID:
    """The peer ID a key pair gives."""
    from libp2p.peer.id import ID

    return ID.from_pubkey(key_pair.public_key)


# peer.key as py-libp2p writes an Ed25519 key: the protobuf PrivateKey
# {Type = Ed25519 (1), Data = the 32-byte seed} (libp2p peer-ids spec, "Keys").
_ED25519_PRIVATE_PREFIX = b"\x08\x01\x12\x20"
# Its public key, PublicKey {Type = Ed25519, Data = 32 bytes}, is 36 bytes: at most
# 42, so the peer ID inlines it as an identity multihash (code 0x00, length 0x24).
_ED25519_PEER_ID_PREFIX = b"\x00\x24\x08\x01\x12\x20"


def read_peer_id(home: Path) -> str:
    """The peer ID of ``home``'s existing ``peer.key`` (never creates one).

    The same string as ``str(peer_id_of(load_or_create_peer_key(home)))``,
    computed without importing libp2p (~0.5 s) for an Ed25519 key, the only
    kind p2pnode creates; any other key goes the long way. Raises ConfigError
    for a missing, unsafe or malformed file.
    """
    path = home / PEER_KEY_FILE
    data = read_private_file(path)
    if len(data) != 36 or not data.startswith(_ED25519_PRIVATE_PREFIX):
        return str(peer_id_of(load_or_create_peer_key(home)))
    import base58
    from nacl.bindings import crypto_sign_seed_keypair

    public, _ = crypto_sign_seed_keypair(data[4:])
    return str(base58.b58encode(_ED25519_PEER_ID_PREFIX + public).decode())


@dataclass(frozen=True, slots=True)
class WalletFile:
    """An encrypted keystore on disk; the address is public, the key is not."""

    path: Path
    address: str

    def unlock(self, password: str) -> bytes:
        """The 32-byte private key. Raises ConfigError on a wrong passphrase."""
        from eth_account import Account

        keystore = json.loads(read_private_file(self.path))
        try:
            return bytes(Account.decrypt(keystore, password))
        except ValueError as exc:
            raise ConfigError(f"cannot unlock {self.path}: wrong passphrase") from exc


def load_wallet(home: Path) -> WalletFile | None:
    """The wallet in ``home``, or None if there is none yet."""
    path = home / WALLET_FILE
    if not path.exists():
        return None
    try:
        keystore = json.loads(read_private_file(path))
        address = keystore["address"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not an Ethereum keystore") from exc
    digits = address.removeprefix("0x").lower() if isinstance(address, str) else ""
    if len(digits) != 40 or digits.strip("0123456789abcdef"):
        raise ConfigError(f"{path} is not an Ethereum keystore")
    return WalletFile(path, _checksummed(digits))


def _checksummed(digits: str) -> str:
    """EIP-55 mixed-case form of 40 lower-case hex digits, as eth-utils'
    ``to_checksum_address`` gives it, without importing eth-utils (~0.2 s)."""
    from Crypto.Hash import keccak  # pycryptodome: eth-hash's own keccak backend

    # A letter is upper-case where the same nibble of keccak256(the digits) is >= 8.
    hashed = keccak.new(digest_bits=256, data=digits.encode()).hexdigest()[:40]
    return "0x" + "".join(
        c.upper() if h in "89abcdef" else c for c, h in zip(digits, hashed, strict=True)
    )


def create_wallet(home: Path, password: str, *, kdf_iterations: int | None = None) -> WalletFile:
    """Create a new account and store it encrypted with ``password``.

    ``kdf_iterations`` lowers scrypt's cost for tests only; users keep
    eth-account's default (n = 2**18).
    """
    from eth_account import Account

    if not password:
        raise ConfigError("a wallet passphrase must not be empty")
    account = Account.create()
    keystore = Account.encrypt(account.key, password, iterations=kdf_iterations)
    path = home / WALLET_FILE
    write_private_file(path, json.dumps(keystore).encode())
    logger.info("created wallet %s", account.address)
    return WalletFile(path, account.address)
