"""UpstreamEngine against a real OpenAI-compatible server (llama_cpp.server, bundled model)."""

from __future__ import annotations

import json
import queue
import re
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest
import trio

from p2pnode.errors import BadRequestError, EngineError
from p2pnode.inference import tools
from p2pnode.inference.engine import (
    GRAMMAR,
    JSON_SCHEMA,
    PENALTIES,
    TOOLS,
    ChatMessage,
    Format,
    Params,
    Request,
    Tool,
    collect,
)
from p2pnode.inference.llamacpp import bundled_model_path
from p2pnode.inference.upstream import Config, UpstreamEngine, open_upstream

pytestmark = pytest.mark.slow
MODEL = "smol"  # the alias the server is started with
BOUND_S = 60


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    """llama-cpp-python's own server on a port it binds itself (port 0), read from
    uvicorn's start-up line; the rest of its log is read (and dropped) by a thread,
    so the pipe never fills."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(bundled_model_path()),
            "--model_alias",
            MODEL,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--n_threads",
            "1",
            "--verbose",
            "False",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    found: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        told = False
        with proc.stderr:
            for line in proc.stderr:
                if not told and (match := re.search(r"running on (http://\S+)", line)):
                    found.put(match[1] + "/v1")
                    told = True
        if not told:
            found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        try:
            url = found.get(timeout=BOUND_S)
        except queue.Empty:
            url = None
        if url is None:
            pytest.fail("llama_cpp.server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(BOUND_S)


@pytest.fixture
async def engine(server_url: str) -> AsyncIterator[UpstreamEngine]:
    async with open_upstream(Config(base_url=server_url, models=(MODEL,), slots=2)) as e:
        yield e


def _chat(max_tokens: int = 16) -> Request:
    return Request(
        model_id=MODEL,
        kind="chat",
        messages=(ChatMessage(role="user", content="Tell me a long story about a dragon."),),
        params=Params(max_tokens=max_tokens, temperature=0.0),
    )


async def test_streams_a_chat(engine: UpstreamEngine) -> None:
    chunks = []
    async with engine.stream(_chat()) as stream:
        async for chunk in stream:
            chunks.append(chunk)
    text = "".join(c.text for c in chunks)
    assert text.strip()
    assert sum(1 for c in chunks if c.text) > 1  # streamed, not one block
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 16


async def test_streams_a_completion(engine: UpstreamEngine) -> None:
    request = Request(
        model_id=MODEL,
        kind="completion",
        prompt="The capital of France is",
        params=Params(max_tokens=6, temperature=0.0),
    )
    text, last = await collect(engine, request)
    assert text
    assert last.finish_reason in ("length", "stop")


# httpx nests async generators and closes only the outermost when a stream is
# abandoned; the inner ones are finalized by the garbage collector.
@pytest.mark.filterwarnings("ignore:Async generator 'httpx.:ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_leaving_early_frees_the_slot(engine: UpstreamEngine) -> None:
    async with engine.stream(_chat(max_tokens=300)) as stream:
        async for chunk in stream:
            if chunk.text:
                break
    assert engine.slots_free == 2
    text, _ = await collect(engine, _chat(4))
    assert text


async def test_an_error_status_is_an_engine_error(server_url: str) -> None:
    wrong_path = server_url.removesuffix("/v1") + "/not-v1"
    async with open_upstream(Config(base_url=wrong_path, models=(MODEL,))) as engine:
        with trio.fail_after(BOUND_S), pytest.raises(EngineError, match="upstream answered 404"):
            await collect(engine, _chat())


async def test_unreachable_upstream_is_an_engine_error() -> None:
    with socket.socket() as held:  # bound, never listening: refused, and nobody else's
        held.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{held.getsockname()[1]}/v1"
        async with open_upstream(Config(base_url=dead, models=(MODEL,))) as engine:
            with pytest.raises(EngineError, match="cannot reach the upstream server"):
                await collect(engine, _chat())


async def test_unknown_model_is_refused_locally(engine: UpstreamEngine) -> None:
    with pytest.raises(EngineError, match="not served here"):
        await collect(engine, Request(model_id="other", kind="completion", prompt="x"))


async def test_logit_bias_and_penalties_reach_the_server(engine: UpstreamEngine) -> None:
    from llama_cpp import Llama

    vocab = Llama(model_path=str(bundled_model_path()), vocab_only=True, verbose=False)
    (forced,) = vocab.tokenize(b" dragon", add_bos=False)
    (info,) = engine.models()
    assert PENALTIES in info.features  # announced: the server applies them
    request = _chat(8)
    biased = replace(
        request, params=replace(request.params, logit_bias=((forced, 100.0),), presence_penalty=0.1)
    )
    text, last = await collect(engine, biased)
    assert text.count("dragon") == 8, text
    assert last.usage is not None
    assert last.usage.completion_tokens == 8


async def test_output_formats_reach_the_server_as_our_grammar(engine: UpstreamEngine) -> None:
    import jsonschema

    (info,) = engine.models()
    assert GRAMMAR in info.features
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "rain": {"type": "boolean"}},
        "required": ["city", "rain"],
    }
    request = _chat(60)
    held = replace(
        request,
        params=replace(request.params, format=Format(kind=JSON_SCHEMA, schema=json.dumps(schema))),
    )
    text, _ = await collect(engine, held)
    jsonschema.validate(json.loads(text), schema)
    # Tool calls: the shim's turns and the grammar, answered by the server.
    tool = tools.ToolSpec("get_weather", "The weather in a city.", schema)
    fmt = Format(
        kind=TOOLS, tools=(Tool(name=tool.name, parameters=json.dumps(schema)),), parallel=False
    )
    calls = replace(
        request,
        messages=tools.with_tools(request.messages, [tool]),
        params=replace(request.params, format=fmt),
    )
    text, _ = await collect(engine, calls)
    ((name, arguments),) = tools.read_calls(text) or [("", "")]
    assert name == "get_weather", text
    jsonschema.validate(json.loads(arguments), schema)
    # A format out of bounds never reaches the server, nor takes a slot.
    bad = Format(kind=JSON_SCHEMA, schema=json.dumps({"type": "integer", "minimum": 0}))
    with pytest.raises(BadRequestError, match="minimum"):
        await collect(engine, replace(request, params=replace(request.params, format=bad)))
    assert engine.slots_free == engine.slots_total
