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

import numpy as np
import pytest
import trio

from p2pnode.errors import BadRequestError, EngineError
from p2pnode.inference import tools
from p2pnode.inference.engine import (
    EMBEDDINGS,
    GRAMMAR,
    JSON_SCHEMA,
    LOGPROBS,
    PENALTIES,
    TOOLS,
    ChatMessage,
    Format,
    Params,
    Request,
    Tool,
    collect,
)
from p2pnode.inference.llamacpp import Config as LocalConfig
from p2pnode.inference.llamacpp import bundled_model_path, open_llamacpp
from p2pnode.inference.upstream import Config, UpstreamEngine, open_upstream

pytestmark = pytest.mark.slow
MODEL = "smol"  # the alias the server is started with
EMBEDDER = "smol-embedding"
BOUND_S = 60


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    yield from _server(MODEL)


@pytest.fixture(scope="module")
def embedding_url() -> Iterator[str]:
    """A second server, in embedding mode (llama_cpp.server serves one or the other)."""
    yield from _server(EMBEDDER, "--embedding", "true")


def _server(alias: str, *extra: str) -> Iterator[str]:
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
            alias,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--n_threads",
            "1",
            "--verbose",
            "False",
            *extra,
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


async def test_logprobs_come_from_the_server_in_our_shape(engine: UpstreamEngine) -> None:
    (info,) = engine.models()
    assert LOGPROBS in info.features
    request = _chat(8)
    asked = replace(request, params=replace(request.params, top_logprobs=2))
    entries = []
    text = ""
    async with engine.stream(asked) as chunks:
        async for chunk in chunks:
            text += chunk.text
            entries += chunk.logprob_tokens
            assert len(chunk.logprob_tokens) <= chunk.tokens
    assert entries
    assert b"".join(e.piece for e in entries).decode() == text
    for e in entries:
        assert e.logprob <= 0
        assert len(e.top) == 2
        assert e.top[0][1] >= e.top[1][1]
    # (Not "greedy draws the best": the server samples its own way, with
    # llama_cpp.server's default repeat penalty.) A drawn token listed among
    # the alternatives has the same log-probability there.
    listed = [dict(e.top) for e in entries]
    assert any(e.piece in t for e, t in zip(entries, listed, strict=True))
    for e, t in zip(entries, listed, strict=True):
        if e.piece in t:
            assert t[e.piece] == e.logprob
    completion = Request(
        model_id=MODEL, kind="completion", prompt="The sky is",
        params=Params(max_tokens=4, temperature=0.0, top_logprobs=1),
    )  # fmt: skip
    shown = []
    async with engine.stream(completion) as chunks:
        async for chunk in chunks:
            shown += chunk.logprob_tokens
    assert shown
    assert all(len(e.top) == 1 and e.logprob <= 0 for e in shown)


async def test_embeddings_come_from_the_server_pooled_and_normalised(embedding_url: str) -> None:
    cfg = Config(base_url=embedding_url, models=(), embedding_models=(EMBEDDER,))
    texts = ("The cat sat on the mat.", "A dog ran in the park.", "The cat sat on the mat.")
    local_cfg = LocalConfig(
        model_path=bundled_model_path(), model_id="local", n_threads=1, embedding=True
    )
    async with open_upstream(cfg) as engine, open_llamacpp(local_cfg) as local:
        (info,) = engine.models()
        assert info.features == (EMBEDDINGS,)
        got, tokens = await engine.embed(Request(model_id=EMBEDDER, kind="embedding", inputs=texts))
        short, _ = await engine.embed(
            Request(model_id=EMBEDDER, kind="embedding", inputs=texts[:1], dimensions=32)
        )
        (own,), _ = await local.embed(Request(model_id="local", kind="embedding", inputs=texts[:1]))
        with pytest.raises(BadRequestError, match="embeddings only"):
            await collect(engine, Request(model_id=EMBEDDER, kind="completion", prompt="x"))
    vectors = [np.frombuffer(v, dtype="<f4") for v in got]
    assert tokens > 0
    assert all(v.shape == (576,) and abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)
    assert np.array_equal(vectors[0], vectors[2])
    # The server's per-token vectors, mean-pooled here, are our engine's own.
    assert float(vectors[0] @ np.frombuffer(own, dtype="<f4")) > 0.999
    cut = np.frombuffer(short[0], dtype="<f4")
    assert cut.shape == (32,)
    assert np.allclose(cut, vectors[0][:32] / np.linalg.norm(vectors[0][:32]), atol=1e-5)
