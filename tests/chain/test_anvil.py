"""The chain client against a real anvil: chain time after an idle spell, writes
simulated where they will be mined, reverts decoded on every path, and failures a
person can act on (an unfunded wallet, a chain that does not answer)."""

from __future__ import annotations

import re
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from p2pnode.chain.client import AsyncChain, Chain, Unfunded, send_ether
from p2pnode.chain.devchain import DevChain, connect, run_devchain
from p2pnode.chain.embedded import MIN_PROVIDER_STAKE, TOKEN
from p2pnode.errors import ChainError

PRICE = 10**15
MODEL = "m"
# How long the chain has been idle: the latest block is this old when the test
# begins, longer than an approval's time to live (120 s).
IDLE_S = 300


def rpc(w3: Web3, method: str, *params: object) -> object:
    """One of anvil's own RPC methods (time travel, mining)."""
    answer = w3.provider.make_request(method, list(params))  # type: ignore[arg-type]
    assert "error" not in answer, answer
    return answer.get("result")


def go_idle(dev: DevChain) -> int:
    """Make the chain look idle since its latest block: that block stays IDLE_S behind
    the wall clock, and the next one comes at the wall clock's time (as on anvil
    mining on demand, or any chain with sparse blocks). Returns the latest block's time."""
    rpc(dev.chain.w3, "anvil_setTime", int(time.time()))
    latest = dev.chain.now()
    assert latest < time.time() - IDLE_S + 60  # deployed by the chain's old clock
    return latest


@pytest.fixture
def idle(tmp_path: Path) -> Iterator[DevChain]:
    """anvil mining only for transactions, whose clock runs IDLE_S behind the wall clock
    until go_idle() (so what is set up happens IDLE_S "ago")."""
    with run_devchain(
        0,  # a port the system chooses
        tmp_path / "deployment.json",
        accounts=4,
        block_time_s=None,
        genesis_timestamp=int(time.time()) - IDLE_S,
    ) as dev:
        yield dev


def _bid(dev: DevChain) -> tuple[LocalAccount, bytes]:
    chain, provider = dev.chain, dev.accounts[1]
    chain.register_provider(provider, "12D3KooWprovider", MIN_PROVIDER_STAKE)
    chain.register_model(provider, MODEL, None)
    return provider, chain.post_bid(provider, MODEL, PRICE).value


def _approval(
    dev: DevChain, provider: LocalAccount, bid: bytes, expiry: int
) -> tuple[bytes, bytes]:
    nonce = secrets.token_bytes(32)
    consumer = dev.accounts[2].address
    return nonce, dev.chain.sign_approval(provider, bid, consumer, expiry, nonce)


def test_the_next_block_time_is_the_clock_on_an_idle_chain_and_on_a_moved_one(
    idle: DevChain,
) -> None:
    chain = idle.chain
    latest = go_idle(idle)
    # The latest block is minutes old; the next one will carry the wall clock's time.
    assert abs(chain.next_block_time() - time.time()) < 5
    assert chain.next_block_time() - latest >= IDLE_S - 60
    # A dev chain's clock moved forward: the next block is ahead of the wall clock.
    rpc(idle.chain.w3, "evm_increaseTime", 1000)
    assert abs(chain.next_block_time() - (time.time() + 1000)) < 5
    assert chain.now() == latest  # nothing mined


def test_a_write_bound_to_revert_when_mined_is_not_sent(idle: DevChain) -> None:
    """The issue's trap: an approval that expires by the latest (idle) block's time +
    60 s is still good by that block, but not by the next one's. Simulated against
    the latest block, openSession went out and reverted on chain, gas spent."""
    chain, consumer = idle.chain, idle.accounts[2]
    provider, bid = _bid(idle)
    chain.approve_token(consumer, 10**20, unlimited=True)
    latest = go_idle(idle)
    expiry = latest + 60
    nonce, approval = _approval(idle, provider, bid, expiry)
    sent = chain.w3.eth.get_transaction_count(consumer.address)
    with pytest.raises(ChainError, match=rf"open session: ApprovalExpired\(expiry={expiry}, now="):
        chain.open_session(consumer, bid, 10 * PRICE, PRICE, expiry, nonce, approval)
    assert chain.w3.eth.get_transaction_count(consumer.address, "pending") == sent
    assert chain.now() == latest  # no block was mined for it


async def test_a_transaction_reverted_once_mined_is_decoded_from_its_block(
    idle: DevChain,
) -> None:
    """Simulated fine, mined too late: the chain moved on between the two (here the
    transaction waits in the pool while the chain's clock jumps)."""
    chain, consumer = idle.chain, idle.accounts[2]
    control = connect(idle.url)  # the test's own connection, beside the client's
    provider, bid = _bid(idle)
    chain.approve_token(consumer, 10**20, unlimited=True)
    go_idle(idle)
    expiry = chain.next_block_time() + 60
    nonce, approval = _approval(idle, provider, bid, expiry)
    rpc(control, "evm_setAutomine", False)
    sent = control.eth.get_transaction_count(consumer.address)
    failures: list[ChainError] = []

    async def open_it() -> None:
        with pytest.raises(ChainError) as failed:
            await trio.to_thread.run_sync(
                chain.open_session, consumer, bid, 10 * PRICE, PRICE, expiry, nonce, approval
            )
        failures.append(failed.value)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_it)
        with trio.fail_after(30):  # simulated, signed, sent: it waits in the pool
            pending = control.eth.get_transaction_count
            while pending(consumer.address, "pending") == sent:  # noqa: ASYNC110 - anvil's pool
                await trio.sleep(0.05)
        rpc(control, "evm_increaseTime", 300)
        rpc(control, "evm_mine")
    (failure,) = failures
    message = str(failure)
    assert f"open session: ApprovalExpired(expiry={expiry}, now=" in message
    assert "reverted in transaction 0x" in message
    assert "gas spent" in message
    assert not isinstance(failure, Unfunded)


def test_an_unfunded_wallet_is_named_with_what_it_lacks(idle: DevChain) -> None:
    chain, owner = idle.chain, idle.accounts[0]
    provider, bid = _bid(idle)
    poor: LocalAccount = Account.create()
    who = poor.address
    fund = f"fund it (p2pnode devchain --fund {who})"
    # Neither ether nor tokens: a provider's registration needs both.
    with pytest.raises(Unfunded) as none:
        chain.register_provider(poor, "12D3KooWpoor", MIN_PROVIDER_STAKE)
    assert str(none.value) == (
        f"approve: wallet {who} has 0 ether and 0 tokens, needs ether for gas and 100 tokens: "
        + fund
    )
    assert (none.value.ether, none.value.tokens) == (0, 0)
    # Tokens, no ether: a consumer's start (its one approval) has no gas. The node's
    # answer is "insufficient funds", which used to surface as a raw RPC dict.
    chain.mint(owner, who, 1000 * TOKEN)
    with pytest.raises(Unfunded) as no_gas:
        chain.approve_token(poor, 10**20, unlimited=True)
    assert str(no_gas.value) == (
        f"approve: wallet {who} has 0 ether and 1000 tokens, needs ether for gas: " + fund
    )
    assert "{" not in str(no_gas.value)
    # Ether, too few tokens for the stake: the token's own revert says so.
    send_ether(chain.w3, owner, who, TOKEN)
    chain.approve_token(poor, 10**20, unlimited=True)
    expiry = chain.next_block_time() + 60
    nonce = secrets.token_bytes(32)
    approval = chain.sign_approval(provider, bid, who, expiry, nonce)
    stake = 2000 * TOKEN
    with pytest.raises(Unfunded) as no_tokens:
        chain.open_session(poor, bid, stake, stake, expiry, nonce, approval)
    assert re.fullmatch(
        rf"open session: wallet {who} has 0\.9\d+ ether and 1000 tokens, needs 2000 tokens: "
        + re.escape(fund),
        str(no_tokens.value),
    )


async def test_a_chain_that_does_not_answer_is_one_short_line(tmp_path: Path) -> None:
    with socket.socket() as held:  # bound, never listening: refused, and nobody else's
        held.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{held.getsockname()[1]}"
        with pytest.raises(ChainError) as dead:
            await trio.to_thread.run_sync(connect, url)
    assert str(dead.value) == f"no chain answers at {url} (connection refused)"
    # A node that stops answering while the node runs: the same line, from any call.
    with run_devchain(0, tmp_path / "d.json", accounts=1, block_time_s=None) as dev:
        chain = Chain(connect(dev.url), dev.chain.deployment)
    with pytest.raises(ChainError) as gone:
        await AsyncChain(chain).run(chain.now)
    assert str(gone.value) == f"no chain answers at {dev.url} (connection refused)"
    with pytest.raises(ChainError) as unsent:
        await AsyncChain(chain).run(chain.mint, dev.accounts[0], dev.accounts[0].address, 1)
    assert str(unsent.value) == f"mint: no chain answers at {dev.url} (connection refused)"


async def test_devchain_mines_while_idle(tmp_path: Path) -> None:
    with run_devchain(0, tmp_path / "d.json", accounts=1, block_time_s=1) as dev:
        first = dev.chain.block_number()
        with trio.fail_after(20):
            # No transaction sent: only the interval mines.
            while dev.chain.block_number() == first:  # noqa: ASYNC110 - anvil's own clock
                await trio.sleep(0.1)


def test_devchain_mines_a_transaction_without_waiting_for_the_interval(tmp_path: Path) -> None:
    # One block a minute while idle; the set-up's transactions (deploy, mint) and
    # this one are each mined at once, or the receipt's bound (20 s) would run out.
    with run_devchain(0, tmp_path / "d.json", accounts=1, block_time_s=60) as dev:
        owner = dev.accounts[0]
        before = dev.chain.balance(owner.address)
        tx_hash = dev.chain.token.functions.mint(owner.address, 1).transact({"from": owner.address})
        receipt = dev.chain.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=20)
        assert receipt["status"] == 1
        assert dev.chain.balance(owner.address) == before + 1
