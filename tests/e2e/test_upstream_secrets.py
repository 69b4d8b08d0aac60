"""A provider serving from an upstream server: its URL, key and error texts stay with it.

The consumer is the attacker's seat: whatever reaches it (offers, status
answers, error frames, and through its shim the OpenAI client) must not carry
the provider's private upstream URL, its API key, or the upstream's own words.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import openai
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

from p2pnode.inference.upstream import Config, open_upstream
from p2pnode.tests.e2e.network import BOUND_S, Network

pytestmark = pytest.mark.slow

KEY = "sk-upstream-SECRET-4242424242"
MODEL = "private/leaky"


async def _leaky(request: HttpRequest) -> JSONResponse:
    """An upstream whose error names its URL, echoes the key, and shows its internals."""
    message = f"at {request.url} with {request.headers['authorization']}: /srv/llm/config.py"
    return JSONResponse({"error": {"message": message}}, status_code=500)


@asynccontextmanager
async def leaky_upstream() -> AsyncIterator[str]:
    app = Starlette(routes=[Route("/private-path/v1/chat/completions", _leaky, methods=["POST"])])
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.1
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, app, config))  # type: ignore[arg-type]
        yield f"{binds[0]}/private-path/v1"
        nursery.cancel_scope.cancel()


async def test_upstream_url_key_and_error_text_never_reach_the_consumer(network: Network) -> None:
    async with (
        leaky_upstream() as url,
        open_upstream(Config(base_url=url, models=(MODEL,), api_key=KEY)) as engine,
    ):
        provider = await network.add_provider(engine)
        host_port = url.split("//")[1].split("/")[0]
        with trio.fail_after(BOUND_S):
            offer = network.consumer.offer_book.get(provider.peer_id)
            status = await network.consumer.finder.status_of(provider.peer_id)
            api = openai.AsyncOpenAI(
                base_url=network.shim_url, api_key=network.api_key, max_retries=0
            )
            with pytest.raises(openai.APIStatusError) as failed:
                await api.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
        network.kill(provider)
    assert offer is not None
    assert [m.model_id for m in offer.models] == [MODEL]
    told = repr(offer.to_wire()) + repr(status.to_wire())
    answer = failed.value.message
    assert "upstream answered 500 (Internal Server Error)" in answer
    for seen in (told, answer):
        for secret in ("SECRET", "private-path", host_port, "/srv/llm"):
            assert secret not in seen
