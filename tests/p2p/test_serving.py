"""A node serving the real bundled model: what it announces, and that it stays responsive."""

from __future__ import annotations

import pytest
import trio

from p2pnode.inference.engine import ChatMessage, Params, Request
from p2pnode.inference.llamacpp import BUNDLED_MODEL_ID, Config, bundled_model_path, open_llamacpp
from p2pnode.p2p.memory import MemoryNetwork
from p2pnode.p2p.node import NodeConfig
from p2pnode.simnet.harness import open_memory_node

pytestmark = pytest.mark.slow
BOUND_S = 30


def _engine_cfg() -> Config:
    return Config(model_path=bundled_model_path(), model_id=BUNDLED_MODEL_ID, n_threads=1)


async def test_served_model_is_announced_with_measured_speed(memory: MemoryNetwork) -> None:
    async with (
        open_llamacpp(_engine_cfg()) as engine,
        open_memory_node(memory, NodeConfig(measure_tokens=16), engines=[engine]) as provider,
        open_memory_node(memory, NodeConfig(bootstrap=(provider.addrs[0],))) as consumer,
    ):
        with trio.fail_after(BOUND_S):
            while not provider.offering.models[0].tokens_per_s:  # noqa: ASYNC110 - measured at start
                await trio.sleep(0.05)
            answer = await consumer.finder.status_of(provider.peer_id)
        (model,) = answer.models
        assert model.model_id == BUNDLED_MODEL_ID
        assert model.gguf_sha256 == engine.models()[0].gguf_sha256
        assert model.context_length == 2048
        assert model.tokens_per_s > 1
        assert (answer.load.slots_total, answer.load.slots_free) == (1, 1)
        # The signed offer in the answer carries the same terms.
        offer = await consumer.finder.refresh_offer(provider.peer_id)
        assert offer is not None
        terms = offer.serves(BUNDLED_MODEL_ID)
        assert terms is not None
        assert terms.tokens_per_s == model.tokens_per_s


async def test_status_answers_while_the_model_generates(memory: MemoryNetwork) -> None:
    long = Request(
        model_id=BUNDLED_MODEL_ID,
        kind="chat",
        messages=(ChatMessage(role="user", content="Tell me a long story about a dragon."),),
        params=Params(max_tokens=300, temperature=0.0),
    )
    async with (
        open_llamacpp(_engine_cfg()) as engine,
        open_memory_node(memory, NodeConfig(measure_tokens=0), engines=[engine]) as provider,
        open_memory_node(memory, NodeConfig()) as consumer,
    ):
        await consumer.dialer.connect(provider.addrs[0])
        generating = trio.Event()
        finished = trio.Event()

        async def generate() -> None:
            async with engine.stream(long) as chunks:
                async for chunk in chunks:
                    if chunk.text:
                        generating.set()
            finished.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(generate)
            with trio.fail_after(BOUND_S):
                await generating.wait()
            answers = []
            for _ in range(5):
                answers.append(await consumer.finder.status_of(provider.peer_id))
            # All five answers came while the 300-token generation still ran.
            assert not finished.is_set()
            assert answers[-1].load.slots_free == 0
            nursery.cancel_scope.cancel()
