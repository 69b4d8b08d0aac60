"""A local multi-process chain: anvil on 127.0.0.1, contracts deployed, accounts funded.

anvil comes from npm (``@foundry-rs/anvil-linux-amd64``, pinned in
``contracts/package-lock.json``; ``./dev setup`` installs it). Its accounts are
the standard development mnemonic's, funded with ether; the deployer mints
each of them, and any address asked for, tokens (and sends those ether for
gas), then writes the deployment file that nodes and commands read.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from web3 import HTTPProvider, Web3

from p2pnode.chain.client import Chain, Deployment, deploy, send_ether
from p2pnode.chain.embedded import FUNDING, MIN_PROVIDER_STAKE
from p2pnode.errors import ChainError, ConfigError

DEV_MNEMONIC = "test test test test test test test test test test test junk"
CHAIN_ID = 31337
GAS_ETHER = 10 * 10**18  # ether sent to each funded address, for gas


def anvil_path() -> Path:
    """The anvil binary from the project's npm install (or one on PATH)."""
    here = Path(__file__).resolve().parent.parent / "contracts" / "node_modules" / ".bin" / "anvil"
    if here.exists():
        return here
    found = shutil.which("anvil")
    if found:
        return Path(found)
    raise ConfigError("anvil not found: run ./dev setup (npm ci --prefix contracts)")


def dev_accounts(count: int) -> list[LocalAccount]:
    """anvil's own funded accounts (derived from the standard dev mnemonic)."""
    Account.enable_unaudited_hdwallet_features()
    return [
        Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}")
        for i in range(count)
    ]


def connect(url: str, deployment: Deployment | None = None) -> Web3:
    """A web3 on ``url``; checks the chain id against the deployment's."""
    w3 = Web3(HTTPProvider(url, request_kwargs={"timeout": 30}))
    try:
        chain_id = int(w3.eth.chain_id)
    except Exception as exc:  # noqa: BLE001 - requests' and web3's connection errors
        raise ChainError(f"no chain answers at {url}: {exc}") from exc
    if deployment is not None and chain_id != deployment.chain_id:
        raise ConfigError(
            f"wrong chain: {url} has chain id {chain_id}, the deployment is for "
            f"{deployment.chain_id}"
        )
    return w3


@dataclass
class DevChain:
    chain: Chain
    url: str
    accounts: list[LocalAccount]


@contextmanager
def run_devchain(
    port: int, deployment_file: Path, *, accounts: int = 10, fund: Sequence[str] = ()
) -> Iterator[DevChain]:
    """Run anvil, deploy and fund, write ``deployment_file``; anvil stops on exit."""
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(  # noqa: S603 - our own pinned binary, fixed arguments
        [str(anvil_path()), "--host", "127.0.0.1", "--port", str(port),
         "--chain-id", str(CHAIN_ID), "--accounts", str(accounts), "--silent"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        w3 = _wait_for(url, proc)
        dev = dev_accounts(accounts)
        chain = deploy(w3, dev[0], MIN_PROVIDER_STAKE, rpc_url=url)
        addresses = [str(a.address) for a in dev] + [str(to_checksum_address(a)) for a in fund]
        for address in addresses:
            chain.mint(dev[0], address, FUNDING)
        for address in fund:
            send_ether(w3, dev[0], to_checksum_address(address), GAS_ETHER)
        chain.deployment.save(deployment_file)
        yield DevChain(chain, url, dev)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _wait_for(url: str, proc: subprocess.Popen[bytes], bound_s: float = 20.0) -> Web3:
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise ChainError(f"anvil exited ({proc.returncode}): {err.strip()[:300]}")
        try:
            return connect(url)
        except ChainError:
            time.sleep(0.1)  # noqa: TID251 - a blocking set-up step, before any trio run
    raise ChainError(f"anvil did not answer at {url} within {bound_s:g} s")
