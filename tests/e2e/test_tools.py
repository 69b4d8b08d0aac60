"""Tool calls and structured output through a consumer's shim, with the official
``openai`` client and LangChain, to the bundled model on a remote provider."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pydantic
import pytest
import trio

from p2pnode.tests.e2e.network import BOUND_S, MODEL, Network

pytestmark = pytest.mark.slow

WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": WEATHER_ARGS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The current time in a time zone.",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                "required": ["zone"],
            },
        },
    },
]
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]


def client(net: Network) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=net.shim_url, api_key=net.api_key, max_retries=0)


def schema_of(name: str) -> dict[str, Any]:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


async def test_a_tool_call_plain_and_streamed_has_arguments_that_fit_the_schema(
    network: Network,
) -> None:
    await network.add_provider()
    api = client(network)
    with trio.fail_after(BOUND_S):
        plain = await api.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            temperature=0,
            max_tokens=80,
            parallel_tool_calls=False,
        )
        stream = await api.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            temperature=0,
            max_tokens=80,
            parallel_tool_calls=False,
            stream=True,
        )
        chunks = [c async for c in stream]
    choice = plain.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), schema_of(call.function.name))
    # Streamed in OpenAI's shape: the first delta of a call names its index,
    # id, type and name with empty arguments; the arguments follow in pieces.
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0
    assert first.id
    assert first.type == "function"
    assert first.function is not None
    assert first.function.name == call.function.name
    assert first.function.arguments == ""
    assert len(rest) > 1
    assert all(d.id is None and d.function.name is None for d in rest)
    assert "".join(d.function.arguments or "" for d in rest) == call.function.arguments  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_a_named_tool_choice_calls_that_tool_and_none_calls_nothing(
    network: Network,
) -> None:
    await network.add_provider()
    api = client(network)
    with trio.fail_after(BOUND_S):
        named = await api.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            temperature=0,
            max_tokens=60,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
        none = await api.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice="none",
            temperature=0,
            max_tokens=16,
        )
    calls = named.choices[0].message.tool_calls or []
    assert calls
    assert all(c.function.name == "get_time" for c in calls)
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), schema_of("get_time"))  # type: ignore[union-attr]
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content
    assert none.choices[0].finish_reason in ("stop", "length")


async def test_a_whole_tool_loop_ends_in_an_answer_that_uses_the_result(
    network: Network,
) -> None:
    await network.add_provider()
    api = client(network)
    messages: list[Any] = [
        {"role": "system", "content": "Use the tools. Then answer in one sentence."},
        *ASK,
    ]
    with trio.fail_after(BOUND_S):
        first = await api.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=TOOLS,
            temperature=0,
            max_tokens=80,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        call = (first.choices[0].message.tool_calls or [])[0]
        messages.append(first.choices[0].message.model_dump(exclude_none=True))
        messages.append(
            {"role": "tool", "tool_call_id": call.id, "content": "Raining frogs, 37 degrees."}
        )
        final = await api.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=TOOLS,
            tool_choice="none",
            temperature=0,
            max_tokens=40,
        )
    answer = final.choices[0].message.content or ""
    assert final.choices[0].message.tool_calls is None
    # The 135M model does not always reason well, but the tool's result is
    # in its context: it repeats a fact only the tool gave.
    assert "frog" in answer.lower() or "37" in answer, answer


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=24)
    sky: Literal["sunny", "cloudy", "rainy"]
    windy: bool


async def test_parse_with_a_pydantic_model_returns_the_parsed_object(network: Network) -> None:
    await network.add_provider()
    api = client(network)
    with trio.fail_after(BOUND_S):
        got = await api.chat.completions.parse(
            model=MODEL,
            messages=ASK,
            response_format=Weather,
            temperature=0,
            max_tokens=60,
        )
        loose = await api.chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format={"type": "json_object"},
            temperature=0,
            max_tokens=40,
        )
    parsed = got.choices[0].message.parsed
    assert isinstance(parsed, Weather)
    assert (loose.choices[0].message.content or "").startswith("{")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": {"type": "integer", "minimum": 3}},
                }
            },
            "response_format",
        ),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
async def test_each_bad_tool_or_format_field_is_a_400_naming_it(
    network: Network, extra: dict[str, Any], param: str
) -> None:
    api = client(network)
    with pytest.raises(openai.BadRequestError) as caught:
        await api.chat.completions.create(model=MODEL, messages=ASK, **extra)
    assert caught.value.body["param"] == param  # type: ignore[index]


async def test_langchain_binds_a_tool_and_runs_a_tool_loop(network: Network) -> None:
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    seen: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        seen.append(city)
        return f"It is raining frogs in {city}, 37 degrees."

    await network.add_provider()
    llm = ChatOpenAI(
        model=MODEL,
        base_url=network.shim_url,
        api_key=network.api_key,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=60,
        max_retries=0,
    )
    history: list[Any] = [
        SystemMessage("Use the tools, then answer in one sentence."),
        HumanMessage("What is the weather in Paris?"),
    ]

    def run() -> str:
        ask = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(history)
        history.append(ask)
        for call in ask.tool_calls:
            history.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
        return str(llm.invoke(history).content)

    with trio.fail_after(BOUND_S):
        answer = await trio.to_thread.run_sync(run)
    assert seen
    assert all(isinstance(c, str) and c for c in seen)
    assert "frog" in answer.lower() or "37" in answer, answer


def readme_tool_example() -> str:
    """The README's tool-calling example, as written."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    (block,) = [b for b in blocks if "tool_choice" in b]
    return block


async def test_the_readme_tool_example_runs_as_written(network: Network, tmp_path: Path) -> None:
    await network.add_provider()
    key = tmp_path / "api_key"
    key.write_text(network.api_key + "\n")
    code = (
        readme_tool_example()
        .replace("http://127.0.0.1:8080/v1", network.shim_url)
        .replace("/tmp/consumer/api_key", str(key))
    )
    out = io.StringIO()

    def run() -> None:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own code

    with trio.fail_after(BOUND_S):
        await trio.to_thread.run_sync(run)
    assert out.getvalue().strip()
