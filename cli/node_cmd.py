"""The node's commands: init, id, start, generate, chat, status, offers, peers."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any

import click

from p2pnode.cli import app, options, progress, settings
from p2pnode.cli.settings import option
from p2pnode.errors import ConfigError, NetworkError, P2PNodeError

logger = logging.getLogger("p2pnode.cli")


# --- identity -------------------------------------------------------------


@app.main.command()
@app.password_file
def init(wallet_password_file: Path | None) -> None:
    """Create the home directory, peer key, wallet and a config.toml template."""
    from p2pnode.p2p import identity

    home = app.home()
    try:
        key_pair = identity.load_or_create_peer_key(home)
        wallet = identity.load_wallet(home)
        if wallet is None:
            password = settings.wallet_password(
                wallet_password_file, confirm=True, interactive=True
            )
            if password is None:
                raise ConfigError(
                    "no wallet passphrase: set P2PNODE_WALLET_PASSWORD, pass "
                    "--wallet-password-file, or run in a terminal"
                )
            wallet = identity.create_wallet(home, password)
        settings.write_config_template(home)
    except P2PNodeError as exc:
        app.fail(exc)
    click.echo(f"home:    {home}")
    click.echo(f"peer id: {identity.peer_id_of(key_pair)}")
    click.echo(f"wallet:  {wallet.address}")


@app.main.command("id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_id(as_json: bool) -> None:
    """Print this node's peer ID and wallet address."""
    from p2pnode.p2p import identity

    home = app.home()
    try:
        if not (home / identity.PEER_KEY_FILE).exists():
            raise ConfigError(f"no identity in {home}: run 'p2pnode init' or 'p2pnode start'")
        peer_id = identity.read_peer_id(home)
        wallet = identity.load_wallet(home)
    except P2PNodeError as exc:
        app.fail(exc)
    address = wallet.address if wallet else None
    if as_json:
        click.echo(json.dumps({"peer_id": peer_id, "wallet": address}))
    else:
        click.echo(f"peer id: {peer_id}")
        click.echo(f"wallet:  {address or '(none: run p2pnode init)'}")


# --- the node ---------------------------------------------------------------


@app.main.command()
@option(
    "--listen",
    multiple=True,
    default=["/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4002/ws"],
    show_default=True,
    help="Multiaddr to listen on (repeatable). Port 0 picks a free port.",
)
@option("--bootstrap", multiple=True, default=[], help="Peer to join through (repeatable).")
@option(
    "--ready-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help='Write {"peer_id", "addrs", "shim_url"} as JSON here once the node is ready.',
)
@option("--no-serve", is_flag=True, default=False, help="Consumer only: serve no model.")
@app.serving_options
@option(
    "--announce-model",
    multiple=True,
    default=[],
    help="Announce this model id without serving it (testing discovery; repeatable).",
)
@option(
    "--shim",
    default=None,
    metavar="HOST:PORT",
    help="Serve the OpenAI-compatible API here (e.g. 127.0.0.1:8080); key in $HOME/api_key.",
)
@option(
    "--shim-allow-remote",
    is_flag=True,
    default=False,
    help="Let --shim listen on a non-loopback address (logs a warning; plain HTTP).",
)
@option(
    "--shim-max-in-flight",
    type=click.IntRange(1, 10000),
    default=32,
    show_default=True,
    help="Requests the OpenAI API handles at once; more get 429 with Retry-After.",
)
@option(
    "--allow",
    multiple=True,
    default=[],
    help="Serve only these peer IDs or wallets (repeatable; default: anyone).",
)
@option(
    "--rate-limit",
    type=click.IntRange(1),
    default=600,
    show_default=True,
    help="Sessions + requests per consumer per minute.",
)
@option(
    "--chain",
    "chain_url",
    default=None,
    metavar="URL",
    help="Paid mode: the chain's JSON-RPC URL (with --deployment; default: free mode).",
)
@option(
    "--deployment",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Paid mode: the deployment file (chain id, contract addresses).",
)
@option(
    "--spend-limit",
    default="100",
    show_default=True,
    help="Paid mode, consumer: most tokens escrowed at once over all open sessions.",
)
@option(
    "--session-seconds",
    type=click.IntRange(1),
    default=600,
    show_default=True,
    help="Paid mode, consumer: the time one session's stake buys.",
)
@option(
    "--max-price",
    type=click.IntRange(1),
    default=10**18,
    show_default=True,
    help="Paid mode, consumer: highest price accepted (smallest units per second).",
)
@option(
    "--audit-rate",
    type=click.FloatRange(0, 1),
    default=0.05,
    show_default=True,
    help="Consumer: share of answers audited beyond each provider's first (0 to 1).",
)
@option(
    "--no-remote-audits",
    is_flag=True,
    default=False,
    help="Consumer: audit only with weights this node holds; never show a prompt to "
    "another provider for an audit.",
)
@option(
    "--reachability",
    type=click.Choice(["auto", "public", "private"]),
    default="auto",
    show_default=True,
    help="Whether peers can dial this node: measured by dial-back (auto), or as told.",
)
@option(
    "--reachability-first-s",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="Seconds after start before the first reachability check.",
)
@option(
    "--relay-service",
    is_flag=True,
    default=False,
    help="Relay for private nodes (circuit relay v2, with limits).",
)
@option(
    "--relay",
    "relays",
    multiple=True,
    default=[],
    help="Relay to reserve on when this node is private (full multiaddr; repeatable).",
)
@option(
    "--relay-max-reservations",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="Relay service: reservations held at once (one per peer, while it stays connected).",
)
@option(
    "--relay-max-circuits",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Relay service: relayed connections open at once, over all peers.",
)
@option(
    "--relay-max-circuits-per-peer",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="Relay service: relayed connections one peer takes part in at once (either end).",
)
@option(
    "--relay-circuit-seconds",
    type=click.IntRange(1),
    default=3600,
    show_default=True,
    help="Relay service: how long one relayed connection may last (idle or not).",
)
@option(
    "--relay-circuit-mib",
    type=click.IntRange(1),
    default=1024,
    show_default=True,
    help="Relay service: MiB one relayed connection may carry (both ways).",
)
@option(
    "--relay-total-mib",
    type=click.IntRange(1),
    default=4096,
    show_default=True,
    help="Relay service: MiB relayed over all connections per --relay-total-seconds; once"
    " spent, connections are cut and new ones refused until the window restarts.",
)
@option(
    "--relay-total-seconds",
    type=click.IntRange(1),
    default=3600,
    show_default=True,
    help="Relay service: the window --relay-total-mib is counted over.",
)
@option(
    "--dialback-per-minute",
    type=click.IntRange(1),
    default=60,
    show_default=True,
    help="Reachability checks (dial-backs) this node does for others per minute, overall.",
)
@option(
    "--dialback-per-peer-per-minute",
    type=click.IntRange(1),
    default=6,
    show_default=True,
    help="Reachability checks (dial-backs) this node does per minute for one peer.",
)
@option(
    "--no-hole-punch",
    is_flag=True,
    default=False,
    help="Keep relayed connections relayed (no DCUtR upgrade to direct ones).",
)
@app.password_file
def start(
    ready_file: Path | None,
    no_serve: bool,
    shim: str | None,
    shim_allow_remote: bool,
    shim_max_in_flight: int,
    chain_url: str | None,
    deployment: Path | None,
    wallet_password_file: Path | None,
    **flags: Any,
) -> None:
    """Run a node until Ctrl-C or SIGTERM (serving the bundled model unless --no-serve)."""
    import trio

    from p2pnode import __version__
    from p2pnode.cli.settlement import next_block, print_settlement
    from p2pnode.inference import dashboard, keys, openai_api
    from p2pnode.inference.serving import open_engines
    from p2pnode.p2p import identity
    from p2pnode.p2p.node import freeze_startup_heap, open_node

    home = app.home()
    node_options = options.NodeOptions.take(flags)
    paid_options = options.PaidOptions.take(flags)  # the rest say what it serves
    try:
        key_pair = identity.load_or_create_peer_key(home)
        if identity.load_wallet(home) is None:
            password = settings.wallet_password(
                wallet_password_file, confirm=False, interactive=False
            )
            if password is not None:
                identity.create_wallet(home, password)
            else:
                logger.info("no wallet yet (free mode works without one): run 'p2pnode init'")
        serving = options.serving(no_serve=no_serve, **flags)
        paid = terms = None
        if chain_url is not None or deployment is not None:
            from p2pnode.chain.client import AsyncChain
            from p2pnode.cli import chain_cmd
            from p2pnode.p2p import market

            paid = market.Wallet(
                AsyncChain(chain_cmd.open_chain(chain_url, deployment)),
                chain_cmd.wallet_account(wallet_password_file),
            )
            terms = paid_options.terms(home / "sessions.db")
        config = node_options.node_config(home / app.CONTROL_SOCKET, terms, home / "audits.json")
        shim_config = openai_api.Config(
            max_in_flight=shim_max_in_flight, allow_remote=shim_allow_remote
        )
        if shim is not None:  # before anything starts: a refused address is a config error
            openai_api.check_listen(shim, allow_remote=shim_allow_remote)
        api_key = identity.load_or_create_api_key(home) if shim else None
        # Team keys read (and checked) before anything starts: a broken keys.json
        # or key_usage.json is a configuration error, not a failure mid-run.
        ring = keys.KeyRing(home) if shim else None
        if ring is not None:
            keys.read_keys(home)
    except P2PNodeError as exc:
        app.fail(exc)

    async def run() -> None:
        # Paid mode: where this run starts on chain, for the settlement printed at stop.
        since = await paid.chain.run(next_block, paid.chain.sync) if paid is not None else 0
        models = len(serving.llamacpp) + len(serving.upstream)
        loading: AbstractContextManager[progress.Steps | None] = (
            progress.progress("loading models", models, background=True)
            if models
            else contextlib.nullcontext(None)
        )
        # A bar stops at its last step, or here if a load failed before it.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals, loading as steps:
            loaded = steps.step if steps is not None else _quiet
            async with (
                open_engines(serving, told=loaded) as engines,
                open_node(config, key_pair=key_pair, engines=engines, wallet=paid) as node,
                trio.open_nursery() as nursery,
            ):
                shim_url, base = None, ""
                logins = dashboard.Login()
                if shim is not None and api_key is not None:
                    shim_url = await nursery.start(
                        partial(openai_api.serve, logins=logins, ring=ring),
                        node,
                        api_key,
                        shim,
                        shim_config,
                    )
                    base = dashboard.local_base(shim_url)
                    node.control.more["dashboard"] = lambda _r: {"link": logins.new_link(base)}
                else:
                    node.control.more["dashboard"] = lambda _r: {
                        "error": "this node serves no dashboard: start it with --shim"
                    }
                if node.offering.engines and config.measure_tokens > 0:
                    nursery.start_soon(_tell_measured, node)
                # What is up now lives as long as the process: later full
                # collections need not walk it (docs/performance.md#garbage-collection).
                freeze_startup_heap()
                # The file first, then the line: whoever waits on either sees both.
                if ready_file is not None:
                    ready = {"peer_id": node.peer_id, "addrs": node.addrs, "shim_url": shim_url}
                    await trio.to_thread.run_sync(app.write_json_atomically, ready_file, ready)
                click.echo(f"p2pnode {__version__} ready")
                click.echo(f"peer id: {node.peer_id}")
                for addr in node.addrs:
                    click.echo(f"listening: {addr}")
                if node_options.relay_service:
                    click.echo(node_options.relay_summary())
                for model in node.offering.models:
                    click.echo(f"serving: {model.model_id}")
                if shim_url is not None:
                    click.echo(f"openai api: {shim_url} (key: {home / identity.API_KEY_FILE})")
                    # Good once; `p2pnode dashboard` prints another.
                    click.echo(f"dashboard: {logins.new_link(base)}")
                if paid is not None:
                    click.echo(f"paid mode: wallet {paid.account.address}")
                try:
                    async for signum in signals:
                        logger.info("%s: stopping", signal.Signals(signum).name)
                        break
                finally:
                    if ready_file is not None:
                        await trio.to_thread.run_sync(partial(ready_file.unlink, missing_ok=True))
                    nursery.cancel_scope.cancel()  # the shim
        # The node has closed what it could (open_node's exit): the chain has the rest.
        if paid is not None:
            # A provider's node also consumes, but says so only if it did.
            await print_settlement(paid.chain, paid.account.address, since, if_none=no_serve)
        click.echo("p2pnode stopped")

    app.run_async(run)


@app.main.command()
@click.option("--prompt", required=True, help="What to ask (sent as a chat message).")
@click.option("--max-tokens", type=click.IntRange(1, 32768), default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@app.serving_options
def generate(prompt: str, max_tokens: int, temperature: float, **serving_flags: Any) -> None:
    """Generate once with this machine's engine and print the text and tokens/s."""
    import trio

    from p2pnode.inference.engine import ChatMessage, Params, Request
    from p2pnode.inference.serving import open_engines

    try:
        serving = options.serving(no_serve=False, **serving_flags)
    except P2PNodeError as exc:
        app.fail(exc)

    async def run() -> None:
        async with open_engines(serving) as engines:
            engine = engines[0]
            model = engine.models()[0].model_id
            request = Request(
                model_id=model,
                kind="chat",
                messages=(ChatMessage(role="user", content=prompt),),
                params=Params(max_tokens=max_tokens, temperature=temperature),
            )
            start, first, tokens = trio.current_time(), None, 0
            async with engine.stream(request) as chunks:
                async for chunk in chunks:
                    if chunk.text:
                        first = first if first is not None else trio.current_time()
                        tokens += chunk.tokens
                        click.echo(chunk.text, nl=False)
            end = trio.current_time()
            click.echo()
            speed = (tokens - 1) / (end - first) if first is not None and tokens > 1 else 0.0
            ttft = (first - start) * 1000 if first is not None else 0.0
            click.echo(
                f"[{model}: {tokens} tokens, {speed:.1f} tokens/s, first token {ttft:.0f} ms]",
                err=True,
            )

    app.run_async(run)


@app.main.command()
@click.option(
    "--url",
    default="http://127.0.0.1:8080/v1",
    show_default=True,
    help="The local node's OpenAI API (start it with --shim).",
)
@click.option("--model", default=None, help="Model id (default: the first the node lists).")
@click.option("--max-tokens", type=click.IntRange(1, 32768), default=512, show_default=True)
@click.option(
    "--temperature",
    type=click.FloatRange(0.0, 2.0),
    default=None,
    help="Sampling temperature (default: the model's recommended, else 0.7).",
)
@click.option("--system", default=None, help="A system message to start the chat with.")
def chat(
    url: str, model: str | None, max_tokens: int, temperature: float | None, system: str | None
) -> None:
    """Chat in the terminal through the local node (streaming; empty line or Ctrl-D ends)."""
    import httpx
    import trio

    from p2pnode.inference import upstream
    from p2pnode.inference.engine import ChatMessage, Params, Request
    from p2pnode.p2p import identity

    try:
        key = identity.load_or_create_api_key(app.home())
    except P2PNodeError as exc:
        app.fail(exc)

    async def pick_model() -> dict[str, Any]:
        """The model object of ``--model``, else of the first model the node lists."""
        headers = {"Authorization": f"Bearer {key}"}
        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                answer = await client.get(url.rstrip("/") + "/models", headers=headers)
        except httpx.HTTPError as exc:
            raise NetworkError(f"no node answers at {url} (start one with --shim): {exc}") from exc
        if answer.status_code != 200:
            raise NetworkError(f"{url}: {answer.status_code} {answer.text[:200]}")
        models = [m for m in answer.json().get("data", []) if model is None or m["id"] == model]
        if model is not None and not models:
            return {"id": model}  # not listed yet: the node looks it up when asked
        if not models:
            raise NetworkError("the node knows no model yet (no provider found)")
        return dict(models[0])

    async def run() -> None:
        picked = await pick_model()
        chosen = str(picked["id"])
        recommended = picked.get("recommended_sampling") or {}
        given = recommended.get("temperature") if temperature is None else temperature
        top_p = recommended.get("top_p")
        sampling = Params(
            max_tokens=max_tokens,
            temperature=0.7 if given is None else float(given),
            top_p=Params().top_p if top_p is None else float(top_p),
        )
        history = [ChatMessage(role="system", content=system)] if system else []
        click.echo(f"chatting with {chosen} through {url} (empty line to end)", err=True)
        cfg = upstream.Config(base_url=url, models=(chosen,), api_key=key, slots=1)
        async with upstream.open_upstream(cfg) as engine:
            while True:
                line = await trio.to_thread.run_sync(_prompt_line)
                if not line:
                    return
                history.append(ChatMessage(role="user", content=line))
                request = Request(
                    model_id=chosen,
                    kind="chat",
                    messages=tuple(history),
                    params=sampling,
                )
                parts = []
                async with engine.stream(request) as chunks:
                    async for chunk in chunks:
                        parts.append(chunk.text)
                        click.echo(chunk.text, nl=False)
                click.echo()
                history.append(ChatMessage(role="assistant", content="".join(parts)))

    try:
        app.run_async(run)
    except KeyboardInterrupt:
        click.echo()


def _prompt_line() -> str:
    try:
        return input("> ").strip()
    except EOFError:
        return ""


@app.main.command()
@click.option(
    "--peer",
    default=None,
    help="Full multiaddr of a node to ask over the network (default: the running node).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(peer: str | None, as_json: bool) -> None:
    """Show the running node's status, or ask any node for its own."""
    from p2pnode.protocols.status import StatusResponse

    audits: dict[str, int] = {}
    if peer is None:
        raw = _ask_node({"op": "status"})
        answer = StatusResponse.from_wire(raw)
        audits = raw.get("audits") or {}
    else:
        from libp2p.crypto.ed25519 import create_new_key_pair

        from p2pnode.p2p.node import NodeConfig, open_node

        async def run() -> StatusResponse:
            client = NodeConfig(discovery=None)  # ask and leave: no DHT, no gossip
            async with open_node(client, key_pair=create_new_key_pair()) as node:
                return await node.finder.status_of(peer)

        answer = app.run_async(run)
    if as_json:
        extra = {"audits": audits} if peer is None else {}
        click.echo(json.dumps(answer.to_wire() | {"t": None} | extra, default=str))
        return
    click.echo(f"peer id:   {answer.peer_id}")
    click.echo(f"version:   {answer.version}")
    click.echo(f"uptime:    {answer.uptime_s:.0f} s")
    click.echo(f"peers:     {answer.connected_peers}")
    click.echo(f"reachable: {answer.reachability} (dial-back check)")
    click.echo(
        f"links:     {answer.direct_connections} direct, {answer.relayed_connections} relayed"
        f" ({answer.upgraded_connections} upgraded from relayed to direct)"
    )
    for relay_id in answer.relays:
        click.echo(f"relay:     {relay_id}")
    for addr in answer.addrs:
        click.echo(f"address:   {addr}")
    load = answer.load
    click.echo(f"slots:     {load.slots_free}/{load.slots_total} free, queue {load.queue_len}")
    if not answer.models:
        click.echo("models:    (none)")
    for m in answer.models:
        click.echo(f"model:     {m.model_id} ctx={m.context_length} {m.tokens_per_s:.1f} tok/s")
    if "audits" in audits:
        click.echo(
            f"audits:    {audits['passed']}/{audits['audits']} passed, of "
            f"{audits['providers_audited']} providers; {audits['providers_caught']} caught"
            f" ({audits['remote']} scored by other providers, {audits['disputed']} disputed,"
            f" {audits['unconfirmed']} unconfirmed, {audits['unauditable']} without the weights)"
        )
    if "scored_for_others" in audits:
        click.echo(f"scored:    {audits['scored_for_others']} answers for other nodes' audits")


@app.main.command()
@click.option("--model", default=None, help="Only offers serving this model.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def offers(model: str | None, as_json: bool) -> None:
    """List the provider offers the running node knows (through its control socket).

    Prices in tokens per second; in paid mode an offer without a live bid on
    chain shows "no bid" (it cannot be paid for), in free mode "free". --json
    keeps prices in the token's smallest unit.
    """
    from p2pnode.chain.units import format_price

    answer = _ask_node({"op": "offers", "model": model})
    held = answer["offers"]
    paid_mode = bool(answer.get("paid"))
    if as_json:
        click.echo(json.dumps(held))
        return
    if not held:
        click.echo("no offers known" + (f" for {model}" if model else ""))
    for offer in held:
        offences = ", ".join(f"{k} {n}" for k, n in sorted(offer["offences"].items()))
        conduct = f"  score {offer['score']:g} ({offences})" if offences else ""
        conduct += "  BANNED" if offer["banned"] else ""
        audits = offer.get("audits") or {}
        if audits.get("caught"):
            conduct += f"  CAUGHT by audit ({audits['caught']})"
        elif audits.get("audits"):
            conduct += f"  audits {audits['passed']}/{audits['audits']} passed"
        click.echo(
            f"{offer['peer_id']}  slots {offer['slots_free']} queue {offer['queue_len']}"
            f"  age {offer['age_s']:.0f} s  served {offer['served']}{conduct}"
        )
        for m in offer["models"]:
            if paid_mode and not (m["price_per_s"] and m["bid_id"]):
                price = "no bid"
            else:
                price = format_price(m["price_per_s"]) if m["price_per_s"] else "free"
            click.echo(
                f"    {m['model_id']}  ctx {m['context_length']}  {price}"
                f"  {m['tokens_per_s']:.1f} tok/s"
            )


@app.main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def peers(as_json: bool) -> None:
    """List the peers the running node is connected to (through its control socket)."""
    connected = _ask_node({"op": "peers"})["peers"]
    if as_json:
        click.echo(json.dumps(connected))
        return
    click.echo(f"{len(connected)} connected")
    for peer in connected:
        kinds = ",".join(peer["connections"]) or "-"
        click.echo(f"{peer['peer_id']}  [{kinds}]  {' '.join(peer['addrs'])}")


def _quiet(_note: str) -> None:
    pass


async def _tell_measured(node: Any) -> None:
    """The start-up speed measurement, as progress, once it is announced."""
    steps = progress.start("measuring speed", 1, background=True)
    try:
        await node.offering.measured.wait()
        models = node.offering.models
        steps.step(", ".join(f"{m.model_id} {m.tokens_per_s:.1f} tokens/s" for m in models))
    finally:
        steps.close()  # stopped before it ended: the bar goes too


@app.main.command("dashboard")
def dashboard_link() -> None:
    """Print a new one-time login link to the running node's dashboard (its shim's page)."""
    click.echo(_ask_node({"op": "dashboard"})["link"])


def _ask_node(request: dict[str, Any]) -> dict[str, Any]:
    from p2pnode.p2p import control_client

    try:
        return control_client.ask(app.home() / app.CONTROL_SOCKET, request)
    except P2PNodeError as exc:
        app.fail(exc)
