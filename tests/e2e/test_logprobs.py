"""Logprobs through a consumer's shim, with the official ``openai`` client, from the
bundled model on a remote provider."""

from __future__ import annotations

import math

import openai
import pytest
import trio

from p2pnode.tests.e2e.network import BOUND_S, MODEL, Network

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "Name three rivers."}]


def client(net: Network) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=net.shim_url, api_key=net.api_key, max_retries=0)


async def test_chat_logprobs_plain_and_streamed_are_the_models_own(network: Network) -> None:
    await network.add_provider()
    api = client(network)
    ask = {"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": 12,
           "logprobs": True, "top_logprobs": 3}  # fmt: skip
    with trio.fail_after(BOUND_S):
        plain = await api.chat.completions.create(**ask)  # type: ignore[call-overload]
        stream = await api.chat.completions.create(**ask, stream=True)  # type: ignore[call-overload]
        chunks = [c async for c in stream]
    choice = plain.choices[0]
    assert choice.logprobs is not None
    content = choice.logprobs.content or []
    assert plain.usage is not None
    assert len(content) == plain.usage.completion_tokens
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert bytes(t.bytes or []).decode("utf-8", "replace") == t.token
        assert len(t.top_logprobs) == 3
        ranked = [a.logprob for a in t.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        assert all(lp <= 0 for lp in ranked)
        # Greedy: the drawn token is the model's most probable, at its probability.
        assert t.top_logprobs[0].token == t.token
        assert math.isclose(t.top_logprobs[0].logprob, t.logprob, abs_tol=2e-3)
    assert sum(math.exp(a.logprob) for a in content[0].top_logprobs) <= 1 + 1e-3
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or []
    ]  # fmt: skip
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


async def test_completion_logprobs_and_a_request_without_them(network: Network) -> None:
    await network.add_provider()
    api = client(network)
    with trio.fail_after(BOUND_S):
        got = await api.completions.create(
            model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6,
            logprobs=2,
        )  # fmt: skip
        plain = await api.chat.completions.create(
            model=MODEL, messages=ASK, temperature=0, max_tokens=4
        )  # type: ignore[call-overload]
    shown = got.choices[0].logprobs
    assert shown is not None
    tokens = shown.tokens or []
    assert "".join(tokens) == got.choices[0].text
    assert len(shown.token_logprobs or []) == len(tokens)
    assert [len(top) for top in shown.top_logprobs or []] == [2] * len(tokens)
    offsets = shown.text_offset or []
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert plain.choices[0].logprobs is None
