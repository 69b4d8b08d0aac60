"""Commands for the marketplace on chain: devchain, provider, model, bid, session, wallet.

Each write prints what it sends and, once mined, its transaction hash and
gas; a revert prints the contract's reason (``StakeTooLow(minimum=…)``), a
missing allowance or balance says so, and a deployment for another chain is
refused before anything is sent. Amounts of tokens given are whole tokens (18
decimals, so ``--stake 100`` is 100 × 10^18 of the smallest unit); prices are
in the smallest unit per second. Amounts shown are in tokens (a price as
``0.001 tokens/s``); ``--json`` keeps the smallest unit.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from p2pnode.chain.units import format_price, parse_tokens
from p2pnode.cli import app, progress, settings
from p2pnode.cli.settings import option
from p2pnode.cli.settlement import ether as show_ether
from p2pnode.cli.settlement import tokens as show_tokens
from p2pnode.errors import ConfigError, P2PNodeError

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

DEPLOYMENT_FILE = "deployment.json"


def chain_options(func: Any) -> Any:
    """--chain and --deployment, shared by every command that talks to a chain."""
    func = option(
        "--deployment",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Deployment file (chain id, contract addresses; default $HOME/deployment.json).",
    )(func)
    return option(
        "--chain",
        "chain_url",
        default=None,
        metavar="URL",
        help="JSON-RPC URL of the chain (default: the deployment file's).",
    )(func)


def deployment_path(deployment: Path | None) -> Path:
    return deployment if deployment is not None else app.home() / DEPLOYMENT_FILE


def open_chain(chain_url: str | None, deployment: Path | None) -> Any:
    """The Chain for --chain/--deployment (checked: the right chain id)."""
    from p2pnode.chain.client import Chain, Deployment
    from p2pnode.chain.devchain import connect

    dep = Deployment.load(deployment_path(deployment))
    url = chain_url or dep.rpc_url
    if not url:
        raise ConfigError("no chain URL: give --chain or a deployment file with rpc_url")
    return Chain(connect(url, dep), dep)


def wallet_account(password_file: Path | None) -> LocalAccount:
    """This node's wallet, unlocked."""
    from eth_account import Account

    from p2pnode.p2p import identity

    home = app.home()
    wallet = identity.load_wallet(home)
    if wallet is None:
        raise ConfigError(f"no wallet in {home}: run 'p2pnode init'")
    password = settings.wallet_password(password_file, confirm=False, interactive=True)
    if password is None:
        raise ConfigError("the wallet passphrase is needed: --wallet-password-file or a prompt")
    account: LocalAccount = Account.from_key(wallet.unlock(password))
    return account


def _send(what: str, fn: Any, *args: Any) -> Any:
    click.echo(f"→ {what} …", err=True)
    tx = fn(*args)
    if tx is not None:
        click.echo(f"✓ {what}: tx {tx.tx_hash} (gas {tx.gas_used})", err=True)
    return tx


def _guard(fn: Any) -> Any:
    try:
        return fn()
    except P2PNodeError as exc:
        app.fail(exc)


# --- devchain ---------------------------------------------------------------------


@app.main.command()
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8545,
    show_default=True,
    help="Port of its JSON-RPC on 127.0.0.1 (0: any free one; the ready line says which).",
)
@click.option("--accounts", type=click.IntRange(1, 100), default=10, show_default=True)
@click.option(
    "--fund", multiple=True, default=[], help="Also fund this address with tokens and ether."
)
@click.option(
    "--deployment",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the deployment file (default $HOME/deployment.json).",
)
def devchain(port: int, accounts: int, fund: tuple[str, ...], deployment: Path | None) -> None:
    """Run anvil on 127.0.0.1, deploy the contracts, fund accounts, until Ctrl-C."""
    from p2pnode.chain.devchain import run_devchain

    path = deployment_path(deployment)
    path.parent.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        with (
            progress.progress("devchain", total=3) as steps,
            run_devchain(port, path, accounts=accounts, fund=fund, told=steps.step) as dev,
        ):
            dep = dev.chain.deployment
            click.echo(f"devchain ready: {dev.url} (chain id {dep.chain_id})")
            click.echo(f"token {dep.token}  marketplace {dep.marketplace}")
            click.echo(f"deployment file: {path}")
            for a in dev.accounts[:3]:
                click.echo(f"funded dev account {a.address} key {a.key.hex()}")
            for address in fund:
                # Read back, not assumed: what the chain holds for each address asked for.
                token, ether = dev.chain.balance(address), dev.chain.eth_balance(address)
                click.echo(
                    f"funded {dev.chain.w3.to_checksum_address(address)} with "
                    f"{show_tokens(token)} and {show_ether(ether)}"
                )
            stop.wait()
    except P2PNodeError as exc:
        app.fail(exc)
    click.echo("devchain stopped")


# --- deploy -----------------------------------------------------------------------


@app.main.command("deploy")
@click.option("--chain", "chain_url", required=True, help="JSON-RPC URL of the chain.")
@click.option(
    "--token",
    default=None,
    help="An ERC-20 on that chain to price and pay in (default: deploy the dev token, "
    "which the deployer owns and can mint: for test networks only).",
)
@click.option(
    "--min-provider-stake",
    default=None,
    help="Whole tokens a provider stakes at least (default: 100).",
)
@click.option(
    "--deployment",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the deployment file (default $HOME/deployment.json).",
)
@app.password_file
def deploy_cmd(
    chain_url: str,
    token: str | None,
    min_provider_stake: str | None,
    deployment: Path | None,
    wallet_password_file: Path | None,
) -> None:
    """Deploy the committed contracts with this node's wallet; write the deployment file.

    Every other command (start --paid, provider, model, bid, session) then
    reads that file. The wallet pays the gas.
    """
    from p2pnode.chain.client import deploy
    from p2pnode.chain.devchain import connect
    from p2pnode.chain.embedded import MIN_PROVIDER_STAKE

    path = deployment_path(deployment)

    def run() -> None:
        account = wallet_account(wallet_password_file)
        stake = parse_tokens(min_provider_stake) if min_provider_stake else MIN_PROVIDER_STAKE
        w3 = connect(chain_url)
        if int(w3.eth.get_balance(account.address)) == 0:
            raise ConfigError(f"the wallet {account.address} has no ether for gas on {chain_url}")
        with progress.progress("deploying", total=2) as steps:
            chain = deploy(w3, account, stake, chain_url, token=token, told=steps.step)
        path.parent.mkdir(parents=True, exist_ok=True)
        chain.deployment.save(path)
        dep = chain.deployment
        click.echo(f"deployed on chain {dep.chain_id}: marketplace {dep.marketplace}")
        click.echo(f"token {dep.token}" + ("" if token else " (the dev token; you can mint it)"))
        click.echo(f"deployment file: {path}")

    _guard(run)


# --- provider / model / bid ------------------------------------------------------


@app.main.group()
def provider() -> None:
    """Register this node as a provider on chain (with its peer ID), update, leave."""


@provider.command("register")
@click.option("--stake", default=None, help="Whole tokens (default: the minimum).")
@chain_options
@app.password_file
def provider_register(
    stake: str | None, chain_url: str | None, deployment: Path | None,
    wallet_password_file: Path | None,
) -> None:  # fmt: skip
    """Register with this node's peer ID (never an address) and a stake."""
    from p2pnode.p2p import identity

    def run() -> None:
        chain = open_chain(chain_url, deployment)
        account = wallet_account(wallet_password_file)
        peer_id = str(identity.peer_id_of(identity.load_or_create_peer_key(app.home())))
        amount = parse_tokens(stake) if stake else chain.min_provider_stake()
        _send("register provider", chain.register_provider, account, peer_id, amount)
        click.echo(
            f"provider {account.address} registered as {peer_id}, stake {show_tokens(amount)}"
        )

    _guard(run)


@provider.command("update")
@click.option("--add-stake", default="0", help="Whole tokens to add.")
@chain_options
@app.password_file
def provider_update(
    add_stake: str, chain_url: str | None, deployment: Path | None,
    wallet_password_file: Path | None,
) -> None:  # fmt: skip
    """Re-announce this node's peer ID and/or add stake."""
    from p2pnode.p2p import identity

    def run() -> None:
        chain = open_chain(chain_url, deployment)
        account = wallet_account(wallet_password_file)
        peer_id = str(identity.peer_id_of(identity.load_or_create_peer_key(app.home())))
        _send("update provider", chain.update_provider, account, peer_id, parse_tokens(add_stake))
        stake = chain.provider(account.address)[1]
        click.echo(f"provider {account.address} is {peer_id}, stake {show_tokens(stake)}")

    _guard(run)


@provider.command("deregister")
@chain_options
@app.password_file
def provider_deregister(
    chain_url: str | None, deployment: Path | None, wallet_password_file: Path | None
) -> None:
    """Leave the registry; the stake comes back (only with no session open)."""

    def run() -> None:
        chain = open_chain(chain_url, deployment)
        account = wallet_account(wallet_password_file)
        stake = chain.provider(account.address)[1]
        _send("deregister provider", chain.deregister_provider, account)
        click.echo(f"provider {account.address} deregistered, {show_tokens(stake)} returned")

    _guard(run)


@app.main.group()
def model() -> None:
    """Model names on chain, and the GGUF file this provider serves each from."""


@model.command("register")
@click.argument("model_id")
@click.option("--gguf", type=click.Path(dir_okay=False, path_type=Path), default=None)
@chain_options
@app.password_file
def model_register(
    model_id: str, gguf: Path | None, chain_url: str | None, deployment: Path | None,
    wallet_password_file: Path | None,
) -> None:  # fmt: skip
    """Register MODEL_ID and declare the GGUF file this wallet serves it from (its sha256;
    default: the bundled model's). Bids posted from now on carry it. A name already
    registered by someone else is fine: the declaration is this wallet's own."""
    from p2pnode.inference import llamacpp

    def run() -> None:
        chain = open_chain(chain_url, deployment)
        path = gguf or llamacpp.bundled_model_path()
        sha = llamacpp.file_sha256(path)
        account = wallet_account(wallet_password_file)
        named = chain.model_registered(model_id)
        _send(f"register model {model_id}", chain.register_model, account, model_id, sha)
        click.echo(
            f"model {model_id} {'was already' if named else 'is now'} registered on chain;"
            f" {account.address} serves it from GGUF sha256 {sha} (its bids carry this file)"
        )

    _guard(run)


@app.main.group()
def bid() -> None:
    """Bids: one live bid per provider and model, priced per second."""


@bid.command("post")
@click.argument("model_id")
@click.option("--price", type=click.IntRange(1), required=True, help="Smallest units per second.")
@chain_options
@app.password_file
def bid_post(
    model_id: str, price: int, chain_url: str | None, deployment: Path | None,
    wallet_password_file: Path | None,
) -> None:  # fmt: skip
    """Post (or re-price, at no fee) this provider's bid for MODEL_ID, carrying the GGUF
    file declared with 'p2pnode model register'."""

    def run() -> None:
        chain = open_chain(chain_url, deployment)
        account = wallet_account(wallet_password_file)
        if chain.declared_gguf(account.address, model_id) is None:
            click.echo(f"note: no GGUF declared for {model_id} (p2pnode model register)", err=True)
        tx = _send(f"post bid on {model_id}", chain.post_bid, account, model_id, price)
        click.echo(f"bid {tx.value.hex()} on {model_id} at {format_price(price)}")

    _guard(run)


@bid.command("delete")
@click.argument("bid_id")
@chain_options
@app.password_file
def bid_delete(
    bid_id: str, chain_url: str | None, deployment: Path | None, wallet_password_file: Path | None
) -> None:
    """Withdraw a bid (open sessions keep their terms)."""

    def run() -> None:
        chain = open_chain(chain_url, deployment)
        account = wallet_account(wallet_password_file)
        _send("delete bid", chain.delete_bid, account, bytes.fromhex(bid_id.removeprefix("0x")))
        click.echo(f"bid {bid_id.removeprefix('0x')} deleted (open sessions keep their terms)")

    _guard(run)


@bid.command("list")
@click.option("--json", "as_json", is_flag=True)
@chain_options
def bid_list(as_json: bool, chain_url: str | None, deployment: Path | None) -> None:
    """Live bids on the chain (from BidPosted events)."""

    def run() -> None:
        chain = open_chain(chain_url, deployment)
        seen: dict[bytes, Any] = {}
        for log in chain.market.events.BidPosted().get_logs(from_block=0):
            seen[bytes(log["args"]["bidId"])] = log["args"]
        rows = []
        for bid_id in seen:
            b = chain.bid(bid_id)
            if b.live:
                peer_id = chain.provider(b.provider)[0]
                rows.append(
                    {"bid_id": bid_id.hex(), "provider": b.provider, "peer_id": peer_id,
                     "model": b.model.hex(), "gguf_sha256": b.gguf_sha256,
                     "price_per_s": b.price_per_s}
                )  # fmt: skip
        if as_json:
            click.echo(json.dumps(rows))
            return
        for r in rows:
            click.echo(f"{r['bid_id'][:16]}…  {format_price(r['price_per_s'])}  {r['peer_id']}")
        if not rows:
            click.echo("no live bids")

    _guard(run)


# --- sessions and the wallet -----------------------------------------------------


@app.main.group()
def session() -> None:
    """Paid sessions this wallet opened or serves."""


@session.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (amounts in the smallest unit).")
@chain_options
@app.password_file
def session_list(
    as_json: bool, chain_url: str | None, deployment: Path | None,
    wallet_password_file: Path | None,  # accepted as before; the address needs no passphrase
) -> None:  # fmt: skip
    """Sessions of this wallet (as consumer or provider), open first: stake, price, what
    each paid and refunded once closed, and when it ends."""
    from p2pnode.cli.settlement import history, session_lines
    from p2pnode.p2p import identity

    def run() -> None:
        chain = open_chain(chain_url, deployment)
        wallet = identity.load_wallet(app.home())
        if wallet is None:
            raise ConfigError("no wallet: run 'p2pnode init'")
        records = history(chain, wallet.address)
        if as_json:
            rows = [r.to_json(wallet.address) for r in records]
            click.echo(json.dumps(sorted(rows, key=lambda r: not r["open"])))
            return
        if not records:
            click.echo("no sessions")
            return
        for line in session_lines(records, wallet.address, time.time()):
            click.echo(line)

    _guard(run)


@session.command("close")
@click.argument("session_id")
@chain_options
@app.password_file
def session_close(
    session_id: str, chain_url: str | None, deployment: Path | None,
    wallet_password_file: Path | None,
) -> None:  # fmt: skip
    """Close a session you opened, before its end (the provider is paid the seconds
    elapsed, the rest comes back), or anyone's after its end plus the claim window
    (its provider did not claim it: paid 0). Providers settle with their claim."""

    def run() -> None:
        chain = open_chain(chain_url, deployment)
        account = wallet_account(wallet_password_file)
        sid = bytes.fromhex(session_id.removeprefix("0x"))
        tx = _send("close session", chain.close_session, account, sid)
        paid, refunded = tx.value
        click.echo(f"session closed: {show_tokens(paid)} paid, {show_tokens(refunded)} refunded")

    _guard(run)


@app.main.group()
def wallet() -> None:
    """This node's wallet on chain."""


@wallet.command("balance")
@click.option("--address", default=None, help="Another address (default: this node's wallet).")
@click.option("--json", "as_json", is_flag=True)
@chain_options
def wallet_balance(
    address: str | None, as_json: bool, chain_url: str | None, deployment: Path | None
) -> None:
    """Token and ether balances."""
    from p2pnode.p2p import identity

    def run() -> None:
        chain = open_chain(chain_url, deployment)
        who = address
        if who is None:
            found = identity.load_wallet(app.home())
            if found is None:
                raise ConfigError("no wallet: run 'p2pnode init' or give --address")
            who = found.address
        token, ether = chain.balance(who), chain.eth_balance(who)
        if as_json:
            click.echo(json.dumps({"address": who, "token": token, "ether": ether}))
            return
        click.echo(f"{who}: {show_tokens(token)}, {show_ether(ether)}")

    _guard(run)
