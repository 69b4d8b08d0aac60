"""The marketplace commands a provider and a consumer run by hand, against anvil:
each does on chain what its help says (read back from the chain, not the output)."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import pytest
from eth_account import Account

from p2pnode.chain.client import Chain, Deployment
from p2pnode.chain.devchain import connect
from p2pnode.p2p import identity
from p2pnode.tests.cli.helpers import PASSWORD, devchain, home_with_wallet, invoke

pytestmark = pytest.mark.slow
MODEL = "tiny/model"
PRICE = 10**12
TOKEN = 10**18


def test_provider_bid_and_session_commands_do_on_chain_what_they_say(tmp_path: Path) -> None:
    provider_home, provider_address = home_with_wallet(tmp_path, "provider")
    consumer_home, consumer_address = home_with_wallet(tmp_path, "consumer")
    with devchain(tmp_path, provider_address, consumer_address) as dev:
        where = Deployment.load(dev.deployment)
        url = where.rpc_url or ""
        chain = Chain(connect(url, where), where)
        # A deployment file without its URL: --chain names the chain.
        bare = tmp_path / "bare.json"
        bare.write_text(json.dumps({**json.loads(dev.deployment.read_text()), "rpc_url": None}))
        on = ["--chain", url, "--deployment", str(bare)]

        def as_provider(*args: str) -> str:
            result = invoke(provider_home, *args, *on, P2PNODE_WALLET_PASSWORD=PASSWORD)
            assert result.exit_code == 0, result.stderr
            return result.stdout

        nowhere = invoke(provider_home, "wallet", "balance", "--deployment", str(bare))
        assert nowhere.exit_code == 2
        assert "no chain URL: give --chain" in nowhere.stderr

        as_provider("provider", "register")
        peer_id, stake, _, registered = chain.provider(provider_address)
        assert registered
        assert peer_id == str(identity.peer_id_of(identity.load_or_create_peer_key(provider_home)))
        assert stake == chain.min_provider_stake()

        # update: the stake grows by exactly what was added.
        out = as_provider("provider", "update", "--add-stake", "5")
        assert chain.provider(provider_address)[1] == stake + 5 * TOKEN
        assert peer_id in out

        gguf = tmp_path / "tiny.gguf"
        gguf.write_bytes(b"GGUF" + secrets.token_bytes(64))
        as_provider("model", "register", MODEL, "--gguf", str(gguf))
        first = _bid_id(as_provider("bid", "post", MODEL, "--price", str(PRICE)))
        assert chain.live_bid(provider_address, MODEL) == first

        # delete: the bid is no longer live, and the list says so.
        as_provider("bid", "delete", first.hex())
        assert not chain.bid(first).live
        assert chain.live_bid(provider_address, MODEL) is None
        assert "no live bids" in invoke(consumer_home, "bid", "list", *on).stdout

        # A session opened on a new bid: the provider cannot leave while it is open.
        second = _bid_id(as_provider("bid", "post", MODEL, "--price", str(PRICE)))
        session_id = _open(chain, provider_home, consumer_home, second, stake=1_000 * PRICE)
        busy = invoke(
            provider_home, "provider", "deregister", *on, P2PNODE_WALLET_PASSWORD=PASSWORD
        )
        assert busy.exit_code == 1
        assert "deregister provider: SessionsOpen(count=1)" in busy.stderr
        assert chain.provider(provider_address)[3]

        # close: the consumer ends it early; paid for the seconds elapsed, the rest back.
        answer = chain.w3.provider.make_request("evm_increaseTime", [30])  # type: ignore[arg-type]
        assert "error" not in answer, answer
        closed = invoke(consumer_home, "session", "close", session_id.hex(), *on,
                        P2PNODE_WALLET_PASSWORD=PASSWORD)  # fmt: skip
        assert closed.exit_code == 0, closed.stderr
        settled = chain.session(session_id)
        assert not settled.open
        (event,) = [
            e
            for e in chain.market.events.SessionClosed().get_logs(from_block=0)
            if bytes(e["args"]["sessionId"]) == session_id
        ]
        paid, refunded = int(event["args"]["paid"]), int(event["args"]["refunded"])
        closed_at = int(chain.w3.eth.get_block(event["blockNumber"])["timestamp"])
        assert paid == PRICE * (closed_at - settled.opened_at) >= 30 * PRICE
        assert paid + refunded == 1_000 * PRICE
        assert "paid" in closed.stdout
        assert "refunded" in closed.stdout

        # deregister: the whole stake comes back, and the bid dies with the registration.
        before = chain.balance(provider_address)
        as_provider("provider", "deregister")
        assert not chain.provider(provider_address)[3]
        assert chain.balance(provider_address) == before + stake + 5 * TOKEN
        assert chain.live_bid(provider_address, MODEL) is None


def _bid_id(output: str) -> bytes:
    match = re.search(r"bid ([0-9a-f]{64}) on", output)
    assert match, output
    return bytes.fromhex(match.group(1))


def _open(chain: Chain, provider_home: Path, consumer_home: Path, bid: bytes, stake: int) -> bytes:
    """The consumer opens a session on ``bid`` with the provider's approval (as a node does)."""
    provider_wallet = identity.load_wallet(provider_home)
    consumer_wallet = identity.load_wallet(consumer_home)
    assert provider_wallet is not None
    assert consumer_wallet is not None
    provider = Account.from_key(provider_wallet.unlock(PASSWORD))
    consumer = Account.from_key(consumer_wallet.unlock(PASSWORD))
    expiry, nonce = chain.now() + 600, secrets.token_bytes(32)
    approval = chain.sign_approval(provider, bid, consumer.address, expiry, nonce)
    tx = chain.open_session(consumer, bid, stake, PRICE, expiry, nonce, approval)
    return bytes(tx.value[0])
