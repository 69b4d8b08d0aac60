"""A local multi-process chain: anvil on 127.0.0.1, contracts deployed, accounts funded.

anvil comes from npm (``@foundry-rs/anvil-linux-amd64``, pinned in
``contracts/package-lock.json``; ``./dev setup`` installs it). Its accounts are
the standard development mnemonic's, funded with ether; the deployer mints
each of them, and any address asked for, tokens (and sends those ether for
gas), then writes the deployment file that nodes and commands read.

It mines a block every ``block_time_s`` (2 s, as an OP Stack chain) as well as
one for each transaction at once (anvil's ``--mixed-mining``): like a real
chain, its latest block is never old, so its clock moves while nobody
transacts, and a transaction does not wait for the next interval.
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from web3 import HTTPProvider, Web3
from web3.exceptions import Web3Exception

from p2pnode.chain.client import ANVIL_CHAIN_ID, Chain, Deployment, deploy, send_ether
from p2pnode.chain.embedded import FUNDING, MIN_PROVIDER_STAKE
from p2pnode.chain.failures import unreachable
from p2pnode.errors import ChainError, ConfigError

DEV_MNEMONIC = "test test test test test test test test test test test junk"
CHAIN_ID = ANVIL_CHAIN_ID
GAS_ETHER = 10 * 10**18  # ether sent to each funded address, for gas
# Seconds between blocks while no transaction comes: an OP Stack chain's (Base,
# Optimism). Short enough that the latest block's time is the chain's clock to
# within a couple of seconds; each empty block costs anvil next to nothing.
BLOCK_TIME_S = 2


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


def connect(url: str, deployment: Deployment | None = None, *, retry: bool = True) -> Web3:
    """A web3 on ``url``; checks the chain id against the deployment's.

    ``retry``: web3 retries a failed read 5 times over ~2 s (a blip costs no
    call); a probe for a node still starting does not want that wait.
    Raises ChainError ``no chain answers at URL (connection refused)`` if
    nothing answers there.
    """
    provider = (
        HTTPProvider(url, request_kwargs={"timeout": 30})
        if retry
        else HTTPProvider(url, request_kwargs={"timeout": 30}, exception_retry_configuration=None)
    )
    w3 = Web3(provider)
    try:
        chain_id = int(w3.eth.chain_id)
    except (OSError, ValueError, Web3Exception) as exc:  # requests', web3's failures
        raise ChainError(unreachable(url, exc)) from exc
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
def run_anvil(
    port: int,
    *,
    accounts: int = 10,
    block_time_s: int | None = BLOCK_TIME_S,
    genesis_timestamp: int | None = None,
) -> Iterator[tuple[str, Web3]]:
    """Run a bare anvil (no contract on it) on 127.0.0.1; yields its URL and a client.

    ``port`` 0: one the system chooses. ``block_time_s``: a block that often
    while idle, besides one per transaction at once (None: blocks only for
    transactions, anvil's default, as a chain that has been idle for long
    looks). ``genesis_timestamp``: the first block's time, from which the
    chain's clock then runs (None: now).
    """
    args = [str(anvil_path()), "--host", "127.0.0.1", "--port", str(port),
            "--chain-id", str(CHAIN_ID), "--accounts", str(accounts)]  # fmt: skip
    if block_time_s is not None:
        # --mixed-mining (anvil 1.x): a transaction is mined at once, as with
        # automine, instead of waiting for the next interval's block.
        args += ["--block-time", str(block_time_s), "--mixed-mining"]
    if genesis_timestamp is not None:
        args += ["--timestamp", str(genesis_timestamp)]
    proc = subprocess.Popen(  # noqa: S603 - our own pinned binary, fixed arguments
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        # The port anvil bound (port 0: one the system chose, no free-port guess
        # that another process may take first), from the line it prints.
        url = f"http://127.0.0.1:{_listening_port(proc)}"
        yield url, _wait_for(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@contextmanager
def run_devchain(
    port: int,
    deployment_file: Path,
    *,
    accounts: int = 10,
    fund: Sequence[str] = (),
    block_time_s: int | None = BLOCK_TIME_S,
    genesis_timestamp: int | None = None,
    told: Callable[[str], None] = lambda _note: None,
) -> Iterator[DevChain]:
    """Run anvil (:func:`run_anvil`), deploy and fund, write ``deployment_file``;
    anvil stops on exit. ``told`` hears each step as it ends."""
    with run_anvil(
        port, accounts=accounts, block_time_s=block_time_s, genesis_timestamp=genesis_timestamp
    ) as (url, w3):
        told(f"anvil answers at {url}")
        dev = dev_accounts(accounts)
        chain = deploy(w3, dev[0], MIN_PROVIDER_STAKE, rpc_url=url)
        told(f"contracts deployed: marketplace {chain.deployment.marketplace}")
        addresses = [str(a.address) for a in dev] + [str(to_checksum_address(a)) for a in fund]
        for address in addresses:
            chain.mint(dev[0], address, FUNDING)
        for address in fund:
            send_ether(w3, dev[0], to_checksum_address(address), GAS_ETHER)
        chain.deployment.save(deployment_file)
        told(f"{len(addresses)} accounts funded")
        yield DevChain(chain, url, dev)


def _listening_port(proc: subprocess.Popen[bytes], bound_s: float = 20.0) -> int:
    """The port in anvil's "Listening on 127.0.0.1:PORT"; the rest of its output
    (a line per RPC call) is read and dropped by a thread, so its pipe never fills."""
    found: queue.Queue[int | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        told = False
        with proc.stdout:  # closed at anvil's exit, by the one reader
            for line in proc.stdout:
                if not told and (match := _LISTENING.search(line)):
                    found.put(int(match[1]))
                    told = True
        if not told:
            found.put(None)  # it exited first

    threading.Thread(target=read, name="anvil-stdout", daemon=True).start()
    try:
        port = found.get(timeout=bound_s)
    except queue.Empty:
        port = None
    if port is None:
        proc.poll()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr and proc.returncode else ""
        raise ChainError(f"anvil did not start ({proc.returncode}): {err.strip()[:300]}")
    return port


_LISTENING = re.compile(rb"Listening on [\d.]+:(\d+)")


def _wait_for(url: str, proc: subprocess.Popen[bytes], bound_s: float = 20.0) -> Web3:
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise ChainError(f"anvil exited ({proc.returncode}): {err.strip()[:300]}")
        try:
            connect(url, retry=False)
        except ChainError:
            time.sleep(0.1)  # noqa: TID251 - a blocking set-up step, before any trio run
        else:
            return connect(url)
    raise ChainError(f"anvil did not answer at {url} within {bound_s:g} s")
