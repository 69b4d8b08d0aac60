"""``p2pnode demo``: a whole paid network in one process, on embedded defaults.

An in-process chain (eth-tester, contracts deployed, accounts funded), a
provider node serving the bundled model (registered on chain with its peer
ID, bidding per second), and a consumer node with the OpenAI shim. Chatting
through the shim opens a paid session; stopping closes it and prints what
the chain settled. What ``./dev start`` runs.
"""

from __future__ import annotations

import signal
from functools import partial
from pathlib import Path
from typing import Any

import click

from p2pnode.cli import app, options
from p2pnode.cli.settings import option
from p2pnode.errors import P2PNodeError


@app.main.command()
@option(
    "--shim",
    default="127.0.0.1:8080",
    show_default=True,
    metavar="HOST:PORT",
    help="Where the consumer serves the OpenAI-compatible API.",
)
@option(
    "--price",
    type=click.IntRange(1),
    default=10**15,
    show_default=True,
    help="The provider's bid, smallest token units per second.",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help='Write {"shim_url", "provider", "consumer"} as JSON here once ready.',
)
@app.serving_options
def demo(shim: str, price: int, ready_file: Path | None, **serving_flags: Any) -> None:
    """A paid network in one process: embedded chain, a provider, a consumer with the shim."""
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair

    from p2pnode.chain.client import AsyncChain
    from p2pnode.chain.embedded import MIN_PROVIDER_STAKE, open_embedded
    from p2pnode.chain.units import format_price
    from p2pnode.cli.settlement import print_settlement
    from p2pnode.inference import dashboard, openai_api
    from p2pnode.inference.serving import open_engines
    from p2pnode.p2p import host as hostlib
    from p2pnode.p2p import identity, market
    from p2pnode.p2p.node import NodeConfig, open_node

    home = app.home()
    try:
        serving = options.serving(no_serve=False, **serving_flags)
        api_key = identity.load_or_create_api_key(home)
    except P2PNodeError as exc:
        app.fail(exc)

    async def run() -> None:
        click.echo("starting the embedded chain …", err=True)
        net = await trio.to_thread.run_sync(open_embedded)
        chain = AsyncChain(net.chain)
        provider_account, consumer_account = net.accounts[1], net.accounts[2]
        provider_key = create_new_key_pair()
        provider_peer = str(identity.peer_id_of(provider_key))
        local = hostlib.Config(listen=("/ip4/127.0.0.1/tcp/0",))
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with open_engines(serving) as engines:
                model_id = engines[0].models()[0].model_id
                await chain.run(
                    net.chain.register_provider, provider_account, provider_peer, MIN_PROVIDER_STAKE
                )
                sha = engines[0].models()[0].gguf_sha256
                await chain.run(net.chain.register_model, provider_account, model_id, sha)
                await chain.run(net.chain.post_bid, provider_account, model_id, price)
                provider_cfg = NodeConfig(host=local, market=market.Config())
                async with (
                    open_node(
                        provider_cfg,
                        key_pair=provider_key,
                        engines=engines,
                        wallet=market.Wallet(chain, provider_account),
                    ) as provider,
                    open_node(
                        NodeConfig(
                            host=local,
                            bootstrap=(provider.addrs[0],),
                            market=market.Config(sessions_db=home / "demo-sessions.db"),
                        ),
                        key_pair=create_new_key_pair(),
                        wallet=market.Wallet(chain, consumer_account),
                    ) as consumer,
                    trio.open_nursery() as nursery,
                ):
                    logins = dashboard.Login()
                    url = await nursery.start(
                        partial(openai_api.serve, logins=logins), consumer, api_key, shim
                    )
                    await consumer.finder.refresh_offer(provider.peer_id)
                    if ready_file is not None:
                        ready = {
                            "shim_url": url,
                            "provider": provider.peer_id,
                            "consumer": consumer.peer_id,
                        }
                        await trio.to_thread.run_sync(app.write_json_atomically, ready_file, ready)
                    click.echo("p2pnode demo ready: a paid network in this process")
                    click.echo(
                        f"provider {provider.peer_id} serves {model_id} at {format_price(price)}"
                    )
                    click.echo(f"consumer {consumer.peer_id} wallet {consumer_account.address}")
                    click.echo(f"openai api: {url} (key: {home / identity.API_KEY_FILE})")
                    click.echo(f"dashboard: {logins.new_link(dashboard.local_base(url))}")
                    click.echo(
                        f'try: curl -s {url}/chat/completions -H "Authorization: Bearer '
                        f'$(cat {home / identity.API_KEY_FILE})" -H "Content-Type: '
                        f'application/json" -d \'{{"model": "{model_id}", "messages": '
                        f'[{{"role": "user", "content": "Hello!"}}]}}\''
                    )
                    async for _ in signals:
                        break
                    nursery.cancel_scope.cancel()
        # The consumer's sessions since the chain began: this run's, as for `start`.
        await print_settlement(chain, consumer_account.address, 0)

    app.run_async(run)
