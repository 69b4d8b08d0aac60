"""OpenAI's Responses API and Anthropic's Messages API through a consumer's shim, with
their official clients, to the bundled model on a remote provider."""

from __future__ import annotations

import json
from typing import Any, Literal

import anthropic
import httpx
import jsonschema
import openai
import pydantic
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


async def test_stateful_fields_built_in_tools_and_other_formats_are_a_400_naming_them(
    network: Network,
) -> None:
    await network.add_provider()
    api = openai_client(network)
    cases = {
        "previous_response_id": {"previous_response_id": "resp_1"},
        "store": {"store": True},
        "tools": {"tools": [{"type": "web_search"}]},
        "text": {"text": {"format": {"type": "xml"}}},
        "tool_choice": {"tool_choice": "required"},
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
    tool = {"type": "bash_20250124", "name": "bash"}
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


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
ASK_WEATHER = "What is the weather in Paris?"
RESULT = "Raining frogs, 37 degrees."


def said_the_result(answer: str) -> bool:
    """Whether an answer repeats what only the tool said."""
    return "frog" in answer.lower() or "37" in answer


async def test_a_response_calls_a_function_plain_and_streamed_and_uses_its_output(
    network: Network,
) -> None:
    await network.add_provider()
    api = openai_client(network)
    tool = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
            "parameters": WEATHER}  # fmt: skip
    ask = {"model": MODEL, "tools": [tool], "temperature": 0, "max_output_tokens": 80,
           "parallel_tool_calls": False}  # fmt: skip
    with trio.fail_after(BOUND_S):
        plain = await api.responses.create(input=ASK_WEATHER, tool_choice="required", **ask)  # type: ignore[call-overload]
        stream = await api.responses.create(
            input=ASK_WEATHER, tool_choice="required", stream=True, **ask
        )  # type: ignore[call-overload]
        events = [e async for e in stream]
    (call,) = plain.output
    assert call.type == "function_call"
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.output_text.delta" not in kinds
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 1
    assert "".join(pieces) == call.arguments
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[-1].response.output[0].arguments == call.arguments  # type: ignore[union-attr]
    # The loop: the call and its output go back in the input.
    with trio.fail_after(BOUND_S):
        final = await api.responses.create(
            input=[
                {"role": "user", "content": ASK_WEATHER},
                {
                    "type": "function_call",
                    "call_id": call.call_id,
                    "name": call.name,
                    "arguments": call.arguments,
                },
                {"type": "function_call_output", "call_id": call.call_id, "output": RESULT},
            ],  # fmt: skip
            instructions="Answer in one sentence.",
            tool_choice="none",
            **{**ask, "max_output_tokens": 40},
        )  # type: ignore[call-overload]
    assert said_the_result(final.output_text), final.output_text


class City(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=24)
    sky: Literal["sunny", "cloudy", "rainy"]


async def test_responses_parse_with_a_pydantic_model(network: Network) -> None:
    await network.add_provider()
    api = openai_client(network)
    with trio.fail_after(BOUND_S):
        got = await api.responses.parse(
            model=MODEL, input=ASK_WEATHER, text_format=City, temperature=0, max_output_tokens=60
        )
    assert isinstance(got.output_parsed, City)


async def test_anthropic_tool_use_plain_and_streamed_and_a_tool_result(network: Network) -> None:
    await network.add_provider()
    client = anthropic_client(network)
    tool = {"name": "get_weather", "description": "Weather in a city.", "input_schema": WEATHER}
    ask: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 80,
        "tools": [tool],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [{"role": "user", "content": ASK_WEATHER}],
        "extra_body": {"temperature": 0},
    }
    with trio.fail_after(BOUND_S):
        message = await client.messages.create(**ask)
        async with client.messages.stream(**ask) as stream:
            events = [e async for e in stream]
            final = await stream.get_final_message()
    (use,) = message.content
    assert use.type == "tool_use"
    assert use.name == "get_weather"
    assert use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER)
    assert message.stop_reason == "tool_use"
    pieces = [
        e.delta.partial_json  # type: ignore[union-attr]
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"  # type: ignore[union-attr]
    ]
    assert len(pieces) > 1
    assert json.loads("".join(pieces)) == use.input
    assert final.content[0].type == "tool_use"
    assert final.content[0].input == use.input  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use"
    with trio.fail_after(BOUND_S):
        answer = await client.messages.create(
            model=MODEL,
            max_tokens=40,
            system="Answer in one sentence.",
            messages=[
                {"role": "user", "content": ASK_WEATHER},
                {"role": "assistant", "content": [use.model_dump()]},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": use.id, "content": RESULT}],
                },
            ],  # fmt: skip
            extra_body={"temperature": 0},
        )
    assert answer.stop_reason in ("end_turn", "max_tokens")
    text = answer.content[0].text  # type: ignore[union-attr]
    assert said_the_result(text), text
