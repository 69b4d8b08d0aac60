"""Peer key and wallet files in the home directory."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from eth_account import Account

from p2pnode.errors import ConfigError
from p2pnode.p2p import identity

# scrypt at n=2**18 costs ~1 s and 256 MiB; tests use a cheaper n.
CHEAP_KDF = 2**10


def test_peer_key_is_created_private_and_stable(tmp_path: Path) -> None:
    first = identity.load_or_create_peer_key(tmp_path)
    path = tmp_path / identity.PEER_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = identity.load_or_create_peer_key(tmp_path)
    assert identity.peer_id_of(again) == identity.peer_id_of(first)
    assert str(identity.peer_id_of(first)).startswith("12D3KooW")  # Ed25519


def test_peer_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    identity.load_or_create_peer_key(tmp_path)
    (tmp_path / identity.PEER_KEY_FILE).chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        identity.load_or_create_peer_key(tmp_path)


def test_corrupt_peer_key_is_a_config_error(tmp_path: Path) -> None:
    identity.write_private_file(tmp_path / identity.PEER_KEY_FILE, b"not a key")
    with pytest.raises(ConfigError, match="not a libp2p private key"):
        identity.load_or_create_peer_key(tmp_path)


def test_wallet_round_trip(tmp_path: Path) -> None:
    assert identity.load_wallet(tmp_path) is None
    created = identity.create_wallet(tmp_path, "correct horse", kdf_iterations=CHEAP_KDF)
    path = tmp_path / identity.WALLET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = identity.load_wallet(tmp_path)
    assert loaded is not None
    assert loaded.address == created.address
    key = loaded.unlock("correct horse")
    assert Account.from_key(key).address == created.address


def test_wallet_wrong_passphrase(tmp_path: Path) -> None:
    wallet = identity.create_wallet(tmp_path, "right", kdf_iterations=CHEAP_KDF)
    with pytest.raises(ConfigError, match="wrong passphrase"):
        wallet.unlock("wrong")


def test_wallet_is_never_overwritten(tmp_path: Path) -> None:
    identity.create_wallet(tmp_path, "one", kdf_iterations=CHEAP_KDF)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        identity.create_wallet(tmp_path, "two", kdf_iterations=CHEAP_KDF)


def test_empty_passphrase_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must not be empty"):
        identity.create_wallet(tmp_path, "")
