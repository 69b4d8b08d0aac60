"""p2pnode as a library: join the network, find models, generate with streaming, leave.

This module is the public Python API (docs/library.md); the rest of the
package is the node's inside and may change between releases. A program
opens a node (a full peer of the network, as ``p2pnode start --no-serve``
runs), asks it, and leaves::

    async with p2pnode.client.connect(bootstrap=[addr]) as net:
        async with net.stream("SmolLM2-135M-Instruct", "Hello!") as pieces:
            async for text in pieces:
                print(text, end="")

Everything runs under trio. Errors are the ones in ``p2pnode.errors``:
:class:`~p2pnode.errors.NoProviderError` when no provider could serve a
request, :class:`~p2pnode.errors.PaymentError` when this node cannot pay.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair

from p2pnode.inference.engine import ChatMessage, Params, Request
from p2pnode.p2p.config import NodeConfig
from p2pnode.p2p.market import Wallet
from p2pnode.p2p.node import Node, open_node
from p2pnode.protocols.infer.messages import DEFAULT_MAX_TOKENS
from p2pnode.scopes import single_errors_ungrouped

__all__ = ["Answer", "Network", "Provider", "connect"]

# Text a stream may hold before the reader takes it: enough for a burst of
# tokens, small enough that a reader who stops also stops the provider.
_BUFFERED_CHUNKS = 64


@dataclass(frozen=True, slots=True)
class Provider:
    """A provider of a model, as its signed offer describes it."""

    peer_id: str
    price_per_s: int  # smallest token units per second; 0 in free mode
    tokens_per_s: float  # as it measured itself
    slots_free: int


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole answer and how it ended."""

    text: str
    finish_reason: str  # "stop" or "length"
    completion_tokens: int
    provider: str  # the peer id that finished it


class Network:
    """The network as this program's node sees it. Get one from :func:`connect`."""

    def __init__(self, node: Node) -> None:
        self._node = node

    @property
    def peer_id(self) -> str:
        """This program's peer id."""
        return self._node.peer_id

    async def models(self) -> list[str]:
        """Model ids on offer right now (what gossip has brought so far)."""
        return [model for model, _where in self._node.list_models()]

    async def providers(self, model_id: str) -> list[Provider]:
        """Who serves ``model_id``: gossip's offers, completed from the DHT."""
        found = await self._node.finder.discover(model_id)
        return [
            Provider(o.peer_id, terms.price_per_s, terms.tokens_per_s, o.slots_free)
            for o in found
            if (terms := o.serves(model_id)) is not None
        ]

    @asynccontextmanager
    async def stream(
        self,
        model_id: str,
        prompt: str | Sequence[tuple[str, str]],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.2,
        stop: Sequence[str] = (),
    ) -> AsyncIterator[trio.MemoryReceiveChannel[str]]:
        """Generate: the channel yields text as it arrives, and ends with the answer.

        ``prompt`` is one user message, or a chat as ``(role, content)`` pairs.
        The request fails over between providers on its own; leaving the
        ``async with`` early cancels it, and its failure is raised there.
        """
        request = _request(model_id, prompt, max_tokens, temperature, stop)
        send, receive = trio.open_memory_channel[str](_BUFFERED_CHUNKS)

        async def deliver(text: str, _tokens: int) -> None:
            await send.send(text)

        async def produce() -> None:
            try:
                await self._node.generate(request, deliver)
            finally:
                # Closed without a checkpoint: the reader, woken by the close,
                # must not cancel us before our failure is on record.
                send.close()

        with single_errors_ungrouped():
            async with trio.open_nursery() as nursery, receive:
                nursery.start_soon(produce)
                yield receive
                nursery.cancel_scope.cancel()

    async def complete(
        self,
        model_id: str,
        prompt: str | Sequence[tuple[str, str]],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.2,
        stop: Sequence[str] = (),
    ) -> Answer:
        """Generate the whole answer (as :meth:`stream`, collected)."""
        request = _request(model_id, prompt, max_tokens, temperature, stop)
        parts: list[str] = []

        async def deliver(text: str, _tokens: int) -> None:
            parts.append(text)

        outcome = await self._node.generate(request, deliver)
        return Answer(
            "".join(parts), outcome.finish_reason, outcome.completion_tokens, outcome.provider
        )


@asynccontextmanager
async def connect(
    bootstrap: Sequence[str] = (),
    *,
    config: NodeConfig | None = None,
    key_pair: KeyPair | None = None,
    wallet: Wallet | None = None,
) -> AsyncIterator[Network]:
    """Join the network through ``bootstrap`` (full multiaddrs) and yield it; leave on exit.

    ``config`` for anything else (paid terms, listen addresses: see
    ``p2p/config.py:NodeConfig``), with ``wallet`` to pay from in paid mode
    (``p2p/market/config.py:Wallet``); ``key_pair`` keeps a peer id across
    runs (a fresh one otherwise). The node serves nothing.
    """
    config = replace(config or NodeConfig(), bootstrap=tuple(bootstrap))
    async with open_node(config, key_pair=key_pair or create_new_key_pair(), wallet=wallet) as node:
        yield Network(node)


def _request(
    model_id: str,
    prompt: str | Sequence[tuple[str, str]],
    max_tokens: int,
    temperature: float,
    stop: Sequence[str],
) -> Request:
    turns = [("user", prompt)] if isinstance(prompt, str) else list(prompt)
    return Request(
        model_id=model_id,
        kind="chat",
        messages=tuple(ChatMessage(role=role, content=content) for role, content in turns),
        params=Params(max_tokens=max_tokens, temperature=temperature, stop=tuple(stop)),
    )
