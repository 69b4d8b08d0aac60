"""Trio adapter of the status protocol over a libp2p stream."""

from __future__ import annotations

from collections.abc import Callable

from p2pnode.protocols import unary_service
from p2pnode.protocols.status import Config
from p2pnode.protocols.status.machine import ClientMachine, ServerMachine
from p2pnode.protocols.status.messages import StatusRequest, StatusResponse
from p2pnode.protocols.stream import ByteStream


async def request(stream: ByteStream, cfg: Config) -> StatusResponse:
    """Ask for status over a freshly opened stream (see ``unary_service.request``)."""
    return await unary_service.request(
        stream, ClientMachine(cfg.max_frame), StatusRequest(), cfg.timeout
    )


async def serve(stream: ByteStream, answer: Callable[[], StatusResponse], cfg: Config) -> None:
    """Answer one status request (see ``unary_service.serve``)."""
    await unary_service.serve(
        stream, ServerMachine(cfg.max_frame), lambda _request: answer(), cfg.timeout
    )
