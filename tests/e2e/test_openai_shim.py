"""The official openai client, through a consumer node's shim, to providers on the network."""

from __future__ import annotations

import httpx
import openai
import pytest
import trio

from p2pnode.inference.engine import ChatMessage, Params, Request, collect
from p2pnode.p2p.pricing import PeerStats
from p2pnode.protocols.offers import ModelOffer
from p2pnode.tests.e2e.network import BOUND_S, MODEL, Network

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
GREEDY = {"temperature": 0.0, "seed": 11, "max_tokens": 24}


def client(net: Network, key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=net.shim_url, api_key=key or net.api_key, max_retries=0)


async def local_chat(net: Network, content: str = QUESTION, max_tokens: int = 24) -> str:
    request = Request(
        model_id=MODEL,
        kind="chat",
        messages=(ChatMessage(role="user", content=content),),
        params=Params(max_tokens=max_tokens, temperature=0.0, seed=11),
    )
    text, _ = await collect(net.engine, request)
    return text


async def test_models_are_listed_from_the_network(network: Network) -> None:
    await network.add_provider()
    api = client(network)
    with trio.fail_after(BOUND_S):
        models = await api.models.list()
        assert [(m.id, m.owned_by) for m in models.data] == [(MODEL, "network")]
        assert (await api.models.retrieve(MODEL)).id == MODEL
        with pytest.raises(openai.NotFoundError):
            await api.models.retrieve("no-such-model")


async def test_chat_and_completion_equal_the_local_engine(network: Network) -> None:
    provider = await network.add_provider()
    expected = await local_chat(network)
    api = client(network)
    with trio.fail_after(BOUND_S):
        answer = await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}], **GREEDY
        )
        assert answer.choices[0].message.content == expected
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage is not None
        assert answer.usage.completion_tokens == 24

        stream = await api.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": QUESTION}],
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
        chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 24

    prompt = "The history of the printing press"
    local, _ = await collect(
        network.engine,
        Request(
            model_id=MODEL,
            kind="completion",
            prompt=prompt,
            params=Params(max_tokens=16, temperature=0.0),
        ),
    )
    with trio.fail_after(BOUND_S):
        completion = await api.completions.create(
            model=MODEL, prompt=prompt, max_tokens=16, temperature=0
        )
        streamed = await api.completions.create(
            model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        parts = [c.choices[0].text async for c in streamed]
    assert completion.choices[0].text == local
    assert "".join(parts) == local
    # One session carried all four requests, and each receipt was countersigned.
    assert network.consumer.consumer.counters.sessions_opened == 1
    assert provider.provider is not None
    (held,) = provider.provider.sessions.values()
    assert held.requests == 4
    assert held.acked is not None
    assert held.acked[0].completion_tokens == held.completion_tokens


async def test_a_chat_that_sets_no_sampling_gets_the_providers_recommendation(
    network: Network,
) -> None:
    # The bundled model's provider announces SmolLM2's 0.2 / 0.9 in its offer;
    # the consumer's shim samples so when the client says nothing.
    await network.add_provider()
    (info,) = network.engine.models()
    recommended = Params(max_tokens=24, temperature=0.2, top_p=0.9, seed=11)
    assert (info.temperature, info.top_p) == (recommended.temperature, recommended.top_p)
    expected, _ = await collect(
        network.engine,
        Request(
            model_id=MODEL,
            kind="chat",
            messages=(ChatMessage(role="user", content=QUESTION),),
            params=recommended,
        ),
    )
    api = client(network)
    with trio.fail_after(BOUND_S):
        answer = await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}], seed=11, max_tokens=24
        )
    assert network.consumer.recommended_sampling(MODEL) == (0.2, 0.9)
    assert answer.choices[0].message.content == expected


async def test_penalties_and_logit_bias_reach_the_remote_model(network: Network) -> None:
    await network.add_provider()
    plain = Params(max_tokens=24, temperature=0.0, seed=11)
    first = (await _first_ids(network, plain))[0]
    asked = Params(
        max_tokens=24,
        temperature=0.0,
        seed=11,
        presence_penalty=0.5,
        frequency_penalty=1.0,
        logit_bias=((first, -100.0),),
    )
    expected, _ = await collect(network.engine, _chat(asked))
    api = client(network)
    with trio.fail_after(BOUND_S):
        answer = await api.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": QUESTION}],
            presence_penalty=0.5,
            frequency_penalty=1.0,
            logit_bias={str(first): -100},
            user="someone",
            **GREEDY,
        )
    assert answer.choices[0].message.content == expected
    assert expected != (await collect(network.engine, _chat(plain)))[0]


def _chat(params: Params) -> Request:
    return Request(
        model_id=MODEL,
        kind="chat",
        messages=(ChatMessage(role="user", content=QUESTION),),
        params=params,
    )


async def _first_ids(network: Network, params: Params) -> list[int]:
    ids: list[int] = []
    async with network.engine.stream(_chat(params)) as chunks:  # type: ignore[attr-defined]
        async for chunk in chunks:
            ids += chunk.token_ids
    return ids


async def test_a_provider_killed_mid_stream_is_invisible_to_the_client(network: Network) -> None:
    first = await network.add_provider()
    second = await network.add_provider()
    # Make the consumer pick `first`: it has seen `second` answer slowly.
    network.consumer.consumer.stats[second.peer_id] = PeerStats(rtt_ms=5000.0)
    expected = await local_chat(network, "Tell me a long story about a dragon.", 60)
    api = client(network)
    pieces: list[str] = []
    with trio.fail_after(BOUND_S):
        stream = await api.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me a long story about a dragon."}],
            stream=True,
            temperature=0,
            seed=11,
            max_tokens=60,
        )
        ids = set()
        async for chunk in stream:
            ids.add(chunk.id)
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                if len(pieces) == 5:
                    network.kill(first)
    assert "".join(pieces) == expected
    assert len(ids) == 1
    counters = network.consumer.consumer.counters
    assert counters.failovers == 1
    assert second.provider is not None
    assert second.provider.counters.requests == 1


async def test_no_key_wrong_key_and_foreign_host_are_refused(network: Network) -> None:
    with trio.fail_after(BOUND_S):
        with pytest.raises(openai.AuthenticationError):
            await client(network, key="sk-wrong").models.list()
        async with httpx.AsyncClient() as http:
            answer = await http.get(network.shim_url + "/models")
            assert answer.status_code == 401
            assert answer.json()["error"]["code"] == "invalid_api_key"
            answer = await http.get(
                network.shim_url + "/models",
                headers={"Authorization": f"Bearer {network.api_key}", "Host": "evil.example:8080"},
            )
            assert answer.status_code == 403
            assert answer.json()["error"]["code"] == "forbidden_host"
            answer = await http.get(
                network.shim_url + "/models",
                headers={"Authorization": f"Bearer {network.api_key}", "Host": "localhost:1234"},
            )
            assert answer.status_code == 200


async def test_bad_requests_get_openai_error_bodies(network: Network) -> None:
    await network.add_provider()
    api = client(network)
    with trio.fail_after(BOUND_S):
        with pytest.raises(openai.BadRequestError) as bad:
            await api.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=5
            )
        assert bad.value.param == "temperature"
        with pytest.raises(openai.BadRequestError):
            await api.chat.completions.create(model=MODEL, messages=[])
        with pytest.raises(openai.NotFoundError) as missing:
            await api.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}]
            )
        assert missing.value.code == "model_not_found"
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                network.shim_url + "/chat/completions",
                content=b"{not json",
                headers={"Authorization": f"Bearer {network.api_key}"},
            )
        assert answer.status_code == 400
        assert answer.json()["error"]["type"] == "invalid_request_error"


async def test_n_choices_are_generated_in_turn(network: Network) -> None:
    await network.add_provider()
    expected = await local_chat(network, max_tokens=8)
    with trio.fail_after(BOUND_S):
        answer = await client(network).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": QUESTION}],
            n=2,
            temperature=0,
            seed=11,
            max_tokens=8,
        )
    assert [c.index for c in answer.choices] == [0, 1]
    assert [c.message.content for c in answer.choices] == [expected, expected]


async def test_a_model_nobody_can_serve_is_503(network: Network) -> None:
    # A provider announcing a model it does not serve turns every session down.
    fake = await network.add_provider()
    fake.offering.set_models((*fake.offering.models, ModelOffer(model_id="ghost-model")))
    with trio.fail_after(BOUND_S):
        while network.consumer.offer_book.offers("ghost-model") == []:
            await network.consumer.finder.refresh_offer(fake.peer_id)
        with pytest.raises(openai.InternalServerError) as failed:
            await client(network).chat.completions.create(
                model="ghost-model", messages=[{"role": "user", "content": "hi"}]
            )
    assert failed.value.status_code == 503


async def test_a_client_that_leaves_cancels_the_remote_generation(network: Network) -> None:
    provider = await network.add_provider()
    assert provider.provider is not None
    with trio.fail_after(BOUND_S):
        stream = await client(network).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me a long story about a dragon."}],
            stream=True,
            max_tokens=1000,
            temperature=0,
        )
        seen = 0
        async for chunk in stream:
            seen += bool(chunk.choices and chunk.choices[0].delta.content)
            if seen == 3:
                break
        await stream.close()
        while provider.provider.counters.cancelled == 0:  # noqa: ASYNC110 - waiting on the provider
            await trio.sleep(0.05)
    (held,) = provider.provider.sessions.values()
    assert held.completion_tokens < 1000
