"""A small real network for end-to-end tests: providers with the bundled model,
a consumer with no model, and the consumer's OpenAI shim on a free port."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from p2pnode.inference import openai_api
from p2pnode.inference.engine import Engine
from p2pnode.inference.llamacpp import BUNDLED_MODEL_ID, Config, bundled_model_path, open_llamacpp
from p2pnode.p2p.node import Node, NodeConfig, open_node
from p2pnode.simnet.harness import Running, start_node

MODEL = BUNDLED_MODEL_ID
BOUND_S = 60


@dataclass
class Network:
    engine: Engine
    consumer: Node
    api_key: str
    shim_url: str
    nursery: trio.Nursery
    stack: AsyncExitStack
    providers: list[Node] = field(default_factory=list)
    running: list[Running] = field(default_factory=list)

    async def add_provider(self, engine: Engine | None = None) -> Node:
        """Start a provider (sharing the engine unless given one) that the consumer knows."""
        config = NodeConfig(measure_tokens=0, bootstrap=(self.consumer.addrs[0],))
        with trio.fail_after(BOUND_S):
            running = await start_node(self.nursery, config, [engine or self.engine])
            node = running.node
            while self.consumer.offer_book.get(node.peer_id) is None:
                await self.consumer.finder.refresh_offer(node.peer_id)
        self.providers.append(node)
        self.running.append(running)
        return node

    def kill(self, provider: Node) -> None:
        """Stop a provider at once, as if its process died."""
        self.running[self.providers.index(provider)].kill()


@pytest.fixture
async def network() -> AsyncIterator[Network]:
    async with AsyncExitStack() as stack:
        engine = await stack.enter_async_context(
            open_llamacpp(
                Config(model_path=bundled_model_path(), model_id=MODEL, n_threads=1, slots=2)
            )
        )
        consumer = await stack.enter_async_context(
            open_node(NodeConfig(measure_tokens=0), key_pair=create_new_key_pair())
        )
        nursery = await stack.enter_async_context(trio.open_nursery())
        api_key = "sk-test-" + secrets.token_hex(8)
        url = await nursery.start(openai_api.serve, consumer, api_key, "127.0.0.1:0")
        net = Network(engine, consumer, api_key, url, nursery, stack)
        try:
            yield net
        finally:
            nursery.cancel_scope.cancel()
