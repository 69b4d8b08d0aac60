"""OpenAI's Responses API and Anthropic's Messages API through a consumer's shim, with
their official clients, to the bundled model on a remote provider."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
import trio

from p2pnode.inference.engine import ChatMessage, Params, Request, collect
from p2pnode.tests.e2e.network import BOUND_S, MODEL, Network

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
RULES = "Answer in one short sentence."
TOKENS = 24


async def expected(net: Network, *turns: ChatMessage) -> tuple[str, str, int]:
    """What the model answers greedily, run on the engine itself: its text,
    finish reason and tokens."""
    request = Request(
        model_id=MODEL,
        kind="chat",
        messages=turns,
        params=Params(max_tokens=TOKENS, temperature=0.0),
    )
    text, last = await collect(net.engine, request)
    assert last.finish_reason is not None
    assert last.usage is not None
    return text, last.finish_reason, last.usage.completion_tokens


def openai_client(net: Network) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=net.shim_url, api_key=net.api_key, max_retries=0)


def anthropic_client(net: Network) -> anthropic.AsyncAnthropic:
    # Anthropic's client adds /v1 itself, and sends the key as x-api-key.
    root = net.shim_url.removesuffix("/v1")
    return anthropic.AsyncAnthropic(base_url=root, api_key=net.api_key, max_retries=0)


async def test_a_response_plain_and_streamed_equals_the_model(network: Network) -> None:
    await network.add_provider()
    want, finish, tokens = await expected(
        network,
        ChatMessage(role="system", content=RULES),
        ChatMessage(role="user", content=QUESTION),
    )
    api = openai_client(network)
    with trio.fail_after(BOUND_S):
        plain = await api.responses.create(
            model=MODEL,
            instructions=RULES,
            input=QUESTION,
            temperature=0,
            max_output_tokens=TOKENS,
        )
        stream = await api.responses.create(
            model=MODEL,
            instructions=RULES,
            input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
            temperature=0,
            max_output_tokens=TOKENS,
            stream=True,
        )
        events = [e async for e in stream]
    assert plain.output_text == want
    assert plain.usage is not None
    assert plain.usage.output_tokens == tokens
    assert plain.usage.input_tokens > 0
    # Cut at max_output_tokens is "incomplete", as OpenAI says it.
    assert plain.status == ("incomplete" if finish == "length" else "completed")
    if finish == "length":
        assert plain.incomplete_details is not None
        assert plain.incomplete_details.reason == "max_output_tokens"

    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete" if finish == "length" else "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1
    assert "".join(deltas) == want
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == want


async def test_stateful_fields_tools_and_other_formats_are_a_400_naming_them(
    network: Network,
) -> None:
    await network.add_provider()
    api = openai_client(network)
    cases = {
        "previous_response_id": {"previous_response_id": "resp_1"},
        "store": {"store": True},
        "tools": {"tools": [{"type": "web_search"}]},
        "text": {"text": {"format": {"type": "json_object"}}},
        "input": {"input": []},
    }
    for param, fields in cases.items():
        with trio.fail_after(BOUND_S), pytest.raises(openai.BadRequestError) as caught:
            await api.responses.create(model=MODEL, **{"input": QUESTION, **fields})  # type: ignore[call-overload]
        assert caught.value.body["param"] == param, param  # type: ignore[index]


async def test_anthropic_messages_plain_and_streamed_equal_the_model(network: Network) -> None:
    await network.add_provider()
    want, finish, tokens = await expected(
        network,
        ChatMessage(role="system", content=RULES),
        ChatMessage(role="user", content=QUESTION),
    )
    stop_reason = "max_tokens" if finish == "length" else "end_turn"
    # (Anthropic's client no longer sends sampling fields; the shim takes them.)
    greedy = {"temperature": 0}
    client = anthropic_client(network)
    with trio.fail_after(BOUND_S):
        message = await client.messages.create(
            model=MODEL,
            system=RULES,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=TOKENS,
            extra_body=greedy,
        )
        async with client.messages.stream(
            model=MODEL,
            system=RULES,
            messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
            max_tokens=TOKENS,
            extra_body=greedy,
        ) as stream:
            pieces = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
    assert message.content[0].type == "text"
    assert message.content[0].text == want
    assert message.stop_reason == stop_reason
    assert message.usage.output_tokens == tokens
    assert message.usage.input_tokens > 0
    assert len(pieces) > 1
    assert "".join(pieces) == want
    assert final.content[0].text == want  # type: ignore[union-attr]
    assert final.stop_reason == stop_reason


async def test_anthropic_fields_not_served_are_a_400_and_a_wrong_key_a_401(
    network: Network,
) -> None:
    await network.add_provider()
    client = anthropic_client(network)
    turns = [{"role": "user", "content": QUESTION}]
    tool = {"name": "f", "input_schema": {"type": "object"}}
    for fields in ({"extra_body": {"top_k": 5}}, {"tools": [tool]}):
        with trio.fail_after(BOUND_S), pytest.raises(anthropic.BadRequestError):
            await client.messages.create(model=MODEL, messages=turns, max_tokens=4, **fields)  # type: ignore[arg-type]
    stranger = anthropic.AsyncAnthropic(
        base_url=network.shim_url.removesuffix("/v1"), api_key="sk-wrong", max_retries=0
    )
    with trio.fail_after(BOUND_S), pytest.raises(anthropic.AuthenticationError):
        await stranger.messages.create(model=MODEL, messages=turns, max_tokens=4)  # type: ignore[arg-type]
    # And no key at all, in either header.
    async with httpx.AsyncClient() as http:
        bare = await http.post(
            f"{network.shim_url}/messages",
            json={"model": MODEL, "messages": turns, "max_tokens": 4},
        )
    assert bare.status_code == 401
