"""What the p2pnode command shows a person: quick to start, amounts in tokens, the
settlement of a paid run when the consumer stops, and sessions with what they paid."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from p2pnode.chain.client import Chain, Deployment
from p2pnode.chain.devchain import connect
from p2pnode.cli.settlement import ether, tokens, when
from p2pnode.p2p import identity
from p2pnode.tests.cli.helpers import (
    BOUND_S,
    PASSWORD,
    Started,
    cli,
    devchain,
    env,
    home_with_wallet,
    run,
    start,
)

MODEL = "SmolLM2-135M-Instruct"
PRICE = 10**15  # 0.001 tokens per second
CLAIM_WINDOW_S = 15 * 60

# What the everyday commands must not import: each costs 0.1-0.5 s of start-up
# (README, "Benchmarks": bench cli), and only the commands that run a node,
# talk to a chain or load a model need them.
HEAVY = (
    "libp2p",
    "web3",
    "eth_account",
    "eth_utils",
    "eth_abi",
    "eth_keys",
    "py_ecc",
    "llama_cpp",
    "trio",
    "trio_websocket",
    "hypercorn",
    "starlette",
    "httpx",
    "multiaddr",
)


def _imported(result: subprocess.CompletedProcess[str]) -> set[str]:
    """The modules a ``python -X importtime`` run imported (its stderr's table)."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


# --- start-up ---------------------------------------------------------------------


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Path, Started]]:
    """A free-mode node whose home also holds a wallet (so that `id` shows both)."""
    home = tmp_path / "n"
    wallet = identity.create_wallet(home, PASSWORD, kdf_iterations=2)
    assert wallet.address.startswith("0x")
    started = start(home, tmp_path / "n.json", "--announce-model", "demo/model")
    yield home, started
    started.proc.send_signal(signal.SIGTERM)
    started.proc.communicate(timeout=BOUND_S)


def test_everyday_commands_import_no_heavy_library(
    running: tuple[Path, Started], tmp_path: Path
) -> None:
    """--help, --version, id, status, offers, peers against a real node: each answers,
    and none imports libp2p, web3, eth-account, llama.cpp, trio or the HTTP stack.
    A top-level import of any of them in cli/ (or in what these commands import)
    fails this test."""
    home, node = running
    commands = [
        ["--help"],
        ["--version"],
        ["id"],
        ["status"],
        ["offers"],
        ["peers"],
        ["start", "--help"],
        ["session", "list", "--help"],
    ]
    found: dict[str, list[str]] = {}
    outputs: dict[str, str] = {}
    for args in commands:
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "p2pnode.cli", *args],
            env=env(home),
            capture_output=True,
            text=True,
            timeout=BOUND_S,
        )
        assert result.returncode == 0, (args, result.stderr[-2000:])
        name = " ".join(args)
        outputs[name] = result.stdout
        modules = _imported(result)
        assert "p2pnode.cli.main" in modules  # the table was read
        found[name] = _heavy(modules)
    assert found == {name: [] for name in found}
    # And they said what they are for.
    assert outputs["--version"].startswith("p2pnode, version ")
    assert "bench" in outputs["--help"]
    assert f"peer id: {node.peer_id}" in outputs["id"]
    wallet = identity.load_wallet(home)
    assert wallet is not None
    assert f"wallet:  {wallet.address}" in outputs["id"]
    assert f"peer id:   {node.peer_id}" in outputs["status"]
    assert "0 connected" in outputs["peers"]


def test_fast_identity_reads_match_libp2p_and_eth_utils(tmp_path: Path) -> None:
    """`p2pnode id` reads the peer ID and the wallet's checksummed address without
    libp2p or eth-utils: the same strings as theirs, for many keys."""
    from eth_utils.address import to_checksum_address

    for i in range(8):
        home = tmp_path / str(i)
        key_pair = identity.load_or_create_peer_key(home)
        assert identity.read_peer_id(home) == str(identity.peer_id_of(key_pair))
        wallet = identity.create_wallet(home, PASSWORD, kdf_iterations=2)
        assert identity.load_wallet(home) == wallet
        assert wallet.address == to_checksum_address(wallet.address.lower())
    # A keystore whose address is not 40 hex digits is refused as one line.
    bad = tmp_path / "bad"
    identity.load_or_create_peer_key(bad)
    identity.write_private_file(bad / identity.WALLET_FILE, b'{"address": "0xnothex"}')
    result = run(bad, "id")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"p2pnode: error: {bad / 'wallet.json'} is not an Ethereum keystore"
    )


# --- amounts and times ----------------------------------------------------------------


def test_amounts_are_tokens_and_times_are_utc_with_distance() -> None:
    assert tokens(10**15) == "0.001 tokens"
    assert tokens(6 * 10**17) == "0.6 tokens"
    assert tokens(10**18) == "1 token"
    assert tokens(0) == "0 tokens"
    assert tokens(10**24) == "1000000 tokens"
    # Exact to the last unit: sums shown add up.
    assert tokens(1) == "0.000000000000000001 tokens"
    assert tokens(999_999_999_999_999_999_999_999) == "999999.999999999999999999 tokens"
    assert ether(10 * 10**18) == "10 ether"
    t = 1_700_000_000  # 2023-11-14 22:13:20 UTC
    assert when(t, t - 240) == "2023-11-14 22:13:20 UTC (in 4 min)"
    assert when(t, t + 180) == "2023-11-14 22:13:20 UTC (3 min ago)"
    assert when(t, t - 30) == "2023-11-14 22:13:20 UTC (in 30 s)"
    assert when(t, t + 3 * 3600) == "2023-11-14 22:13:20 UTC (3 h ago)"
    assert when(t, t - 5 * 86400) == "2023-11-14 22:13:20 UTC (in 5 days)"
    assert when(t, t) == "2023-11-14 22:13:20 UTC (now)"


# --- a paid network -----------------------------------------------------------------


@dataclass
class Network:
    deployment: Path
    provider: Path
    consumer: Path
    provider_wallet: str
    consumer_wallet: str
    devchain_lines: list[str]


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    """anvil through `p2pnode devchain --fund` for a provider's and a consumer's wallet."""
    (provider, provider_wallet), (consumer, consumer_wallet) = (
        home_with_wallet(tmp_path, "provider"),
        home_with_wallet(tmp_path, "consumer"),
    )
    # One address in lower case: the devchain prints each checksummed.
    with devchain(tmp_path, provider_wallet.lower(), consumer_wallet) as dev:
        yield Network(
            dev.deployment, provider, consumer, provider_wallet, consumer_wallet, dev.lines
        )


def _stop(started: Started) -> str:
    started.proc.send_signal(signal.SIGTERM)
    out, err = started.proc.communicate(timeout=BOUND_S)
    assert started.proc.returncode == 0, err
    return out


def _wait_for_offers(home: Path, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + BOUND_S
    held: list[dict[str, object]] = []
    while len(held) < count and time.monotonic() < deadline:  # gossip is asynchronous
        held = json.loads(cli(home, "offers", "--json").stdout)
    assert len(held) == count, held
    return held


def test_a_paid_run_shows_its_settlement_in_tokens(network: Network, tmp_path: Path) -> None:
    """Registration, bids, offers, the stop summary of two consumer runs (one settled,
    one left in escrow) and `session list`, every figure checked against the chain, the
    settled one to the wei."""
    # devchain says whom it funded, with what (read back from the chain).
    for wallet in (network.provider_wallet, network.consumer_wallet):
        assert f"funded {wallet} with 1000000 tokens and 10 ether" in network.devchain_lines
    dep = ["--deployment", str(network.deployment)]
    registered = cli(network.provider, "provider", "register", *dep)
    provider_peer = identity.read_peer_id(network.provider)
    assert registered.stdout == (
        f"provider {network.provider_wallet} registered as {provider_peer}, stake 100 tokens\n"
    )
    assert "✓ register provider: tx 0x" in registered.stderr
    # A revert is one readable line.
    twice = run(network.provider, "provider", "register", *dep, P2PNODE_WALLET_PASSWORD=PASSWORD)
    assert twice.returncode == 1
    assert "AlreadyRegistered()" in twice.stderr
    # A deployment file for another chain is refused before anything is sent.
    other = tmp_path / "other.json"
    other.write_text(
        network.deployment.read_text().replace('"chain_id": 31337', '"chain_id": 8453')
    )
    wrong = run(network.provider, "wallet", "balance", "--deployment", str(other))
    assert (wrong.returncode, "wrong chain" in wrong.stderr) == (2, True)
    named = cli(network.provider, "model", "register", MODEL, *dep).stdout
    assert named.startswith(f"model {MODEL} is now registered on chain; {network.provider_wallet}")
    again = cli(network.provider, "model", "register", MODEL, *dep).stdout
    assert again.startswith(f"model {MODEL} was already registered on chain;")
    posted = cli(network.provider, "bid", "post", MODEL, "--price", str(PRICE), *dep).stdout
    assert re.fullmatch(rf"bid [0-9a-f]{{64}} on {MODEL} at 0\.001 tokens/s\n", posted)
    listed = cli(network.consumer, "bid", "list", *dep).stdout
    assert listed.split() == [listed.split()[0], "0.001", "tokens/s", provider_peer]
    balance = cli(network.consumer, "wallet", "balance", *dep).stdout
    assert balance == f"{network.consumer_wallet}: 1000000 tokens, 10 ether\n"

    where = Deployment.load(network.deployment)
    chain = Chain(connect(where.rpc_url or "", where), where)
    p0, c0 = chain.balance(network.provider_wallet), chain.balance(network.consumer_wallet)
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD)
    password_file.chmod(0o600)
    paid = [*dep, "--wallet-password-file", str(password_file)]
    provider = start(network.provider, tmp_path / "p.json", *paid, serve=True)
    consumer: Started | None = None
    bidless: Started | None = None
    try:

        def start_consumer(run: int) -> Started:
            return start(
                network.consumer, tmp_path / f"c{run}.json", *paid, "--shim", "127.0.0.1:0",
                "--bootstrap", provider.addrs[0], "--session-seconds", "600",
            )  # fmt: skip

        consumer = start_consumer(1)
        # A node that announces the model with no bid behind it (free mode).
        bidless = start(
            tmp_path / "bidless", tmp_path / "b.json", "--announce-model", MODEL,
            "--bootstrap", consumer.addrs[0],
        )  # fmt: skip
        _wait_for_offers(network.consumer, 2)
        offers = cli(network.consumer, "offers").stdout
        prices = _prices(offers)
        assert prices == {provider.peer_id: "0.001 tokens/s", bidless.peer_id: "no bid"}, offers

        def client(run: int) -> openai.OpenAI:
            url = json.loads((tmp_path / f"c{run}.json").read_text())["shim_url"]
            key = (network.consumer / "api_key").read_text().strip()
            return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=BOUND_S)

        # Run 1: two chats in one session, closed as the consumer stops.
        for _ in range(2):
            answer = client(1).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
            )
            assert answer.choices[0].message.content
        out1 = _stop(consumer)
        (first,) = chain.sessions_of(network.consumer_wallet)
        stake1 = chain.session(first).stake
        paid1, refunded1, closed_at = _settled(chain, first)
        assert stake1 == 600 * PRICE
        assert paid1 + refunded1 == stake1
        # To the wei: the seconds between the open's block and the close's, and
        # every balance and total moved by exactly that.
        assert paid1 == PRICE * (closed_at - chain.session(first).opened_at)
        assert chain.balance(network.provider_wallet) == p0 + paid1
        assert chain.balance(network.consumer_wallet) == c0 - paid1
        assert chain.totals() == (stake1, paid1, refunded1)
        assert (
            f"settled on chain: {tokens(stake1)} escrowed, {tokens(paid1)} paid to providers, "
            f"{tokens(refunded1)} refunded (1 session opened, 1 closed in this run)\n"
        ) in out1
        assert "still in escrow" not in out1
        assert out1.endswith("p2pnode stopped\n")

        # Run 2: stopped in the middle of its first answer. The session was never
        # served (no answer acknowledged): its stake stays in escrow, and the
        # summary says until when at the latest.
        consumer = start_consumer(2)
        stream = client(2).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell a long story."}],
            max_tokens=2000, stream=True,
        )  # fmt: skip
        # The first words: the session is open on chain, and its answer has begun.
        next(c for c in stream if c.choices and c.choices[0].delta.content)
        out2 = _stop(consumer)
        stream.close()
        second = next(s for s in chain.sessions_of(network.consumer_wallet) if s != first)
        held = chain.session(second)
        assert held.open
        back = when(held.ends_at + CLAIM_WINDOW_S, time.time()).split(" (")[0]
        assert (
            f"settled on chain: {tokens(held.stake)} escrowed, 0 tokens paid to providers, "
            f"0 tokens refunded (1 session opened, 0 closed in this run)\n"
        ) in out2
        assert (
            f"still in escrow: {tokens(held.stake)} in session {second.hex()[:16]}…, "
            f"back by {back} (in 2"
        ) in out2  # 10 minutes of session plus 15 of claim window: "in 25 min"

        # session list: the open one first, paid and refunded once closed, human times.
        table = cli(network.consumer, "session", "list", *dep).stdout.splitlines()
        assert table[0].split() == [
            "session", "state", "role", "stake", "price", "paid", "refunded", "ends"
        ]  # fmt: skip
        assert table[1].split()[:10] == [
            second.hex()[:16] + "…", "open", "consumer", "0.6", "tokens", "0.001", "tokens/s",
            "-", "-", when(held.ends_at).split()[0],
        ]  # fmt: skip
        assert table[1].endswith("min)")
        assert table[2].split()[:11] == [
            first.hex()[:16] + "…", "closed", "consumer", "0.6", "tokens", "0.001", "tokens/s",
            *tokens(paid1).split(), *tokens(refunded1).split(),
        ]  # fmt: skip
        # Closed early: its planned end is still ahead, and will never come.
        assert table[2].endswith(
            f"{when(chain.session(first).ends_at).split(' (')[0]} (closed before then)"
        )
        rows_json = json.loads(cli(network.consumer, "session", "list", "--json", *dep).stdout)
        assert [
            (r["session_id"], r["open"], r["role"], r["stake"], r["price_per_s"], r["paid"],
             r["refunded"], r["ends_at"])
            for r in rows_json
        ] == [
            (second.hex(), True, "consumer", held.stake, PRICE, None, None, held.ends_at),
            (first.hex(), False, "consumer", stake1, PRICE, paid1, refunded1,
             chain.session(first).ends_at),
        ]  # fmt: skip
        assert rows_json[0]["ends_at_utc"] == time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(held.ends_at)
        )
        # The provider's side of the same sessions.
        served = json.loads(cli(network.provider, "session", "list", "--json", *dep).stdout)
        assert {(r["session_id"], r["role"]) for r in served} == {
            (first.hex(), "provider"),
            (second.hex(), "provider"),
        }
        # A provider that consumed nothing says nothing about it when it stops.
        assert "settled on chain" not in _stop(provider)
    finally:
        for started in (consumer, bidless, provider):
            if started is not None and started.proc.poll() is None:
                started.proc.send_signal(signal.SIGTERM)
                started.proc.communicate(timeout=BOUND_S)


def _prices(offers: str) -> dict[str, str]:
    """Peer id -> the price `p2pnode offers` shows for its (one) model."""
    prices: dict[str, str] = {}
    peer = ""
    for line in offers.splitlines():
        if not line.startswith(" "):
            peer = line.split()[0]
        else:
            prices[peer] = line.strip().split("  ")[2]  # model, ctx, price, speed
    return prices


def _settled(chain: Chain, session_id: bytes) -> tuple[int, int, int]:
    """(paid, refunded, the close's block time) of a closed session, from its
    SessionClosed event."""
    logs = chain.market.events.SessionClosed().get_logs(from_block=0)
    (closed,) = [log for log in logs if bytes(log["args"]["sessionId"]) == session_id]
    closed_at = int(chain.w3.eth.get_block(closed["blockNumber"])["timestamp"])
    return int(closed["args"]["paid"]), int(closed["args"]["refunded"]), closed_at
