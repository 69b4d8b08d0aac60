"""The embedded chain: eth-tester on py-evm in this process, contracts deployed at start.

For tests, simnet and the demo: no process to start, no network. The chain
comes with funded accounts (eth-tester's own, with ether), and the deployer
mints each of them tokens, so any of them can be a provider or a consumer.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_tester import EthereumTester, PyEVMBackend
from web3 import Web3
from web3.providers.eth_tester import EthereumTesterProvider

from p2pnode.chain.client import Chain, deploy, send_ether

TOKEN = 10**18  # one whole token in its smallest unit
FUNDING = 1_000_000 * TOKEN  # tokens minted to each test account
MIN_PROVIDER_STAKE = 100 * TOKEN


@dataclass
class Embedded:
    """A fresh chain with the contracts deployed and accounts funded."""

    chain: Chain
    tester: EthereumTester
    accounts: list[LocalAccount]  # [0] deployed the contracts and owns the token

    def new_account(self) -> LocalAccount:
        """One more funded account (ether for gas, tokens)."""
        account: LocalAccount = Account.create()
        send_ether(self.chain.w3, self.accounts[0], account.address, 10 * TOKEN)
        self.chain.mint(self.accounts[0], account.address, FUNDING)
        self.accounts.append(account)
        return account

    def time_travel(self, seconds: int) -> None:
        """Move the chain's clock forward (mines a block at the new time)."""
        # From the pending block: its timestamp follows the wall clock and may
        # already be past the latest block's, and eth-tester refuses to travel
        # back (a one-second travel failed so in a clean-clone run).
        block = self.tester.get_block_by_number
        now = max(int(block(tag)["timestamp"]) for tag in ("latest", "pending"))
        self.tester.time_travel(now + seconds)


def open_embedded(min_provider_stake: int = MIN_PROVIDER_STAKE) -> Embedded:
    """Start a chain in this process (~1 s: deploys, mints). Blocking: call it in a thread."""
    backend = PyEVMBackend()
    tester = EthereumTester(backend)
    w3 = Web3(EthereumTesterProvider(tester))
    accounts = [Account.from_key(key) for key in backend.account_keys]
    chain = deploy(w3, accounts[0], min_provider_stake, rpc_url=None)
    for account in accounts:
        chain.mint(accounts[0], account.address, FUNDING)
    return Embedded(chain, tester, accounts)
