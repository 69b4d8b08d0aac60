"""A paid network of separate processes: anvil (p2pnode devchain), a provider registered
with the CLI, a consumer with the shim; the openai client chats; balances settle to the wei."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from p2pnode.chain.client import Chain, Deployment
from p2pnode.chain.devchain import connect
from p2pnode.p2p import identity
from p2pnode.tests.cli.helpers import (
    BOUND_S,
    PASSWORD,
    cli,
    devchain,
    home_with_wallet,
    run,
    start,
)

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
PRICE = 10**15


@pytest.fixture
def chain_and_homes(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """anvil through `p2pnode devchain`, funding two fresh wallets; yields (deployment, homes)."""
    (provider_home, provider_wallet), (consumer_home, consumer_wallet) = (
        home_with_wallet(tmp_path, "provider"),
        home_with_wallet(tmp_path, "consumer"),
    )
    with devchain(tmp_path, provider_wallet, consumer_wallet) as dev:
        yield dev.deployment, [str(provider_home), str(consumer_home)]


def test_a_paid_chat_between_processes_settles_to_the_wei(
    chain_and_homes: tuple[Path, list[str]], tmp_path: Path
) -> None:
    deployment, (provider_dir, consumer_dir) = chain_and_homes
    provider_home, consumer_home = Path(provider_dir), Path(consumer_dir)
    dep = ["--deployment", str(deployment)]
    # The provider registers (peer ID, stake), the model, and a bid, with the CLI.
    registered = cli(provider_home, "provider", "register", *dep)
    assert "✓ register provider: tx 0x" in registered.stderr
    cli(provider_home, "model", "register", MODEL, *dep)
    cli(provider_home, "bid", "post", MODEL, "--price", str(PRICE), *dep)
    bids = json.loads(cli(consumer_home, "bid", "list", "--json", *dep).stdout)
    assert [b["price_per_s"] for b in bids] == [PRICE]
    # A revert is one readable line.
    again = run(provider_home, "provider", "register", *dep, P2PNODE_WALLET_PASSWORD=PASSWORD)
    assert again.returncode == 1
    assert "AlreadyRegistered()" in again.stderr

    # A deployment file for another chain is refused before anything is sent.
    other = tmp_path / "other.json"
    other.write_text(deployment.read_text().replace('"chain_id": 31337', '"chain_id": 8453'))
    wrong = run(provider_home, "wallet", "balance", "--deployment", str(other))
    assert wrong.returncode == 2
    assert "wrong chain" in wrong.stderr
    where = Deployment.load(deployment)
    chain = Chain(connect(where.rpc_url or "", where), where)
    provider_wallet = identity.load_wallet(provider_home)
    consumer_wallet = identity.load_wallet(consumer_home)
    assert provider_wallet is not None
    assert consumer_wallet is not None
    assert chain.provider(provider_wallet.address)[0].startswith("12D3KooW")
    p0, c0 = chain.balance(provider_wallet.address), chain.balance(consumer_wallet.address)

    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD)
    password_file.chmod(0o600)  # a secret others can read is refused
    paid = [*dep, "--wallet-password-file", str(password_file)]
    provider = start(provider_home, tmp_path / "p.json", *paid, serve=True)
    try:
        consumer = start(
            consumer_home, tmp_path / "c.json", *paid,
            "--shim", "127.0.0.1:0", "--bootstrap", provider.addrs[0], "--session-seconds", "100",
        )  # fmt: skip
        try:
            url = json.loads((tmp_path / "c.json").read_text())["shim_url"]
            key = (consumer_home / "api_key").read_text().strip()
            client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=BOUND_S)
            for _ in range(2):
                answer = client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
                )
                assert answer.choices[0].message.content
            (session_id,) = chain.sessions_of(consumer_wallet.address)
            assert chain.session(session_id).open
        finally:
            # The consumer closes its session as it stops: its second and last transaction.
            consumer.proc.send_signal(signal.SIGTERM)
            _, consumer_err = consumer.proc.communicate(timeout=BOUND_S)
        settled = chain.session(session_id)
        assert not settled.open, consumer_err
        assert settled.stake == 100 * PRICE
        logs = chain.market.events.SessionClosed().get_logs(from_block=0)
        (closed,) = [log for log in logs if bytes(log["args"]["sessionId"]) == session_id]
        paid, refunded = int(closed["args"]["paid"]), int(closed["args"]["refunded"])
        # Paid for exactly the seconds between the open's block and the close's.
        closed_at = int(chain.w3.eth.get_block(closed["blockNumber"])["timestamp"])
        assert paid == PRICE * (closed_at - settled.opened_at)
        assert paid + refunded == settled.stake
        assert chain.balance(provider_wallet.address) == p0 + paid
        assert chain.balance(consumer_wallet.address) == c0 - paid
        escrowed, total_paid, total_refunded = chain.totals()
        assert (escrowed, total_paid, total_refunded) == (settled.stake, paid, refunded)
        sessions = json.loads(cli(consumer_home, "session", "list", "--json", *dep).stdout)
        assert [(s["session_id"], s["open"]) for s in sessions] == [(session_id.hex(), False)]
    finally:
        provider.proc.send_signal(signal.SIGTERM)
        provider.proc.communicate(timeout=BOUND_S)
