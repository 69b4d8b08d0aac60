"""Trio adapter of the dial-back protocol over a libp2p stream.

The policy (whom a helper dials, its budgets, the throwaway host it dials
from) is the node's: ``p2p/nat.py``. This moves the bytes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from p2pnode.protocols import unary_service
from p2pnode.protocols.dialback import Config
from p2pnode.protocols.dialback.machine import ClientMachine, ServerMachine
from p2pnode.protocols.dialback.messages import DialBackRequest, DialBackResponse
from p2pnode.protocols.stream import ByteStream, close_with_error
from p2pnode.protocols.wire import Error


async def request(stream: ByteStream, addrs: Sequence[str], cfg: Config) -> DialBackResponse:
    """Ask one peer to dial us back at ``addrs`` (the first ``cfg.max_addrs``)."""
    message = DialBackRequest(addrs=tuple(addrs[: cfg.max_addrs]))
    return await unary_service.request(stream, ClientMachine(cfg.max_frame), message, cfg.timeout)


async def serve(
    stream: ByteStream,
    answer: Callable[[DialBackRequest], Awaitable[DialBackResponse]],
    cfg: Config,
    wait_s: float,
) -> None:
    """Answer one dial-back request; ``answer`` may take ``wait_s`` (it dials)."""
    await unary_service.serve(stream, ServerMachine(cfg.max_frame), answer, wait_s)


async def refuse(stream: ByteStream, error: Error, cfg: Config) -> None:
    """Turn a request away before reading it: an Error frame, then close."""
    await close_with_error(stream, ServerMachine(cfg.max_frame).send_error(error))
