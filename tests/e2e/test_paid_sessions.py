"""Paid sessions on the embedded chain: the openai client chats, the chain settles to the wei."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import trio
from eth_account import Account
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair

from p2pnode.chain.client import CLAIM_WINDOW_S, AsyncChain, send_ether
from p2pnode.chain.embedded import MIN_PROVIDER_STAKE, Embedded, open_embedded
from p2pnode.inference import openai_api
from p2pnode.inference.engine import ChatMessage, Params, Request
from p2pnode.inference.llamacpp import BUNDLED_MODEL_ID, Config, bundled_model_path, open_llamacpp
from p2pnode.inference.synthetic import SyntheticEngine
from p2pnode.p2p import market
from p2pnode.p2p.node import Node, NodeConfig, open_node
from p2pnode.p2p.reputation import Offence
from p2pnode.protocols.session import RejectCode
from p2pnode.tests.e2e.network import BOUND_S

pytestmark = pytest.mark.slow
PRICE = 10**15
MODEL = BUNDLED_MODEL_ID


@dataclass
class Paid:
    embedded: Embedded
    provider: Node
    consumer: Node
    shim_url: str
    api_key: str


def _market(net: Embedded, who: int, home: Path, **kw: object) -> market.Config:
    return market.Config(sessions_db=home / f"sessions-{who}.db", **kw)  # type: ignore[arg-type]


def _wallet(net: Embedded, who: int, chain: AsyncChain) -> market.Wallet:
    return market.Wallet(chain, net.accounts[who])


def _stranger(
    boot: tuple[str, ...], wallet: market.Wallet, sessions_db: Path
) -> AbstractAsyncContextManager[Node]:
    """A paying consumer with a wallet of its own (100 s sessions)."""
    terms = market.Config(sessions_db=sessions_db, session_seconds=100)
    return open_node(NodeConfig(bootstrap=boot, market=terms), key_pair=_keys(), wallet=wallet)


@pytest.fixture
async def paid(tmp_path: Path) -> AsyncIterator[Paid]:
    net = await trio.to_thread.run_sync(open_embedded)
    chain = AsyncChain(net.chain)
    provider_account = net.accounts[1]
    net.chain.register_provider(provider_account, "12D3KooWprovider", MIN_PROVIDER_STAKE)
    net.chain.register_model(provider_account, MODEL, None)
    net.chain.post_bid(provider_account, MODEL, PRICE)
    async with AsyncExitStack() as stack:
        engine = await stack.enter_async_context(
            open_llamacpp(Config(model_path=bundled_model_path(), model_id=MODEL, n_threads=1))
        )
        provider = await stack.enter_async_context(
            open_node(
                NodeConfig(measure_tokens=0, market=_market(net, 1, tmp_path)),
                key_pair=create_new_key_pair(),
                engines=[engine],
                wallet=_wallet(net, 1, chain),
            )
        )
        consumer = await stack.enter_async_context(
            open_node(
                NodeConfig(
                    bootstrap=(provider.addrs[0],),
                    market=_market(net, 2, tmp_path, session_seconds=100),
                ),
                key_pair=create_new_key_pair(),
                wallet=_wallet(net, 2, chain),
            )
        )
        nursery = await stack.enter_async_context(trio.open_nursery())
        key = "sk-" + secrets.token_hex(8)
        url = await nursery.start(openai_api.serve, consumer, key, "127.0.0.1:0")
        with trio.fail_after(BOUND_S):
            while consumer.offer_book.get(provider.peer_id) is None:
                await consumer.finder.refresh_offer(provider.peer_id)
        try:
            yield Paid(net, provider, consumer, url, key)
        finally:
            nursery.cancel_scope.cancel()


async def test_a_paid_chat_settles_to_the_wei(paid: Paid) -> None:
    chain = paid.embedded.chain
    provider_addr, consumer_addr = (a.address for a in paid.embedded.accounts[1:3])
    p0, c0 = chain.balance(provider_addr), chain.balance(consumer_addr)
    offer = paid.consumer.offer_book.get(paid.provider.peer_id)
    assert offer is not None
    terms = offer.serves(MODEL)
    assert terms is not None
    assert terms.price_per_s == PRICE
    assert terms.bid_id is not None
    assert offer.wallet == provider_addr

    api = openai.AsyncOpenAI(base_url=paid.shim_url, api_key=paid.api_key, max_retries=0)
    with trio.fail_after(BOUND_S):
        for _ in range(2):
            answer = await api.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8
            )
            assert answer.choices[0].message.content
    markets = paid.consumer.markets.consumer
    assert markets is not None
    assert markets.counters.opened == 1  # both requests in one paid session
    (session_id,) = markets.open
    held = chain.session(session_id)
    assert held.open
    assert held.stake == 100 * PRICE
    assert (held.consumer, held.provider) == (consumer_addr, provider_addr)
    # The consumer's second and last transaction: close; the provider is paid per
    # second. Five seconds of chain time pass first, so the close pays some.
    await trio.to_thread.run_sync(paid.embedded.time_travel, 5)
    with trio.fail_after(BOUND_S):
        await markets.close(session_id)
    settled = chain.session(session_id)
    assert not settled.open
    paid_wei = markets.counters.paid_wei
    refunded = markets.counters.refunded_wei
    assert paid_wei + refunded == 100 * PRICE
    # Whole seconds of the chain's clock, from the open to the close's block.
    assert paid_wei % PRICE == 0
    assert 5 * PRICE <= paid_wei <= (chain.now() - held.opened_at) * PRICE
    assert chain.balance(provider_addr) == p0 + paid_wei
    assert chain.balance(consumer_addr) == c0 - paid_wei
    escrowed, total_paid, total_refunded = chain.totals()
    assert escrowed == total_paid + total_refunded
    # The next request opens a new paid session (the old one is closed).
    with trio.fail_after(BOUND_S):
        await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
    assert markets.counters.opened == 2


async def test_an_ended_session_is_settled_by_the_provider_and_replaced(paid: Paid) -> None:
    request = Request(
        model_id=MODEL,
        kind="chat",
        messages=(ChatMessage(role="user", content="Hi"),),
        params=Params(max_tokens=4, temperature=0.0),
    )

    async def nothing(_text: str, _tokens: int) -> None:
        return None

    with trio.fail_after(BOUND_S):
        await paid.consumer.generate(request, nothing)
    markets = paid.consumer.markets.consumer
    provider_market = paid.provider.markets.provider
    assert markets is not None
    assert provider_market is not None
    (first,) = markets.open
    with trio.fail_after(BOUND_S):
        while first not in provider_market.usage:  # noqa: ASYNC110 - the Ack in flight
            await trio.sleep(0.01)
    used_until, _signature = provider_market.usage[first]
    held = paid.embedded.chain.session(first)
    opened_at = held.opened_at
    # Past its end, inside the claim window (the provider claims well before it closes).
    paid.embedded.time_travel(held.ends_at - paid.embedded.chain.now() + 60)
    with trio.fail_after(BOUND_S):
        await provider_market.settle()
    assert provider_market.counters.settled == 1
    # It ran out: the provider claims what the consumer acknowledged, to the second.
    assert provider_market.counters.paid_wei == PRICE * (used_until - opened_at)
    assert 0 < used_until - opened_at < 100
    assert not paid.embedded.chain.session(first).open
    # The provider no longer serves it; the consumer notices and pays for a new one.
    with trio.fail_after(BOUND_S):
        outcome = await paid.consumer.generate(request, nothing)
    assert outcome.completion_tokens == 4
    assert markets.counters.opened == 2


async def test_a_free_hello_to_a_paid_provider_is_refused(paid: Paid) -> None:
    from libp2p.peer.id import ID

    from p2pnode.protocols import session
    from p2pnode.protocols.refusal import Refusal
    from p2pnode.protocols.session import service as session_service

    async with open_node(NodeConfig(), key_pair=create_new_key_pair()) as free:
        await free.dialer.connect(paid.provider.addrs[0])
        stream = await free.dialer.open_stream(paid.provider.peer_id, session.PROTOCOL_ID)
        rejected = await session_service.open_session(
            stream,
            MODEL,
            5,
            local_peer=free.host.get_id(),
            remote_peer=ID.from_base58(paid.provider.peer_id),
        )
    assert isinstance(rejected, Refusal)
    assert rejected.code is RejectCode.PAYMENT_REQUIRED


async def test_the_spend_limit_is_a_429_insufficient_quota(paid: Paid, tmp_path: Path) -> None:
    chain = AsyncChain(paid.embedded.chain)
    tight = _market(paid.embedded, 3, tmp_path, spend_limit=PRICE // 2)
    async with (
        open_node(
            NodeConfig(bootstrap=(paid.provider.addrs[0],), market=tight),
            key_pair=create_new_key_pair(),
            wallet=_wallet(paid.embedded, 3, chain),
        ) as poor,
        trio.open_nursery() as nursery,
    ):
        url = await nursery.start(openai_api.serve, poor, "k", "127.0.0.1:0")
        with trio.fail_after(BOUND_S):
            while poor.offer_book.get(paid.provider.peer_id) is None:
                await poor.finder.refresh_offer(paid.provider.peer_id)
            api = openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0)
            with pytest.raises(openai.RateLimitError) as limited:
                await api.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
                )
        assert limited.value.code == "insufficient_quota"
        nursery.cancel_scope.cancel()


async def test_a_restarted_consumer_closes_what_it_left_open(paid: Paid, tmp_path: Path) -> None:
    """Sessions in sessions.db still open on chain (the node died): a served one is closed
    at start; one never served is left until its end plus the claim window (paying the
    provider nothing for it), counted against the spend limit meanwhile."""
    net = paid.embedded
    consumer, provider = net.accounts[4], net.accounts[1]
    bid = net.chain.live_bid(provider.address, MODEL)
    assert bid is not None
    net.chain.approve_token(consumer, 20 * PRICE)

    def open_one() -> bytes:
        expiry, nonce = net.chain.now() + 60, secrets.token_bytes(32)
        approval = net.chain.sign_approval(provider, bid, consumer.address, expiry, nonce)
        tx = net.chain.open_session(consumer, bid, 10 * PRICE, PRICE, expiry, nonce, approval)
        return bytes(tx.value[0])

    served, unserved = open_one(), open_one()
    cfg = _market(net, 4, tmp_path, idle_close_s=0.2)
    assert cfg.sessions_db is not None
    ledger = market.Ledger(cfg.sessions_db)
    for left in (served, unserved):
        held = net.chain.session(left)
        ledger.opened(
            "consumer", paid.provider.peer_id, left, held.bid_id, held.stake, held.ends_at
        )
    ledger.served(served)
    ledger.close()
    p0 = net.chain.balance(provider.address)
    async with open_node(
        NodeConfig(market=cfg),
        key_pair=create_new_key_pair(),
        wallet=_wallet(net, 4, AsyncChain(net.chain)),
    ) as node:
        assert node.markets.consumer is not None
        with trio.fail_after(BOUND_S):
            # Closed at start (the run loop's first step), its stake no longer held.
            market_ = node.markets.consumer
            while net.chain.session(served).open or market_.held() != 10 * PRICE:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert net.chain.session(unserved).open
        assert net.chain.balance(provider.address) > p0  # the served seconds
        p1 = net.chain.balance(provider.address)
        ends_at = net.chain.session(unserved).ends_at
        net.time_travel(ends_at - net.chain.now() + CLAIM_WINDOW_S)
        with trio.fail_after(BOUND_S):
            while node.markets.consumer.held():  # noqa: ASYNC110 - the run loop's next look
                await trio.sleep(0.05)
        assert not net.chain.session(unserved).open
    assert net.chain.balance(provider.address) == p1


def _keys() -> KeyPair:
    return create_new_key_pair()


async def _chat_error(node: Node, provider: Node) -> openai.APIStatusError:
    """The shim's error for one chat from ``node`` (which must fail)."""
    async with trio.open_nursery() as nursery:
        url = await nursery.start(openai_api.serve, node, "k", "127.0.0.1:0")
        with trio.fail_after(BOUND_S):
            while node.offer_book.get(provider.peer_id) is None:
                await node.finder.refresh_offer(provider.peer_id)
            api = openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0)
            with pytest.raises(openai.APIStatusError) as failed:
                await api.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
                )
        nursery.cancel_scope.cancel()
    return failed.value


async def test_a_chat_that_cannot_be_paid_says_why(paid: Paid, tmp_path: Path) -> None:
    # Not "no provider offers this model": what the user can act on.
    net = paid.embedded
    chain = AsyncChain(net.chain)
    boot = (paid.provider.addrs[0],)

    # --max-price below every bid: the cheapest bid and the limit, in tokens.
    cheap = _market(net, 3, tmp_path, max_price_per_s=PRICE // 10)
    async with open_node(
        NodeConfig(bootstrap=boot, market=cheap), key_pair=_keys(), wallet=_wallet(net, 3, chain)
    ) as stingy:
        error = await _chat_error(stingy, paid.provider)
        # Banned besides: that is the reason (a higher --max-price would not help).
        for _ in range(3):
            stingy.reputation.record(paid.provider.peer_id, Offence.AUTH, trio.current_time())
        banned_too = await _chat_error(stingy, paid.provider)
    assert error.status_code == 503
    above = (
        "1 provider seen; the cheapest bid, 0.001 tokens/s, is above --max-price 0.0001 tokens/s"
    )
    assert error.message.endswith(f"({above})"), error.message
    assert banned_too.message.endswith("(1 provider seen; all banned for misbehaviour)")

    # A wallet with ether but no tokens: 429 insufficient_quota naming the wallet.
    broke = Account.create()
    send_ether(net.chain.w3, net.accounts[0], broke.address, 10**18)
    async with _stranger(boot, market.Wallet(chain, broke), tmp_path / "broke.db") as poor:
        error = await _chat_error(poor, paid.provider)
        assert poor.markets.consumer is not None
        assert poor.markets.consumer.counters.opened == 0
    assert error.status_code == 429
    assert error.code == "insufficient_quota"
    # (Its start spent some of the ether on the token approval; the embedded chain is no
    # devchain, so the advice is to send tokens.)
    assert re.search(
        rf"opening a session: wallet {broke.address} has 0\.99\d* ether and 0 tokens, "
        r"needs 0\.1 tokens: send it 0\.1 tokens on chain \d+",
        error.message,
    ), error.message

    # Some tokens, fewer than this provider's stake: not the wallet's end (a cheaper
    # provider could be paid; a provider asking a huge stake cannot stop every
    # request with a 429), so the request fails as any other, saying why.
    short = Account.create()
    send_ether(net.chain.w3, net.accounts[0], short.address, 10**18)
    net.chain.mint(net.accounts[0], short.address, 5 * PRICE * 10)  # 0.05 of a 0.1 stake
    async with _stranger(boot, market.Wallet(chain, short), tmp_path / "short.db") as shortish:
        error = await _chat_error(shortish, paid.provider)
    assert error.status_code == 503
    assert "0.05 tokens, needs 0.1 tokens" in error.message

    # The provider's bid deleted: it is still seen (its offer), but has no live bid.
    provider_account = net.accounts[1]
    bid = net.chain.live_bid(provider_account.address, MODEL)
    assert bid is not None
    net.chain.delete_bid(provider_account, bid)
    assert paid.provider.markets.provider is not None
    await paid.provider.markets.provider.reload_bids()
    with trio.fail_after(BOUND_S):
        while (o := paid.consumer.offer_book.get(paid.provider.peer_id)) is None or (
            o.serves(MODEL).bid_id  # type: ignore[union-attr]
        ):
            await paid.consumer.finder.refresh_offer(paid.provider.peer_id)
    error = await _chat_error(paid.consumer, paid.provider)
    assert error.status_code == 503
    assert "1 provider seen; it has no live bid on chain for this model" in error.message

    # A second provider of the model, banned: each is said of its own.
    async with open_node(
        NodeConfig(measure_tokens=0), key_pair=_keys(), engines=[SyntheticEngine(MODEL)]
    ) as rogue:
        with trio.fail_after(BOUND_S):
            while paid.consumer.offer_book.get(rogue.peer_id) is None:
                await paid.consumer.dialer.connect(rogue.addrs[0])
                await paid.consumer.finder.refresh_offer(rogue.peer_id)
        for _ in range(3):
            paid.consumer.reputation.record(rogue.peer_id, Offence.AUTH, trio.current_time())
        error = await _chat_error(paid.consumer, paid.provider)
    assert error.message.endswith(
        "(2 providers seen; 1 banned for misbehaviour; "
        "of the rest, it has no live bid on chain for this model)"
    ), error.message
