"""The ``p2pnode`` command: argument parsing and output only.

Every command turns p2pnode's own errors into one line on stderr and a
non-zero exit status; a traceback means a bug.

Nothing heavy is imported at the top of ``cli/``: libp2p, web3, eth-account,
llama.cpp, the ASGI server and trio are imported by the commands that use
them, so that ``--help``, ``--version``, ``id``, ``status`` and ``offers``
start in under 0.3 s (README, "Benchmarks": ``bench cli``;
tests/cli/test_cli_output.py keeps it so).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from p2pnode.cli import settings
from p2pnode.cli.settings import option
from p2pnode.errors import ConfigError, NetworkError, P2PNodeError

logger = logging.getLogger("p2pnode.cli")

T = TypeVar("T")

CONTROL_SOCKET = "control.sock"

# Exit statuses: 1 for a failure at run time, 2 for bad usage or configuration
# (click uses 2 for usage errors too).
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _fail(exc: P2PNodeError) -> NoReturn:
    click.echo(f"p2pnode: error: {exc}", err=True)
    sys.exit(EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILURE)


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    import trio

    if "libp2p" in sys.modules:
        # Importing libp2p resets its logger (propagate off, see _setup_logging); a
        # command that runs libp2p has imported it by now, so its records are ours again.
        logging.getLogger("libp2p").propagate = True
    try:
        return trio.run(fn)
    except P2PNodeError as exc:
        _fail(exc)


class _Libp2pNoise(logging.Filter):
    """Drop py-libp2p records below CRITICAL unless debugging.

    py-libp2p logs routine events (auto-connect rounds, closed streams) at
    INFO and ordinary failures (a refused dial) at ERROR, and sets levels on
    its child loggers itself, so a level on the "libp2p" logger is not
    enough: the handler filters. Our own code reports the failures that
    matter.
    """

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        if self.debug or not record.name.startswith("libp2p"):
            return True
        return record.levelno >= logging.CRITICAL


def _setup_logging(level: str) -> None:
    """One handler on stderr for every logger, ours and py-libp2p's.

    py-libp2p's import (``import libp2p``) clears its "libp2p" logger and turns
    its propagation off; importing it here would cost every command ~0.5 s, so
    :func:`_run` turns propagation back on once a command has imported it.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(_Libp2pNoise(debug=level == "debug"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    # click.version_option wants the version when the command is defined; reading
    # it (importlib.metadata, ~40 ms) only when asked keeps it off every other command.
    if not value or ctx.resilient_parsing:
        return
    from p2pnode import __version__

    click.echo(f"p2pnode, version {__version__}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and exit.",
)
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="P2PNODE_HOME",
    show_envvar=True,
    default=settings.default_home,
    show_default="~/.p2pnode",
    help="Directory with the node's keys, wallet and config.toml.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    envvar="P2PNODE_LOG_LEVEL",
    show_envvar=True,
    default="warning",
    show_default=True,
)
@click.pass_context
def main(ctx: click.Context, home: Path, log_level: str) -> None:
    """p2pnode: private, paid LLM inference over a pure peer-to-peer network."""
    home = home.expanduser()
    _setup_logging(log_level)
    ctx.obj = home
    config_path = home / settings.CONFIG_FILE
    try:
        # Before config.toml is read: a file another user can change is not ours to obey.
        settings.check_home(home)
        ctx.default_map = settings.default_map_for(main, settings.load_config(home), config_path)
    except ConfigError as exc:
        _fail(exc)


def _home() -> Path:
    home = click.get_current_context().obj
    assert isinstance(home, Path)
    return home


# --- identity -------------------------------------------------------------

_password_file = option(
    "--wallet-password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File holding the wallet passphrase (else P2PNODE_WALLET_PASSWORD, else a prompt).",
)


@main.command()
@_password_file
def init(wallet_password_file: Path | None) -> None:
    """Create the home directory, peer key, wallet and a config.toml template."""
    from p2pnode.p2p import identity

    home = _home()
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
        _fail(exc)
    click.echo(f"home:    {home}")
    click.echo(f"peer id: {identity.peer_id_of(key_pair)}")
    click.echo(f"wallet:  {wallet.address}")


@main.command("id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_id(as_json: bool) -> None:
    """Print this node's peer ID and wallet address."""
    from p2pnode.p2p import identity

    home = _home()
    try:
        if not (home / identity.PEER_KEY_FILE).exists():
            raise ConfigError(f"no identity in {home}: run 'p2pnode init' or 'p2pnode start'")
        peer_id = identity.read_peer_id(home)
        wallet = identity.load_wallet(home)
    except P2PNodeError as exc:
        _fail(exc)
    address = wallet.address if wallet else None
    if as_json:
        click.echo(json.dumps({"peer_id": peer_id, "wallet": address}))
    else:
        click.echo(f"peer id: {peer_id}")
        click.echo(f"wallet:  {address or '(none: run p2pnode init)'}")


# --- the node ---------------------------------------------------------------


def _serving_options(func: Any) -> Any:
    """The flags that say which models a node serves (start, generate, bench engine)."""
    for decorator in reversed(
        [
            option(
                "--model",
                "model_path",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help="GGUF file to serve with llama.cpp (default: bundled SmolLM2-135M-Instruct).",
            ),
            option(
                "--model-id", default=None, help="Id to announce for --model (default: file stem)."
            ),
            option(
                "--slots",
                type=click.IntRange(1, 64),
                default=1,
                show_default=True,
                help="Requests served at once (one llama.cpp instance each).",
            ),
            option(
                "--queue-limit",
                type=click.IntRange(0, 10000),
                default=8,
                show_default=True,
                help="Requests that may wait for a slot; more are refused at once.",
            ),
            option(
                "--threads",
                type=click.IntRange(1, 256),
                default=None,
                help="llama.cpp threads per slot (default: cores - 1).",
            ),
            option(
                "--upstream-url",
                default=None,
                help="OpenAI-compatible server to serve from (e.g. http://127.0.0.1:8080/v1).",
            ),
            option(
                "--upstream-model",
                multiple=True,
                default=[],
                help="Model id the upstream serves (repeatable; needs --upstream-url).",
            ),
            option(
                "--upstream-key-file",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help="File with the upstream's API key (never sent to peers).",
            ),
        ]
    ):
        func = decorator(func)
    return func


def _serving(
    *,
    no_serve: bool,
    model_path: Path | None,
    model_id: str | None,
    slots: int,
    queue_limit: int,
    threads: int | None,
    upstream_url: str | None,
    upstream_model: tuple[str, ...],
    upstream_key_file: Path | None,
) -> Any:
    from p2pnode.inference import llamacpp, upstream
    from p2pnode.inference.serving import Serving

    if no_serve:
        return Serving()
    if upstream_model and not upstream_url:
        raise ConfigError("--upstream-model needs --upstream-url")
    ups: tuple[upstream.Config, ...] = ()
    if upstream_url:
        if not upstream_model:
            raise ConfigError("--upstream-url needs at least one --upstream-model")
        key = None
        if upstream_key_file is not None:
            key = settings.read_secret_file(upstream_key_file).strip()
        ups = (
            upstream.Config(
                base_url=upstream_url, models=upstream_model, api_key=key, queue_limit=queue_limit
            ),
        )
    local: tuple[llamacpp.Config, ...] = ()
    if model_path is not None or not ups:  # the bundled model unless told otherwise
        path = model_path if model_path is not None else llamacpp.bundled_model_path()
        ident = model_id or (path.stem if model_path is not None else llamacpp.BUNDLED_MODEL_ID)
        extra = {"n_threads": threads} if threads else {}
        local = (
            llamacpp.Config(
                model_path=path, model_id=ident, slots=slots, queue_limit=queue_limit, **extra
            ),
        )
    return Serving(llamacpp=local, upstream=ups)


@main.command()
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
@_serving_options
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
@_password_file
def start(
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    ready_file: Path | None,
    no_serve: bool,
    announce_model: tuple[str, ...],
    shim: str | None,
    shim_allow_remote: bool,
    shim_max_in_flight: int,
    allow: tuple[str, ...],
    rate_limit: int,
    chain_url: str | None,
    deployment: Path | None,
    spend_limit: str,
    session_seconds: int,
    max_price: int,
    reachability: str,
    reachability_first_s: float,
    relay_service: bool,
    relays: tuple[str, ...],
    relay_max_reservations: int,
    relay_max_circuits: int,
    relay_circuit_seconds: int,
    relay_circuit_mib: int,
    relay_max_circuits_per_peer: int,
    relay_total_mib: int,
    relay_total_seconds: int,
    dialback_per_minute: int,
    dialback_per_peer_per_minute: int,
    no_hole_punch: bool,
    wallet_password_file: Path | None,
    **serving_flags: Any,
) -> None:
    """Run a node until Ctrl-C or SIGTERM (serving the bundled model unless --no-serve)."""
    import trio

    from p2pnode import __version__
    from p2pnode.cli.settlement import next_block, print_settlement
    from p2pnode.inference import openai_api
    from p2pnode.inference.serving import open_engines
    from p2pnode.p2p import host as hostlib
    from p2pnode.p2p import identity
    from p2pnode.p2p import provider as providerlib
    from p2pnode.p2p import relay as relaylib
    from p2pnode.p2p.node import NodeConfig, open_node
    from p2pnode.protocols import dialback, offers

    home = _home()
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
        serving = _serving(no_serve=no_serve, **serving_flags)
        paid = None
        if chain_url is not None or deployment is not None:
            from p2pnode.chain.client import AsyncChain
            from p2pnode.cli import chain_cmd
            from p2pnode.p2p import market

            paid = market.Config(
                chain=AsyncChain(chain_cmd.open_chain(chain_url, deployment)),
                account=chain_cmd.wallet_account(wallet_password_file),
                session_seconds=session_seconds,
                spend_limit=chain_cmd.tokens(spend_limit),
                max_price_per_s=max_price,
                sessions_db=home / "sessions.db",
            )
        config = NodeConfig(
            host=hostlib.Config(listen=tuple(listen)),
            bootstrap=tuple(bootstrap),
            control_socket=home / CONTROL_SOCKET,
            models=tuple(offers.ModelOffer(model_id=m) for m in announce_model),
            provider=providerlib.Config(
                allowlist=frozenset(a if a.startswith("12D3") else a.lower() for a in allow),
                requests_per_minute=rate_limit,
            ),
            market=paid,
            reachability=reachability,
            reachability_first_s=reachability_first_s,
            relay=relaylib.Config(
                service=relay_service,
                relays=tuple(relays),
                max_reservations=relay_max_reservations,
                max_circuits=relay_max_circuits,
                circuit_duration_s=relay_circuit_seconds,
                circuit_bytes=relay_circuit_mib << 20,
                max_circuits_per_peer=relay_max_circuits_per_peer,
                total_bytes=relay_total_mib << 20,
                total_window_s=relay_total_seconds,
                hole_punch=not no_hole_punch,
            ),
            dialback=dialback.Config(
                requests_per_minute=dialback_per_minute,
                requests_per_peer_per_minute=dialback_per_peer_per_minute,
            ),
        )
        shim_config = openai_api.Config(
            max_in_flight=shim_max_in_flight, allow_remote=shim_allow_remote
        )
        if shim is not None:  # before anything starts: a refused address is a config error
            openai_api.check_listen(shim, allow_remote=shim_allow_remote)
        api_key = identity.load_or_create_api_key(home) if shim else None
    except P2PNodeError as exc:
        _fail(exc)

    async def run() -> None:
        # Paid mode: where this run starts on chain, for the settlement printed at stop.
        since = await paid.chain.run(next_block, paid.chain.sync) if paid is not None else 0
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with (
                open_engines(serving) as engines,
                open_node(config, key_pair=key_pair, engines=engines) as node,
                trio.open_nursery() as nursery,
            ):
                shim_url = None
                if shim is not None and api_key is not None:
                    shim_url = await nursery.start(
                        openai_api.serve, node, api_key, shim, shim_config
                    )
                # The file first, then the line: whoever waits on either sees both.
                if ready_file is not None:
                    ready = {"peer_id": node.peer_id, "addrs": node.addrs, "shim_url": shim_url}
                    await trio.to_thread.run_sync(_write_json_atomically, ready_file, ready)
                click.echo(f"p2pnode {__version__} ready")
                click.echo(f"peer id: {node.peer_id}")
                for addr in node.addrs:
                    click.echo(f"listening: {addr}")
                if relay_service:
                    click.echo(
                        f"relay service: up to {relay_max_reservations} reservations,"
                        f" {relay_max_circuits} circuits ({relay_max_circuits_per_peer} per peer)"
                        f" of {relay_circuit_seconds} s and {relay_circuit_mib} MiB each,"
                        f" {relay_total_mib} MiB per {relay_total_seconds} s in all"
                    )
                for model in node.models:
                    click.echo(f"serving: {model.model_id}")
                if shim_url is not None:
                    click.echo(f"openai api: {shim_url} (key: {home / identity.API_KEY_FILE})")
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

    _run(run)


@main.command()
@click.option("--prompt", required=True, help="What to ask (sent as a chat message).")
@click.option("--max-tokens", type=click.IntRange(1, 32768), default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@_serving_options
def generate(prompt: str, max_tokens: int, temperature: float, **serving_flags: Any) -> None:
    """Generate once with this machine's engine and print the text and tokens/s."""
    import trio

    from p2pnode.inference.engine import ChatMessage, Params, Request
    from p2pnode.inference.serving import open_engines

    try:
        serving = _serving(no_serve=False, **serving_flags)
    except P2PNodeError as exc:
        _fail(exc)

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

    _run(run)


@main.command()
@click.option(
    "--url",
    default="http://127.0.0.1:8080/v1",
    show_default=True,
    help="The local node's OpenAI API (start it with --shim).",
)
@click.option("--model", default=None, help="Model id (default: the first the node lists).")
@click.option("--max-tokens", type=click.IntRange(1, 32768), default=512, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--system", default=None, help="A system message to start the chat with.")
def chat(
    url: str, model: str | None, max_tokens: int, temperature: float, system: str | None
) -> None:
    """Chat in the terminal through the local node (streaming; empty line or Ctrl-D ends)."""
    import httpx
    import trio

    from p2pnode.inference import upstream
    from p2pnode.inference.engine import ChatMessage, Params, Request
    from p2pnode.p2p import identity

    try:
        key = identity.load_or_create_api_key(_home())
    except P2PNodeError as exc:
        _fail(exc)

    async def pick_model() -> str:
        headers = {"Authorization": f"Bearer {key}"}
        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                answer = await client.get(url.rstrip("/") + "/models", headers=headers)
        except httpx.HTTPError as exc:
            raise NetworkError(f"no node answers at {url} (start one with --shim): {exc}") from exc
        if answer.status_code != 200:
            raise NetworkError(f"{url}: {answer.status_code} {answer.text[:200]}")
        models = [m["id"] for m in answer.json().get("data", [])]
        if not models:
            raise NetworkError("the node knows no model yet (no provider found)")
        return str(models[0])

    async def run() -> None:
        chosen = model or await pick_model()
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
                    params=Params(max_tokens=max_tokens, temperature=temperature),
                )
                parts = []
                async with engine.stream(request) as chunks:
                    async for chunk in chunks:
                        parts.append(chunk.text)
                        click.echo(chunk.text, nl=False)
                click.echo()
                history.append(ChatMessage(role="assistant", content="".join(parts)))

    try:
        _run(run)
    except KeyboardInterrupt:
        click.echo()


def _prompt_line() -> str:
    try:
        return input("> ").strip()
    except EOFError:
        return ""


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@main.command()
@click.option(
    "--peer",
    default=None,
    help="Full multiaddr of a node to ask over the network (default: the running node).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(peer: str | None, as_json: bool) -> None:
    """Show the running node's status, or ask any node for its own."""
    from p2pnode.protocols.status import StatusResponse

    if peer is None:
        answer = StatusResponse.from_wire(_ask_node({"op": "status"}))
    else:
        from libp2p.crypto.ed25519 import create_new_key_pair

        from p2pnode.p2p.node import NodeConfig, open_node

        async def run() -> StatusResponse:
            client = NodeConfig(discovery=None)  # ask and leave: no DHT, no gossip
            async with open_node(client, key_pair=create_new_key_pair()) as node:
                return await node.status_of(peer)

        answer = _run(run)
    if as_json:
        click.echo(json.dumps(answer.to_wire() | {"t": None}, default=str))
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


@main.command()
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


@main.command()
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


def _ask_node(request: dict[str, Any]) -> dict[str, Any]:
    from p2pnode.p2p import control_client

    try:
        return control_client.ask(_home() / CONTROL_SOCKET, request)
    except P2PNodeError as exc:
        _fail(exc)


# --- simnet -----------------------------------------------------------------


@main.command()
@click.option("--peers", "peer_count", type=click.IntRange(2, 500), default=50, show_default=True)
@click.option("--providers", type=click.IntRange(1, 500), default=5, show_default=True)
@click.option(
    "--scenario",
    type=click.Choice(["discovery", "market", "relay", "fuzz", "hostile"]),
    default="discovery",
    show_default=True,
)
@click.option(
    "--fanout",
    type=click.IntRange(1, 16),
    default=2,
    show_default=True,
    help="Earlier nodes each new node dials.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Topology seed.")
@click.option(
    "--frames",
    type=click.IntRange(1),
    default=100_000,
    show_default=True,
    help="fuzz: hostile frames to send (one node, restarted when it dies); hostile: the "
    "frames fuzz() sends to honest nodes.",
)
@click.option(
    "--attackers",
    type=click.IntRange(1, 64),
    default=8,
    show_default=True,
    help="fuzz, hostile: attacking hosts (of each fuzz() run).",
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the report here as JSON.",
)
def simnet(
    peer_count: int,
    providers: int,
    scenario: str,
    fanout: int,
    seed: int,
    frames: int,
    attackers: int,
    report: Path | None,
) -> None:
    """Run many real nodes in this process and report how the network behaves.

    The hostile scenario runs 12 peers unless --peers is given (see simnet/hostile.py).
    """
    from p2pnode.simnet.harness import Topology
    from p2pnode.simnet.scenarios import SCENARIOS

    if providers >= peer_count:
        raise click.BadParameter("must be fewer than --peers", param_hint="--providers")
    topology = Topology(peers=peer_count, providers=providers, fanout=fanout, seed=seed)
    if scenario == "fuzz":
        from p2pnode.simnet.scenarios import fuzz

        result = _run(lambda: fuzz(topology, frames=frames, attackers=attackers))
    elif scenario == "hostile":
        from dataclasses import replace

        from p2pnode.simnet.hostile import PEERS, Sizes, hostile

        peers_source = click.get_current_context().get_parameter_source("peer_count")
        if peers_source is click.core.ParameterSource.DEFAULT:
            topology = replace(topology, peers=PEERS)
        sizes = Sizes(fuzz_frames=frames, fuzz_attackers=attackers)
        result = _run(lambda: hostile(topology, sizes))
    else:
        result = _run(lambda: SCENARIOS[scenario](topology))
    text = json.dumps(result, indent=2)
    if report is not None:
        report.write_text(text + "\n")
    click.echo(text)


# --- benchmarks -------------------------------------------------------------


@main.group()
def bench() -> None:
    """Benchmarks: figures next to a baseline measured in the same run."""


@bench.command("engine")
@click.option("--rounds", type=click.IntRange(1, 50), default=7, show_default=True)
@click.option("--max-tokens", type=click.IntRange(8, 4096), default=128, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="GGUF file (default: the bundled model).",
)
@click.option("--threads", type=click.IntRange(1, 256), default=None)
def bench_engine(
    rounds: int, max_tokens: int, as_json: bool, model_path: Path | None, threads: int | None
) -> None:
    """Tokens/s through LlamaCppEngine vs llama-cpp-python called directly, same run."""
    from p2pnode.inference import llamacpp
    from p2pnode.simnet.bench import bench_engine as run_bench

    try:
        path = model_path or llamacpp.bundled_model_path()
    except P2PNodeError as exc:
        _fail(exc)
    report = _run(lambda: run_bench(path, rounds, max_tokens, threads))
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(
        f"engine {report['engine_tokens_per_s']['median']:.1f} tokens/s  direct "
        f"{report['direct_tokens_per_s']['median']:.1f} tokens/s  ratio {report['ratio']:.3f}"
        f"  (goal >= 0.98: {'met' if report['goal_met'] else 'missed'})"
    )


@bench.command("stream")
@click.option("--tokens", type=click.IntRange(1000, 10_000_000), default=200_000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def bench_stream(tokens: int, as_json: bool) -> None:
    """Sealed tokens/s over one infer stream, with an engine that is never the bottleneck."""
    from p2pnode.simnet.bench import bench_stream as run_bench

    report = _run(lambda: run_bench(tokens))
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(
        f"stream {report['tokens_per_s']} tokens/s in {report['frames']} frames "
        f"({report['tokens_per_frame']} tokens/frame, first chunk {report['first_chunk_ms']} ms)"
        f"  (goal >= 20000: {'met' if report['goal_met'] else 'missed'})"
    )
    click.echo(
        f"engine alone {report['engine_direct_tokens_per_s']} tokens/s "
        f"(ratio {report['ratio_to_engine']});  one frame per token "
        f"{report['per_token_frames_tokens_per_s']} tokens/s "
        f"(batching x{report['batching_speedup']})"
    )


@bench.command("e2e")
@click.option("--rounds", type=click.IntRange(1, 50), default=9, show_default=True)
@click.option("--max-tokens", type=click.IntRange(8, 4096), default=96, show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="GGUF file (default: the bundled model).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def bench_e2e(
    rounds: int, max_tokens: int, threads: int, model_path: Path | None, as_json: bool
) -> None:
    """Shim -> p2p -> provider vs llama_cpp.server on the same model: tokens/s and TTFT."""
    from p2pnode.inference import llamacpp
    from p2pnode.simnet.bench import bench_e2e as run_bench

    try:
        path = model_path or llamacpp.bundled_model_path()
    except P2PNodeError as exc:
        _fail(exc)
    report = _run(lambda: run_bench(path, rounds, max_tokens, threads))
    if as_json:
        click.echo(json.dumps(report))
        return
    net, direct = report["network"], report["direct"]
    click.echo(
        f"tokens/s  network {net['tokens_per_s']['median']:.1f}  llama_cpp.server "
        f"{direct['tokens_per_s']['median']:.1f}  ratio {report['ratio_tokens_per_s']:.3f}"
        "  (goal >= 0.97)"
    )
    click.echo(
        f"ttft      network {net['ttft_ms']['median']:.1f} ms  llama_cpp.server "
        f"{direct['ttft_ms']['median']:.1f} ms  added {report['added_ttft_ms']:.1f} ms"
        f"  (goal <= 25 ms)  goals {'met' if report['goal_met'] else 'missed'}"
    )


@bench.command("connect")
@click.option("--rounds", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--rtts", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def bench_connect(rounds: int, rtts: int, as_json: bool) -> None:
    """libp2p connect time and status round trip vs plain TCP on loopback."""
    from p2pnode.simnet.bench import bench_connect as run_bench

    report = _run(lambda: run_bench(rounds, rtts))
    if as_json:
        click.echo(json.dumps(report))
        return
    lp, tcp = report["libp2p"], report["tcp"]
    click.echo(
        f"connect   libp2p {lp['connect_ms']['median']:.2f} ms  "
        f"tcp {tcp['connect_ms']['median']:.3f} ms  "
        f"ratio {report['ratio_connect_median']}x  (goal <= 25 ms: "
        f"{'met' if report['goal_met'] else 'missed'})"
    )
    click.echo(
        f"rtt       libp2p {lp['status_rtt_ms']['median']:.2f} ms  "
        f"tcp {tcp['rtt_ms']['median']:.3f} ms  ratio {report['ratio_rtt_median']}x"
    )


@bench.command("cli")
@click.option("--rounds", type=click.IntRange(1, 100), default=7, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def bench_cli(rounds: int, as_json: bool) -> None:
    """Start-up of --help, --version, id, status, offers (fresh processes) vs bare Python."""
    from p2pnode.simnet.startup import bench_cli as run_bench

    try:
        report = run_bench(rounds)
    except P2PNodeError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(report))
        return
    base = report["baseline_ms"]["median"]
    click.echo(f"{'python -c pass':<16} {base:7.1f} ms  (baseline, median of {rounds})")
    for name, figures in report["commands"].items():
        click.echo(
            f"{'p2pnode ' + name:<16} {figures['ms']['median']:7.1f} ms  "
            f"x{figures['ratio_to_baseline']:.1f} the baseline  (max {figures['ms']['max']:.0f} ms)"
        )
    click.echo(
        f"goal: every median < {report['goal_s'] * 1000:.0f} ms: "
        f"{'met' if report['goal_met'] else 'missed'}"
    )


# These register themselves on `main`: devchain, provider, model, bid, ...; demo.
from p2pnode.cli import chain_cmd, demo  # noqa: E402, F401
