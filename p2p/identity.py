"""A node's two identities, kept in its home directory (ARCHITECTURE §2).

- ``peer.key``: the libp2p Ed25519 key (its protobuf serialization, the same
  bytes go-libp2p and js-libp2p use), mode 0600. It is the node's network
  identity and is created on first start.
- ``wallet.json``: the Ethereum account that pays and gets paid, as an
  encrypted keystore (eth-account, scrypt). Its address is readable without
  the passphrase; the key only with it. Free mode needs no wallet.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account
from eth_utils.address import to_checksum_address
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

from p2pnode.errors import ConfigError

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
    return ID.from_pubkey(key_pair.public_key)


@dataclass(frozen=True, slots=True)
class WalletFile:
    """An encrypted keystore on disk; the address is public, the key is not."""

    path: Path
    address: str

    def unlock(self, password: str) -> bytes:
        """The 32-byte private key. Raises ConfigError on a wrong passphrase."""
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
    if not isinstance(address, str):
        raise ConfigError(f"{path} is not an Ethereum keystore")
    return WalletFile(path, to_checksum_address("0x" + address.removeprefix("0x")))


def create_wallet(home: Path, password: str, *, kdf_iterations: int | None = None) -> WalletFile:
    """Create a new account and store it encrypted with ``password``.

    ``kdf_iterations`` lowers scrypt's cost for tests only; users keep
    eth-account's default (n = 2**18).
    """
    if not password:
        raise ConfigError("a wallet passphrase must not be empty")
    account = Account.create()
    keystore = Account.encrypt(account.key, password, iterations=kdf_iterations)
    path = home / WALLET_FILE
    write_private_file(path, json.dumps(keystore).encode())
    logger.info("created wallet %s", account.address)
    return WalletFile(path, account.address)
