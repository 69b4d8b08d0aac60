"""``p2pnode deploy`` on a chain that has no contract of ours (a bare anvil, as a
public chain would be): the committed artifacts go on chain with the node's
wallet paying the gas, the deployment file it writes is what every other
command then reads, and ``--token`` keeps an existing ERC-20 instead of the
dev token."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pnode.chain.client import Chain, Deployment, send_ether
from p2pnode.chain.devchain import connect, dev_accounts, run_anvil
from p2pnode.tests.cli.helpers import PASSWORD, home_with_wallet, invoke

pytestmark = pytest.mark.slow
ETHER = 10**18


def test_deploy_writes_the_file_other_commands_read(tmp_path: Path) -> None:
    home, address = home_with_wallet(tmp_path, "operator")
    with run_anvil(0, accounts=1, block_time_s=None) as (url, w3):
        poor = invoke(home, "deploy", "--chain", url, P2PNODE_WALLET_PASSWORD=PASSWORD)
        assert poor.exit_code != 0
        assert "no ether for gas" in poor.stderr
        send_ether(w3, dev_accounts(1)[0], address, ETHER)

        first = invoke(home, "deploy", "--chain", url, "--min-provider-stake", "7",
                       P2PNODE_WALLET_PASSWORD=PASSWORD)  # fmt: skip
        assert first.exit_code == 0, first.stderr
        # Progress, one line a receipt (not a terminal here): the token, the marketplace.
        assert "deploying [1/2" in first.stderr
        assert "ComputeToken at 0x" in first.stderr
        assert "deploying [2/2" in first.stderr
        assert "Marketplace at 0x" in first.stderr
        where = Deployment.load(home / "deployment.json")
        assert where.rpc_url == url
        assert where.chain_id == w3.eth.chain_id
        chain = Chain(connect(url, where), where)
        assert chain.min_provider_stake() == 7 * ETHER
        assert w3.eth.get_code(w3.to_checksum_address(where.token))
        # The file is what the other commands read: no --chain or --deployment needed.
        balance = invoke(home, "wallet", "balance", P2PNODE_WALLET_PASSWORD=PASSWORD)
        assert balance.exit_code == 0, balance.stderr

        # A second marketplace priced in the first one's token: no new token.
        again = tmp_path / "second.json"
        kept = invoke(home, "deploy", "--chain", url, "--token", where.token, "--deployment",
                      str(again), P2PNODE_WALLET_PASSWORD=PASSWORD)  # fmt: skip
        assert kept.exit_code == 0, kept.stderr
        assert "ComputeToken at" not in kept.stderr
        second = Deployment.load(again)
        assert second.token == where.token
        assert second.marketplace != where.marketplace

        wrong = invoke(home, "deploy", "--chain", url, "--token", address,
                       P2PNODE_WALLET_PASSWORD=PASSWORD)  # fmt: skip
        assert wrong.exit_code != 0
        assert "no contract at" in wrong.stderr
