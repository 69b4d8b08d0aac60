"""UpstreamEngine against a hostile or broken upstream server: what may leave the provider.

The provider sends ``str(EngineError)`` to the remote consumer, so an
upstream's error text (its URL, an echo of the provider's key, its internals)
must never be in it. The server here is real HTTP (Starlette on hypercorn, on
a free loopback port), scripted per model id.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from p2pnode.errors import EngineError
from p2pnode.inference.engine import ChatMessage, Params, Request, collect
from p2pnode.inference.upstream import Config, open_upstream

KEY = "sk-upstream-SECRET-4242424242"
BOUND_S = 10
MODELS = ("leaky", "leaky-text", "not-json", "bad-choices", "bad-usage", "odd-finish")


async def _upstream(request: HttpRequest) -> Response:
    """An OpenAI-compatible server that misbehaves as the model id says."""
    body = await request.json()
    model = body["model"]
    if model == "leaky":  # echoes the URL and key, and its internals
        message = (
            f"internal error at {request.url} for {request.headers['authorization']}: "
            "Traceback File /srv/llm/secret_config.py"
        )
        return JSONResponse({"error": {"message": message}}, status_code=500)
    if model == "leaky-text":
        return Response(f"denied key={KEY[:12]}", status_code=401)
    events = {
        "not-json": ['{"choices": [{"delta": {"content": "a"}}]}', "{not json", '{"x": 1}'],
        "bad-choices": ['{"choices": {"0": "x"}}'],
        "bad-usage": ['{"choices": [], "usage": {"prompt_tokens": "many"}}'],
        "odd-finish": [
            '{"choices": [{"delta": {"content": "hi"}, "finish_reason": null}]}',
            '{"choices": [{"delta": {}, "finish_reason": "internal reason: /srv/llm"}]}',
        ],
    }[model]
    text = "".join(f"data: {e}\n\n" for e in events) + "data: [DONE]\n\n"
    return Response(text, media_type="text/event-stream")


@asynccontextmanager
async def hostile_upstream() -> AsyncIterator[str]:
    """Its base URL ("http://127.0.0.1:<port>/private-path/v1") while it runs."""
    app = Starlette(
        routes=[
            Route("/private-path/v1/chat/completions", _upstream, methods=["POST"]),
        ]
    )
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.1
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, app, config))  # type: ignore[arg-type]
        yield f"{binds[0]}/private-path/v1"
        nursery.cancel_scope.cancel()


def _chat(model: str) -> Request:
    return Request(
        model_id=model,
        kind="chat",
        messages=(ChatMessage(role="user", content="hi"),),
        params=Params(max_tokens=8, temperature=0.0),
    )


async def _failure(url: str, model: str) -> str:
    async with open_upstream(Config(base_url=url, models=MODELS, api_key=KEY)) as engine:
        with trio.fail_after(BOUND_S), pytest.raises(EngineError) as failed:
            await collect(engine, _chat(model))
    return str(failed.value)


async def test_an_error_body_never_reaches_the_message_and_is_logged_without_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with hostile_upstream() as url:
        with caplog.at_level(logging.DEBUG, logger="p2pnode.inference.upstream"):
            message = await _failure(url, "leaky")
        text = await _failure(url, "leaky-text")
    assert message == "upstream answered 500 (Internal Server Error)"
    assert text == "upstream answered 401 (Unauthorized)"
    for leaked in ("SECRET", "private-path", "127.0.0.1", "Traceback", "secret_config"):
        assert leaked not in message + text
    # The detail stays on this node, at debug, without the key.
    (logged,) = [r.getMessage() for r in caplog.records if "answered 500" in r.getMessage()]
    assert "secret_config.py" in logged
    assert "SECRET" not in logged
    assert all(r.levelno == logging.DEBUG for r in caplog.records if "answered" in r.getMessage())


async def test_malformed_events_are_engine_errors() -> None:
    async with hostile_upstream() as url:
        assert await _failure(url, "not-json") == "the upstream sent a malformed event"
        assert await _failure(url, "bad-choices") == "the upstream sent a malformed event"
        assert await _failure(url, "bad-usage") == "the upstream sent a malformed usage count"


async def test_an_unknown_finish_reason_is_not_passed_on() -> None:
    async with hostile_upstream() as url:
        config = Config(base_url=url, models=MODELS, api_key=KEY)
        async with open_upstream(config) as engine:
            with trio.fail_after(BOUND_S):
                text, last = await collect(engine, _chat("odd-finish"))
    assert text == "hi"
    assert last.finish_reason == "stop"
