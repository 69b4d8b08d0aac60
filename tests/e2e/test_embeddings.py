"""Embeddings through a consumer's shim, with the official ``openai`` client, from the
bundled model served in embedding mode by a remote provider."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import openai
import pytest
import trio

from p2pnode.cli.options import EMBEDDING_SUFFIX
from p2pnode.inference.engine import EMBEDDINGS, Request
from p2pnode.inference.llamacpp import Config, LlamaCppEngine, bundled_model_path, open_llamacpp
from p2pnode.protocols.infer.messages import MAX_EMBED_INPUTS
from p2pnode.tests.e2e.network import BOUND_S, MODEL, Network

pytestmark = pytest.mark.slow

EMBEDDER = MODEL + EMBEDDING_SUFFIX


@asynccontextmanager
async def embedder() -> AsyncIterator[LlamaCppEngine]:
    cfg = Config(model_path=bundled_model_path(), model_id=EMBEDDER, n_threads=1, embedding=True)
    async with open_llamacpp(cfg) as engine:
        yield engine


def client(net: Network) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=net.shim_url, api_key=net.api_key, max_retries=0)


async def test_embeddings_are_routed_deterministic_and_in_openais_shape(network: Network) -> None:
    async with embedder() as engine:
        (info,) = engine.models()
        assert info.features == (EMBEDDINGS,)
        await network.add_provider(engine)
        api = client(network)
        texts = ["The cat sat on the mat.", "A dog ran in the park.", "The cat sat on the mat."]
        with trio.fail_after(BOUND_S):
            # Past llama.cpp's default batch of 512 tokens: one batch of the context.
            long = await api.embeddings.create(model=EMBEDDER, input="word " * 700)
            got = await api.embeddings.create(model=EMBEDDER, input=texts)
            again = await api.embeddings.create(model=EMBEDDER, input=texts[0])
            short = await api.embeddings.create(model=EMBEDDER, input=texts[0], dimensions=64)
            packed = await api.embeddings.create(
                model=EMBEDDER, input=texts[:1], encoding_format="base64"
            )
            models = [m.id async for m in api.models.list()]
        assert EMBEDDER in models
        vectors = [np.array(d.embedding) for d in got.data]
        assert [d.index for d in got.data] == [0, 1, 2]
        assert all(v.shape == (576,) for v in vectors)  # SmolLM2's hidden size
        assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)
        # Same input, same vector: in one request, across requests.
        assert np.array_equal(vectors[0], vectors[2])
        assert np.array_equal(vectors[0], np.array(again.data[0].embedding))
        assert not np.array_equal(vectors[0], vectors[1])
        assert 0 < float(vectors[0] @ vectors[1]) < 0.999
        # Shortened as OpenAI shortens: the first values, renormalised.
        cut = vectors[0][:64] / np.linalg.norm(vectors[0][:64])
        assert np.allclose(np.array(short.data[0].embedding), cut, atol=1e-6)
        raw = packed.data[0].embedding
        assert isinstance(raw, str)
        decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4")
        assert np.array_equal(decoded, vectors[0].astype(np.float32))
        assert got.usage.prompt_tokens == got.usage.total_tokens > 0
        assert long.usage.prompt_tokens > 512
        assert len(long.data[0].embedding) == 576
        # The vectors are the engine's own.
        (own,), _ = await engine.embed(
            Request(model_id=EMBEDDER, kind="embedding", inputs=texts[:1])
        )
        assert np.array_equal(np.frombuffer(own, dtype="<f4"), vectors[0].astype(np.float32))


async def test_many_inputs_are_split_and_come_back_in_order(network: Network) -> None:
    async with embedder() as engine:
        await network.add_provider(engine)
        api = client(network)
        texts = [f"Sentence number {i}." for i in range(MAX_EMBED_INPUTS + 5)]
        with trio.fail_after(BOUND_S):
            got = await api.embeddings.create(model=EMBEDDER, input=texts)
            last = await api.embeddings.create(model=EMBEDDER, input=texts[-1])
    assert len(got.data) == len(texts)
    assert [d.index for d in got.data] == list(range(len(texts)))
    assert got.data[-1].embedding == last.data[0].embedding


async def test_a_chat_model_does_not_embed_and_bad_fields_are_a_400(network: Network) -> None:
    await network.add_provider()  # the chat model only
    api = client(network)
    with trio.fail_after(BOUND_S), pytest.raises(openai.APIStatusError) as caught:
        await api.embeddings.create(model=MODEL, input="hi")
    assert caught.value.status_code == 503  # nobody offers embeddings of it
    for fields, param in (
        ({"input": [1, 2, 3]}, "input"),
        ({"input": ""}, "input"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "hi", "dimensions": 0}, "dimensions"),
    ):
        with pytest.raises(openai.BadRequestError) as bad:
            await api.embeddings.create(model=EMBEDDER, **fields)  # type: ignore[arg-type]
        assert bad.value.body["param"] == param  # type: ignore[index]
