"""A paid network on a chain that goes on without it: a first chat after the chain sat
idle longer than an approval lives (anvil), and bids posted, re-priced and deleted
while the provider runs (the embedded chain), all with the bundled model."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from eth_account.signers.local import LocalAccount
from libp2p.crypto.ed25519 import create_new_key_pair

from p2pnode.chain.client import AsyncChain, Chain
from p2pnode.chain.devchain import connect, run_devchain
from p2pnode.chain.embedded import MIN_PROVIDER_STAKE, open_embedded
from p2pnode.inference.engine import ChatMessage, Engine, Params, Request
from p2pnode.inference.llamacpp import BUNDLED_MODEL_ID, Config, bundled_model_path, open_llamacpp
from p2pnode.p2p import market
from p2pnode.p2p.node import Node, NodeConfig, open_node
from p2pnode.tests.e2e.network import BOUND_S

pytestmark = pytest.mark.slow
PRICE = 10**15
MODEL = BUNDLED_MODEL_ID
# The chain's latest block is this much older than the wall clock when the first
# chat comes: more than an approval lives (approval_ttl_s, 120 s).
IDLE_S = 300

REQUEST = Request(
    model_id=MODEL,
    kind="chat",
    messages=(ChatMessage(role="user", content="Hi"),),
    params=Params(max_tokens=4, temperature=0.0),
)


async def _nothing(_text: str, _tokens: int) -> None:
    return None


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with open_llamacpp(
        Config(model_path=bundled_model_path(), model_id=MODEL, n_threads=1)
    ) as opened:
        yield opened


async def _pair(
    stack: AsyncExitStack,
    engine: Engine,
    provider: tuple[market.Config, market.Wallet],
    consumer: tuple[market.Config, market.Wallet],
) -> tuple[Node, Node]:
    """A paid provider serving ``engine`` and a consumer that knows its offer."""
    serving = await stack.enter_async_context(
        open_node(
            NodeConfig(measure_tokens=0, market=provider[0]),
            key_pair=create_new_key_pair(),
            engines=[engine],
            wallet=provider[1],
        )
    )
    asking = await stack.enter_async_context(
        open_node(
            NodeConfig(bootstrap=(serving.addrs[0],), market=consumer[0]),
            key_pair=create_new_key_pair(),
            wallet=consumer[1],
        )
    )
    return serving, asking


async def _offered_price(consumer: Node, provider: Node) -> int:
    """The price the provider's offer, as the consumer holds it now, asks (0: no bid)."""
    offer = await consumer.finder.refresh_offer(provider.peer_id)
    terms = offer.serves(MODEL) if offer is not None else None
    return terms.price_per_s if terms is not None and terms.bid_id else 0


async def _until_offered(consumer: Node, provider: Node, price: int) -> None:
    """Ask the provider for its offer until it asks ``price`` (0: until it has no bid)."""
    with trio.fail_after(BOUND_S):
        while await _offered_price(consumer, provider) != price:  # noqa: ASYNC110 - asks it
            await trio.sleep(0.05)


async def test_the_first_chat_after_an_idle_spell_opens_its_session_at_once(
    engine: Engine, tmp_path: Path
) -> None:
    """The issue's trap: on a chain with no block for longer than an approval lives,
    the provider signed approvals that had expired by the block their openSession
    landed in (ApprovalExpired, the consumer's gas spent on the revert), until a
    block came by chance. Here the first open is the consumer's only transaction."""
    with run_devchain(
        0,  # a port the system chooses
        tmp_path / "deployment.json",
        accounts=3,
        block_time_s=None,  # blocks only for transactions, as anvil by default
        genesis_timestamp=int(time.time()) - IDLE_S,  # set up IDLE_S ago by its clock
    ) as dev:
        setup = dev.chain
        provider, consumer = dev.accounts[1], dev.accounts[2]
        setup.register_provider(provider, "12D3KooWprovider", MIN_PROVIDER_STAKE)
        setup.register_model(provider, MODEL, None)
        setup.post_bid(provider, MODEL, PRICE)
        # What a node's start does (a provider is a consumer too): done before the
        # idle spell, so that the first block after it is the consumer's open.
        for node in (provider, consumer):
            setup.approve_token(node, 10**20, unlimited=True)
        # From here the chain has been idle IDLE_S: its next block comes at the wall
        # clock's time, the latest one stays IDLE_S behind.
        setup.w3.provider.make_request("anvil_setTime", [int(time.time())])  # type: ignore[arg-type]
        idle_since = setup.now()
        assert idle_since < time.time() - IDLE_S + 60
        sent = setup.w3.eth.get_transaction_count(consumer.address)

        def own_chain(
            who: LocalAccount, name: str, **kw: object
        ) -> tuple[market.Config, market.Wallet]:
            # Each node its own connection, as separate processes have.
            chain = AsyncChain(Chain(connect(dev.url), setup.deployment))
            terms = market.Config(sessions_db=tmp_path / f"{name}.db", **kw)  # type: ignore[arg-type]
            return terms, market.Wallet(chain, who)

        async with AsyncExitStack() as stack:
            serving, asking = await _pair(
                stack,
                engine,
                own_chain(provider, "provider"),
                own_chain(consumer, "consumer", session_seconds=100),
            )
            await _until_offered(asking, serving, PRICE)
            # The provider has been up a while: its run loop has read the chain's
            # clock (every follow_s), as here.
            assert serving.markets.provider is not None
            with trio.fail_after(BOUND_S):
                await serving.markets.provider.follow()
            assert setup.now() == idle_since  # still idle: the nodes' starts mined nothing
            with trio.fail_after(BOUND_S):
                outcome = await asking.generate(REQUEST, _nothing)
            assert outcome.completion_tokens == 4
            bought = asking.markets.consumer
            assert bought is not None
            assert bought.counters.opened == 1
            (session_id,) = bought.open
            opened_at = setup.session(session_id).opened_at
        # Its first transaction since the idle spell, and no other: nothing reverted.
        # (At stop the consumer closes the served session: one more.)
        assert setup.w3.eth.get_transaction_count(consumer.address) == sent + 2
        assert opened_at - idle_since >= IDLE_S - 60  # the open's block came after the spell
        assert not setup.session(session_id).open


async def test_a_bid_posted_while_the_provider_runs_is_served_without_a_restart(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    net = await trio.to_thread.run_sync(open_embedded)
    chain = AsyncChain(net.chain)
    provider, consumer = net.accounts[1], net.accounts[2]
    await chain.run(net.chain.register_provider, provider, "12D3KooWprovider", MIN_PROVIDER_STAKE)
    await chain.run(net.chain.register_model, provider, MODEL, None)
    # Bids are read again every settle round anyway (settle_every_s): an hour here,
    # so that only following the chain's events can pick a new one up.
    provider_cfg = (
        market.Config(sessions_db=tmp_path / "provider.db", settle_every_s=3600.0, follow_s=0.5),
        market.Wallet(chain, provider),
    )
    consumer_cfg = (market.Config(sessions_db=tmp_path / "c.db"), market.Wallet(chain, consumer))
    caplog.set_level(logging.WARNING, logger="p2pnode.p2p.market")
    async with AsyncExitStack() as stack:
        serving, asking = await _pair(stack, engine, provider_cfg, consumer_cfg)
        (warning,) = [r.getMessage() for r in caplog.records if "no live bid" in r.getMessage()]
        for step in (
            "p2pnode provider register",
            f"p2pnode model register {MODEL}",
            f"p2pnode bid post {MODEL} --price",
            "no restart",
        ):
            assert step in warning
        assert await _offered_price(asking, serving) == 0

        for price in (PRICE, 2 * PRICE):  # posted, then re-priced
            bid = (await chain.run(net.chain.post_bid, provider, MODEL, price)).value
            await _until_offered(asking, serving, price)
            with trio.fail_after(BOUND_S):
                outcome = await asking.generate(REQUEST, _nothing)
            assert outcome.completion_tokens == 4
            bought = asking.markets.consumer
            assert bought is not None
            held = [net.chain.session(s) for s in bought.open]
            assert held[-1].price_per_s == price
            assert held[-1].bid_id == bid
            for session_id in list(bought.open):  # the next one pays the new price
                await bought.close(session_id)

        await chain.run(net.chain.delete_bid, provider, bid)
        await _until_offered(asking, serving, 0)
        assert serving.markets.provider is not None
        assert serving.markets.provider.bids == {}
